// RMSNorm over the last dimension C (LLaMA's norm: no mean subtraction, no bias), forward (optionally
// fused with the residual add) and backward.
//
// forward:  rstd = 1/sqrt(sum(x^2)/C + eps), out = x*rstd*weight.
//           fused: residual = bf16(inp1 + inp2) is stored and normalized as stored, so the backward, which
//           reads the stored residual, sees the same x (as layernorm.cu).
// backward: xhat = x*rstd, dxhat = dout*weight,
//           dinp += rstd * (dxhat - xhat * mean(dxhat*xhat)),   (rstd depends on x too)
//           dweight += sum_rows dout*xhat.
//
// One warp per row, the row in registers (common.cuh's row helpers: C % 8 == 0, C <= 2048; every
// llama:dN width and Llama 3.2 1B's 2048 fit). The backward is deterministic as layernorm.cu's: each
// warp sums dout*xhat of its rows per channel in its own slice of shared memory, the block adds its
// warps' sums in warp order into one fp32 partial row (C floats) of scratch, and column_sum_add adds the
// partial rows in block order into the bf16 dweight. A block owns RMS_ROWS_PER_BLOCK consecutive rows, so
// the result depends only on N.
#include "common.cuh"

constexpr int RMS_THREADS = 256;  // forward: 8 rows per block
constexpr int RMS_WARPS = RMS_THREADS / 32;
constexpr int RMS_BWD_THREADS = 128;
constexpr int RMS_BWD_WARPS = RMS_BWD_THREADS / 32;
constexpr int RMS_ROWS_PER_WARP = 16;
constexpr int RMS_ROWS_PER_BLOCK = RMS_BWD_WARPS * RMS_ROWS_PER_WARP;  // one partial row per 64 rows

