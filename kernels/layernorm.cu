// LayerNorm over the last dimension C (eps 1e-5), forward (optionally fused with the residual add)
// and backward.
//
// forward:  mean = sum(x)/C, var = sum((x-mean)^2)/C, rstd = 1/sqrt(var+eps),
//           out = (x-mean)*rstd*weight + bias.
//           fused: residual = bf16(inp1 + inp2) is stored and normalized as stored (the rounded value),
//           so the backward, which reads the stored residual, sees the same x.
// backward: xhat = (x-mean)*rstd, dnorm = dout*weight,
//           dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm*xhat)),
//           dweight += sum_rows dout*xhat, dbias += sum_rows dout,
//           optionally dinp_sum += sum_rows dinp (the new dinp, as stored): dinp is the residual stream's
//           gradient, and its column sum is the bias gradient of the projection that wrote into that stream
//           (attproj after ln2's backward, fcproj after ln1's and lnf's): summed here, where the rows are in
//           registers, instead of another pass over them in bias.cu.
//
// forward: one warp per row: lane l holds the 8-channel vectors l, l+32, ... (VPL of them; C = 768 -> 3), kept
// in registers between the statistics and the output, so each row is read from memory once. Row sums
// are xor-butterfly warp reductions. Requires C % 8 == 0 and C <= 2048 (common.cuh's row helpers); GPT-2
// widths (768 ... 1600) are multiples of 64.
// backward: a block of ceil(C / 256) warps owns LN_ROWS_PER_BLOCK consecutive rows, and thread v owns channels
// 8v..8v+7 of each of them (C / 8 threads busy). Its dweight / dbias (/ dinp) column sums therefore stay in its
// registers over the block's rows, and the block's partial rows are stored without any reduction across
// threads (the former design, a warp per row with per-warp sums in shared memory, spent half its instructions
// on those sums and fit 12 warps per SM: 65% of the bandwidth floor on an H200). The rows go LN_BWD_ROWS at a
// time: the two row sums each needs (of dnorm and dnorm * xhat) are reduced over the block together, a butterfly
// per warp and the warps' results through shared memory (double-buffered: one barrier a step). Partials: one
// fp32 row [dweight | dbias] (2C floats) per block, and with dinp_sum one row of C floats per block after them;
// column_sum_add then adds them in block order into the bf16 dweight/dbias (and the fp32 dinp_sum). A block owns
// LN_ROWS_PER_BLOCK consecutive rows, so the partials, and the result, depend only on N.
#include "common.cuh"

constexpr int LN_THREADS = 256;        // forward: 8 rows per block
constexpr int LN_WARPS = LN_THREADS / 32;
constexpr int LN_ROWS_PER_BLOCK = 64;  // backward: one partial row per 64 rows
// rows per step of the backward: 1 needs 72 registers (9 blocks of 3 warps per SM at C = 768; 2 rows: 122)
constexpr int LN_BWD_ROWS = 1;
constexpr int LN_BWD_MAX_WARPS = 8;    // C <= 2048
constexpr float LN_EPS = 1e-5f;

