// RMSNorm over the last dimension C (LLaMA's norm: no mean subtraction, no bias), forward and backward. (The
// residual add before it is the projection GEMM's: matmul_forward's residual.)
//
// forward:  rstd = 1/sqrt(sum(x^2)/C + eps), out = x*rstd*weight.
// backward: norm_backward.cuh (shared with layernorm.cu), with mean 0 and no bias.
//
// forward: one warp per row, the row in registers (common.cuh's row helpers: C % 8 == 0, C <= 2048; every
// llama:dN width and Llama 3.2 1B's 2048 fit).
#include "common.cuh"
#include "norm_backward.cuh"

constexpr int RMS_THREADS = 256;  // forward: 8 rows per block
constexpr int RMS_WARPS = RMS_THREADS / 32;

template <int VPL>
__global__ void __launch_bounds__(RMS_THREADS)
    rmsnorm_forward_kernel(bf16* __restrict__ out, float* __restrict__ rstd, const bf16* __restrict__ inp,
                           const bf16* __restrict__ weight, float eps, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const int vecs = C / 8;
    const size_t off = (size_t)row * C;

    x128 x[VPL];
    load_row<VPL>(x, inp, off, lane, vecs);
    const float s = rsqrtf(row_sum(x, lane, vecs, [](float v) { return v * v; }) / C + eps);
    if (lane == 0) rstd[row] = s;
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        const int c = (lane + 32 * j) * 8;
        if (lane + 32 * j < vecs) {
            const x128 w = load128(weight + c);
            x128 o;
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = __float2bfloat16_rn((float)x[j][k] * s * (float)w[k]);
            store128(out + off + c, o);
        }
    }
}

void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, float eps, int N, int C,
                     cudaStream_t stream) {
    const int vpl = check_rows(N, C, "rmsnorm_forward", {out, inp, weight});
    if (N == 0) return;
    dispatch_row_vectors(vpl, [&](auto v) {
        rmsnorm_forward_kernel<decltype(v)::value><<<ceil_div(N, RMS_WARPS), RMS_THREADS, 0, stream>>>(
            out, rstd, inp, weight, eps, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

size_t rmsnorm_backward_scratch_floats(int N, int C) { return norm_backward_scratch_floats<true>(N, C); }

void rmsnorm_backward(bf16* dinp, bf16* dweight, const bf16* dout, const bf16* inp, const bf16* weight,
                      const float* rstd, float* scratch, size_t scratch_floats, int N, int C, cudaStream_t stream) {
    norm_backward<true>("rmsnorm_backward", dinp, dweight, nullptr, dout, inp, weight, nullptr, rstd, scratch,
                        scratch_floats, N, C, stream, nullptr);
}
