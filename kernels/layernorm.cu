// LayerNorm over the last dimension C (eps 1e-5), forward and backward. (The residual add before it is the
// projection GEMM's: matmul_forward's residual.)
//
// forward:  mean = sum(x)/C, var = sum((x-mean)^2)/C, rstd = 1/sqrt(var+eps),
//           out = (x-mean)*rstd*weight + bias.
// backward: norm_backward.cuh (shared with rmsnorm.cu), with the mean and the bias gradient.
//
// forward: one warp per row: lane l holds the 8-channel vectors l, l+32, ... (VPL of them; C = 768 -> 3), kept
// in registers between the statistics and the output, so each row is read from memory once. Row sums
// are xor-butterfly warp reductions. Requires C % 8 == 0 and C <= 2048 (common.cuh's row helpers); GPT-2
// widths (768 ... 1600) are multiples of 64.
#include "common.cuh"
#include "norm_backward.cuh"

constexpr int LN_THREADS = 256;        // forward: 8 rows per block
constexpr int LN_WARPS = LN_THREADS / 32;
constexpr float LN_EPS = 1e-5f;

template <int VPL>
__global__ void __launch_bounds__(LN_THREADS)
    layernorm_forward_kernel(bf16* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                             const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                             const bf16* __restrict__ bias, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const int vecs = C / 8;
    const size_t off = (size_t)row * C;

    x128 x[VPL];
    load_row<VPL>(x, inp, off, lane, vecs);
    const float m = row_sum(x, lane, vecs, [](float v) { return v; }) / C;
    const float s = rsqrtf(row_sum(x, lane, vecs, [m](float v) { return (v - m) * (v - m); }) / C + LN_EPS);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        const int c = (lane + 32 * j) * 8;
        if (lane + 32 * j < vecs) {
            const x128 w = load128(weight + c), b = load128(bias + c);
            x128 o;
#pragma unroll
            for (int k = 0; k < 8; k++)
                o[k] = __float2bfloat16_rn(((float)x[j][k] - m) * s * (float)w[k] + (float)b[k]);
            store128(out + off + c, o);
        }
    }
}

void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight,
                       const bf16* bias, int N, int C, cudaStream_t stream) {
    const int vpl = check_rows(N, C, "layernorm_forward", {out, inp, weight, bias});
    if (N == 0) return;
    dispatch_row_vectors(vpl, [&](auto v) {
        layernorm_forward_kernel<decltype(v)::value><<<ceil_div(N, LN_WARPS), LN_THREADS, 0, stream>>>(
            out, mean, rstd, inp, weight, bias, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

size_t layernorm_backward_scratch_floats(int N, int C) { return norm_backward_scratch_floats<false>(N, C); }

void layernorm_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                        const bf16* weight, const float* mean, const float* rstd, float* scratch,
                        size_t scratch_floats, int N, int C, cudaStream_t stream, float* dinp_sum) {
    norm_backward<false>("layernorm_backward", dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch,
                         scratch_floats, N, C, stream, dinp_sum);
}
