// The backward of a row norm over the last dimension C, LayerNorm's (layernorm.cu) or RMSNorm's (rmsnorm.cu):
//   xhat = (x - mean) * rstd (RMSNorm: mean = 0), dnorm = dout * weight,
//   dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))   (RMSNorm: no mean(dnorm) term),
//   dweight += sum_rows dout * xhat, dbias += sum_rows dout (LayerNorm only),
//   optionally dinp_sum += sum_rows dinp (the new dinp, as stored): dinp is the residual stream's gradient, and
//   its column sum is the bias gradient of the projection that wrote into that stream, summed here where the
//   rows are in registers instead of in another pass over them (bias.cu).
// A block of ceil(C / 256) warps owns NORM_ROWS_PER_BLOCK consecutive rows, and thread v owns channels 8v..8v+7
// of each of them (C / 8 threads busy), so its column sums stay in its registers over the block's rows and the
// block's partial rows are stored without any reduction across threads (the former design, a warp per row with
// per-warp sums in shared memory, spent half its instructions on those sums and fit 12 warps per SM; in one
// process on an H200 at N = 65536, C = 768 this one takes 144.4 us against its 162.0). A row's sums (of dnorm
// and dnorm * xhat) are reduced over the block by a butterfly per warp and the warps' results through shared
// memory (double-buffered: one barrier a row). Partials: one fp32 row per block of [dweight | dbias] (LayerNorm,
// 2C floats) or dweight (RMSNorm, C), and with dinp_sum one row of C floats per block after them; column_sum_add
// then adds them in block order, so the result depends only on N. Requires C % 8 == 0, C <= 2048.
#pragma once
#include "common.cuh"

constexpr int NORM_ROWS_PER_BLOCK = 64;  // one partial row per 64 rows
constexpr int NORM_BWD_MAX_WARPS = 8;    // C <= 2048

// dweight (and dbias) sums per block, in floats per channel: LayerNorm 2, RMSNorm 1
template <bool RMS> constexpr int norm_sums = RMS ? 1 : 2;

template <bool RMS, bool DINP_SUM>
__global__ void __launch_bounds__(NORM_BWD_MAX_WARPS * 32)
    norm_backward_kernel(bf16* __restrict__ dinp, float* __restrict__ partials, const bf16* __restrict__ dout,
                         const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                         const float* __restrict__ mean, const float* __restrict__ rstd, int N, int C) {
    __shared__ float exchange[2][NORM_BWD_MAX_WARPS][2];  // per warp: the row's sum of dnorm, of dnorm * xhat
    const int v = threadIdx.x, lane = v % 32, warp = v / 32, warps = blockDim.x / 32;
    const bool owner = v < C / 8;
    const int c = 8 * v;
    float w[8], dw[8] = {}, db[8] = {}, di_sum[8] = {};
    if (owner) {
        const x128 wv = load128(weight + c);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = (float)wv[k];
    }
    const int row0 = blockIdx.x * NORM_ROWS_PER_BLOCK, rows = min(NORM_ROWS_PER_BLOCK, N - row0);
    for (int i = 0; i < rows; i++) {
        const size_t off = (size_t)(row0 + i) * C + c;
        x128 g, x, di;
        if (owner) {
            g = load128cs(dout + off);
            x = load128cs(inp + off);
            di = load128(dinp + off);
        }
        const float m = RMS ? 0.0f : mean[row0 + i], s = rstd[row0 + i];
        float sum_dn = 0.0f, sum_dnx = 0.0f;
        if (owner) {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float dn = (float)g[k] * w[k];
                if (!RMS) sum_dn += dn;
                sum_dnx += dn * (((float)x[k] - m) * s);
            }
        }
        if (!RMS) sum_dn = warp_sum(sum_dn);
        sum_dnx = warp_sum(sum_dnx);
        float(&mine)[2] = exchange[i & 1][warp];  // rewritten two rows on, past the next barrier
        if (lane == 0) {
            mine[0] = sum_dn;
            mine[1] = sum_dnx;
        }
        __syncthreads();
        float mean_dn = 0.0f, mean_dnx = 0.0f;
        for (int u = 0; u < warps; u++) {
            if (!RMS) mean_dn += exchange[i & 1][u][0];
            mean_dnx += exchange[i & 1][u][1];
        }
        mean_dn /= C;
        mean_dnx /= C;
        if (!owner) continue;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float xhat = ((float)x[k] - m) * s, d = (float)g[k], dn = d * w[k];
            if (!RMS) db[k] += d;
            dw[k] += d * xhat;
            di[k] = __float2bfloat16_rn((float)di[k] + s * (dn - mean_dn - xhat * mean_dnx));
            if (DINP_SUM) di_sum[k] += (float)di[k];
        }
        store128(dinp + off, di);
    }
    if (!owner) return;
    auto store8 = [](float* dst, const float (&a)[8]) {
        *reinterpret_cast<float4*>(dst) = make_float4(a[0], a[1], a[2], a[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(a[4], a[5], a[6], a[7]);
    };
    constexpr int S = norm_sums<RMS>;
    float* dst = partials + (size_t)blockIdx.x * S * C + c;
    store8(dst, dw);
    if (!RMS) store8(dst + C, db);
    if (DINP_SUM) store8(partials + (size_t)gridDim.x * S * C + (size_t)blockIdx.x * C + c, di_sum);
}

template <bool RMS>
inline size_t norm_backward_scratch_floats(int N, int C) {
    return (size_t)ceil_div(N, NORM_ROWS_PER_BLOCK) * (norm_sums<RMS> + 1) * C;  // partial rows, dinp_sum rows
}

// The launch and the column sums: dweight (and dbias) in bf16, dinp_sum (optional) in fp32; mean unused by RMSNorm.
template <bool RMS>
inline void norm_backward(const char* family, bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                          const bf16* weight, const float* mean, const float* rstd, float* scratch,
                          size_t scratch_floats, int N, int C, cudaStream_t stream, float* dinp_sum) {
    const int warps = check_rows(N, C, family, {dinp, dout, inp, weight});  // one per 256 channels
    if (N == 0) return;
    if (scratch_floats < norm_backward_scratch_floats<RMS>(N, C))
        throw std::runtime_error(std::string("gpt2cu kernels: ") + family + ": scratch too small");
    const int blocks = ceil_div(N, NORM_ROWS_PER_BLOCK);
    if (dinp_sum)
        norm_backward_kernel<RMS, true><<<blocks, 32 * warps, 0, stream>>>(dinp, scratch, dout, inp, weight, mean,
                                                                           rstd, N, C);
    else
        norm_backward_kernel<RMS, false><<<blocks, 32 * warps, 0, stream>>>(dinp, scratch, dout, inp, weight, mean,
                                                                            rstd, N, C);
    CUDA_CHECK_LAUNCH();
    constexpr int S = norm_sums<RMS>;
    column_sum_add(dweight, RMS ? dweight : dbias, C, scratch, blocks, S * C, stream);
    if (dinp_sum) column_sum_add(dinp_sum, dinp_sum, C, scratch + (size_t)blocks * S * C, blocks, C, stream);
}