template <int VPL, bool RESIDUAL>
__global__ void __launch_bounds__(RMS_THREADS)
    rmsnorm_forward_kernel(bf16* __restrict__ residual, bf16* __restrict__ out, float* __restrict__ rstd,
                           const bf16* __restrict__ inp1, const bf16* __restrict__ inp2,
                           const bf16* __restrict__ weight, float eps, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * RMS_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const int vecs = C / 8;
    const size_t off = (size_t)row * C;

    x128 x[VPL];
    load_row<VPL, RESIDUAL>(x, residual, inp1, inp2, off, lane, vecs);
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

template <bool RESIDUAL>
static void rmsnorm_forward_launch(bf16* residual, bf16* out, float* rstd, const bf16* inp1, const bf16* inp2,
                                   const bf16* weight, float eps, int N, int C, cudaStream_t stream) {
    const int vpl = check_rows(N, C, "rmsnorm_forward", {residual, out, inp1, inp2, weight});
    if (N == 0) return;
    dispatch_row_vectors(vpl, [&](auto v) {
        rmsnorm_forward_kernel<decltype(v)::value, RESIDUAL><<<ceil_div(N, RMS_WARPS), RMS_THREADS, 0, stream>>>(
            residual, out, rstd, inp1, inp2, weight, eps, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, float eps, int N, int C,
                     cudaStream_t stream) {
    rmsnorm_forward_launch<false>(nullptr, out, rstd, inp, nullptr, weight, eps, N, C, stream);
}

void fused_residual_rmsnorm_forward(bf16* residual, bf16* out, float* rstd, const bf16* inp1, const bf16* inp2,
                                    const bf16* weight, float eps, int N, int C, cudaStream_t stream) {
    rmsnorm_forward_launch<true>(residual, out, rstd, inp1, inp2, weight, eps, N, C, stream);
}

// Dynamic shared memory: each warp's fp32 dweight sums, VPL*256 floats (8 KB per block at C = 768).
// partials: one row of C floats per block, the dweight sums of the block's rows.
template <int VPL>
__global__ void __launch_bounds__(RMS_BWD_THREADS)
    rmsnorm_backward_kernel(bf16* __restrict__ dinp, float* __restrict__ partials, const bf16* __restrict__ dout,
                            const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                            const float* __restrict__ rstd, int N, int C) {
    constexpr int W = VPL * 32 * 8;  // channels a warp covers
    extern __shared__ float4 warp_sums[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int vecs = C / 8;
    float4* dw_sum = warp_sums + warp * (W / 4);  // this warp's sums, 2 float4 per vector
    for (int i = lane; i < W / 4; i += 32) dw_sum[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    __syncwarp();

    for (int i = 0; i < RMS_ROWS_PER_WARP; i++) {
        const int row = blockIdx.x * RMS_ROWS_PER_BLOCK + i * RMS_BWD_WARPS + warp;
        if (row >= N) break;
        const size_t off = (size_t)row * C;
        x128 g[VPL], x[VPL];
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                g[j] = load128cs(dout + off + (lane + 32 * j) * 8);
                x[j] = load128cs(inp + off + (lane + 32 * j) * 8);
            }
        const float s = rstd[row];
        float sum_dxx = 0.0f;  // sum of dxhat * xhat over the row
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                const int v = lane + 32 * j;
                const x128 w = load128(weight + 8 * v);
                float dw[8];
                *reinterpret_cast<float4*>(dw) = dw_sum[2 * v];
                *reinterpret_cast<float4*>(dw + 4) = dw_sum[2 * v + 1];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float xhat = (float)x[j][k] * s, d = (float)g[j][k];
                    sum_dxx += d * (float)w[k] * xhat;
                    dw[k] += d * xhat;
                }
                dw_sum[2 * v] = *reinterpret_cast<float4*>(dw);
                dw_sum[2 * v + 1] = *reinterpret_cast<float4*>(dw + 4);
            }
        const float mean_dxx = warp_sum(sum_dxx) / C;
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                const int c = (lane + 32 * j) * 8;
                const x128 w = load128(weight + c);  // an L1 hit: loaded above
                x128 di = load128(dinp + off + c);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float xhat = (float)x[j][k] * s;
                    di[k] = __float2bfloat16_rn((float)di[k] + s * ((float)g[j][k] * (float)w[k] - xhat * mean_dxx));
                }
                store128(dinp + off + c, di);
            }
    }

    // the block's partial row: the warps' sums added in warp order
    __syncthreads();
    const float* sums = reinterpret_cast<const float*>(warp_sums);
    float* dst = partials + (size_t)blockIdx.x * C;
    for (int c = threadIdx.x; c < C; c += RMS_BWD_THREADS) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < RMS_BWD_WARPS; w++) t += sums[w * W + c];
        dst[c] = t;
    }
}

size_t rmsnorm_backward_scratch_floats(int N, int C) {
    return (size_t)ceil_div(N, RMS_ROWS_PER_BLOCK) * C;
}

void rmsnorm_backward(bf16* dinp, bf16* dweight, const bf16* dout, const bf16* inp, const bf16* weight,
                      const float* rstd, float* scratch, size_t scratch_floats, int N, int C, cudaStream_t stream) {
    const int vpl = check_rows(N, C, "rmsnorm_backward", {dinp, dout, inp, weight});
    if (N == 0) return;
    require(scratch_floats >= rmsnorm_backward_scratch_floats(N, C), "rmsnorm_backward: scratch too small");
    const int blocks = ceil_div(N, RMS_ROWS_PER_BLOCK);
    dispatch_row_vectors(vpl, [&](auto v) {
        constexpr int VPL = decltype(v)::value;
        constexpr int smem = RMS_BWD_WARPS * VPL * 32 * 8 * sizeof(float);  // 4 KB * VPL, at most 32 KB
        rmsnorm_backward_kernel<VPL><<<blocks, RMS_BWD_THREADS, smem, stream>>>(dinp, scratch, dout, inp, weight,
                                                                               rstd, N, C);
        CUDA_CHECK_LAUNCH();
    });
    column_sum_add(dweight, (bf16*)nullptr, C, scratch, blocks, C, stream);
}