template <int VPL, bool RESIDUAL>
__global__ void __launch_bounds__(LN_THREADS)
    layernorm_forward_kernel(bf16* __restrict__ residual, bf16* __restrict__ out, float* __restrict__ mean,
                             float* __restrict__ rstd, const bf16* __restrict__ inp1, const bf16* __restrict__ inp2,
                             const bf16* __restrict__ weight, const bf16* __restrict__ bias, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const int vecs = C / 8;
    const size_t off = (size_t)row * C;

    x128 x[VPL];
    load_row<VPL, RESIDUAL>(x, residual, inp1, inp2, off, lane, vecs);
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

template <bool RESIDUAL>
static void layernorm_forward_launch(bf16* residual, bf16* out, float* mean, float* rstd, const bf16* inp1,
                                     const bf16* inp2, const bf16* weight, const bf16* bias, int N, int C,
                                     cudaStream_t stream) {
    const int vpl = check_rows(N, C, "layernorm_forward", {residual, out, inp1, inp2, weight, bias});
    if (N == 0) return;
    dispatch_row_vectors(vpl, [&](auto v) {
        layernorm_forward_kernel<decltype(v)::value, RESIDUAL><<<ceil_div(N, LN_WARPS), LN_THREADS, 0, stream>>>(
            residual, out, mean, rstd, inp1, inp2, weight, bias, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight,
                       const bf16* bias, int N, int C, cudaStream_t stream) {
    layernorm_forward_launch<false>(nullptr, out, mean, rstd, inp, nullptr, weight, bias, N, C, stream);
}

void fused_residual_layernorm_forward(bf16* residual, bf16* out, float* mean, float* rstd, const bf16* inp1,
                                      const bf16* inp2, const bf16* weight, const bf16* bias, int N, int C,
                                      cudaStream_t stream) {
    layernorm_forward_launch<true>(residual, out, mean, rstd, inp1, inp2, weight, bias, N, C, stream);
}

// partials: one row of 2C floats per block, [dweight sums | dbias sums] of the block's rows; with DINP_SUM,
// after the blocks' rows (at gridDim.x * 2C), one row of C floats per block, the sums of the new dinp.
template <bool DINP_SUM>
__global__ void __launch_bounds__(LN_BWD_MAX_WARPS * 32)
    layernorm_backward_kernel(bf16* __restrict__ dinp, float* __restrict__ partials, const bf16* __restrict__ dout,
                              const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                              const float* __restrict__ mean, const float* __restrict__ rstd, int N, int C) {
    constexpr int R = LN_BWD_ROWS;
    __shared__ float exchange[2][LN_BWD_MAX_WARPS][2 * R];  // per warp: each row's sum of dnorm, of dnorm * xhat
    const int v = threadIdx.x, lane = v % 32, warp = v / 32, warps = blockDim.x / 32;
    const bool owner = v < C / 8;
    const int c = 8 * v;
    float w[8], dw[8] = {}, db[8] = {}, di_sum[8] = {};
    if (owner) {
        const x128 wv = load128(weight + c);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = (float)wv[k];
    }
    const int row0 = blockIdx.x * LN_ROWS_PER_BLOCK, rows = min(LN_ROWS_PER_BLOCK, N - row0);
    for (int i = 0; i < rows; i += R) {
        x128 g[R], x[R], di[R];
        float m[R], s[R], sums[2 * R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const bool live = owner && i + r < rows;
            const size_t off = (size_t)(row0 + i + r) * C + c;
            if (live) {
                g[r] = load128cs(dout + off);
                x[r] = load128cs(inp + off);
                di[r] = load128(dinp + off);
            }
            m[r] = i + r < rows ? mean[row0 + i + r] : 0.0f;
            s[r] = i + r < rows ? rstd[row0 + i + r] : 0.0f;
            float sum_dn = 0.0f, sum_dnx = 0.0f;
            if (live) {
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float dn = (float)g[r][k] * w[k];
                    sum_dn += dn;
                    sum_dnx += dn * (((float)x[r][k] - m[r]) * s[r]);
                }
            }
            sums[2 * r] = warp_sum(sum_dn);
            sums[2 * r + 1] = warp_sum(sum_dnx);
        }
        float(&mine)[2 * R] = exchange[(i / R) & 1][warp];  // rewritten two steps on, past the next barrier
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < 2 * R; j++) mine[j] = sums[j];
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 2 * R; j++) {
            float t = 0.0f;
            for (int u = 0; u < warps; u++) t += exchange[(i / R) & 1][u][j];
            sums[j] = t / C;  // the means over the row
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (!owner || i + r >= rows) continue;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float xhat = ((float)x[r][k] - m[r]) * s[r], d = (float)g[r][k], dn = d * w[k];
                db[k] += d;
                dw[k] += d * xhat;
                di[r][k] = __float2bfloat16_rn((float)di[r][k] + s[r] * (dn - sums[2 * r] - xhat * sums[2 * r + 1]));
                if (DINP_SUM) di_sum[k] += (float)di[r][k];
            }
            store128(dinp + (size_t)(row0 + i + r) * C + c, di[r]);
        }
    }
    if (!owner) return;
    float* dst = partials + (size_t)blockIdx.x * 2 * C + c;
    *reinterpret_cast<float4*>(dst) = make_float4(dw[0], dw[1], dw[2], dw[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(dw[4], dw[5], dw[6], dw[7]);
    *reinterpret_cast<float4*>(dst + C) = make_float4(db[0], db[1], db[2], db[3]);
    *reinterpret_cast<float4*>(dst + C + 4) = make_float4(db[4], db[5], db[6], db[7]);
    if (DINP_SUM) {
        float* dst_dinp = partials + (size_t)gridDim.x * 2 * C + (size_t)blockIdx.x * C + c;
        *reinterpret_cast<float4*>(dst_dinp) = make_float4(di_sum[0], di_sum[1], di_sum[2], di_sum[3]);
        *reinterpret_cast<float4*>(dst_dinp + 4) = make_float4(di_sum[4], di_sum[5], di_sum[6], di_sum[7]);
    }
}

size_t layernorm_backward_scratch_floats(int N, int C) {
    return (size_t)ceil_div(N, LN_ROWS_PER_BLOCK) * 3 * C;  // [dweight | dbias] rows, then dinp_sum rows
}

template <bool DINP_SUM>
static void layernorm_backward_launch(bf16* dinp, const bf16* dout, const bf16* inp, const bf16* weight,
                                      const float* mean, const float* rstd, float* scratch, int warps, int blocks,
                                      int N, int C, cudaStream_t stream) {
    layernorm_backward_kernel<DINP_SUM><<<blocks, 32 * warps, 0, stream>>>(dinp, scratch, dout, inp, weight, mean,
                                                                            rstd, N, C);
    CUDA_CHECK_LAUNCH();
}

void layernorm_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                        const bf16* weight, const float* mean, const float* rstd, float* scratch,
                        size_t scratch_floats, int N, int C, cudaStream_t stream, float* dinp_sum) {
    const int warps = check_rows(N, C, "layernorm_backward", {dinp, dout, inp, weight});  // one per 256 channels
    if (N == 0) return;
    require(scratch_floats >= layernorm_backward_scratch_floats(N, C), "layernorm_backward: scratch too small");
    const int blocks = ceil_div(N, LN_ROWS_PER_BLOCK);
    if (dinp_sum)
        layernorm_backward_launch<true>(dinp, dout, inp, weight, mean, rstd, scratch, warps, blocks, N, C, stream);
    else
        layernorm_backward_launch<false>(dinp, dout, inp, weight, mean, rstd, scratch, warps, blocks, N, C, stream);
    column_sum_add(dweight, dbias, C, scratch, blocks, 2 * C, stream);
    if (dinp_sum) column_sum_add(dinp_sum, dinp_sum, C, scratch + (size_t)blocks * 2 * C, blocks, C, stream);
}
