// lm_head.cu: the LM head and its softmax cross-entropy over N rows (a chunk of a batch's positions), forward and
// backward in one launcher:
//   logits x (N, Vp) = hidden (N, C) @ W (Vp, C)^T,   loss_i = logsumexp(x_i[:V]) - x_i[t_i]
//   with dloss != 0:  dlogits = dloss (softmax(x_i[:V]) - onehot(t_i)),  dhidden = dlogits @ W,
//                     dW += dlogits^T @ hidden
// t_i < 0 masks row i (loss 0, no gradient).
//
// Elsewhere (other GPUs, shapes gemm_sm90 does not take, lm_head_set_fused(0)): matmul_forward, fused_classifier (a
// pass over the logits, a second that writes dlogits in place), matmul_backward.
// Hopper: dlogits is never formed. For any constant r_i of a row, softmax(x_i) = E_i / S_i with E_ij = exp(x_ij - r_i)
// and S_i = sum_j E_ij; with r_i = x_i[t_i], E_it = 1 and loss_i = ln S_i. So:
//   1. target_logit   r_i = hidden_i . W[t_i] in fp32 (+inf for a masked row: its E is 0)
//   2. gemm_exp_sm90  E = round(exp(x - r)) into the logits buffer, and per column tile each row's sum of E
//   3. combine        S_i = the row's partial sums added in a fixed order, loss_i = ln S_i, s_i = dloss / S_i, and
//                     in place E_it -= S_i, so that dlogits_i = s_i E_i; hidden_scaled_i = round(s_i hidden_i)
//   4. fixup          the rows combine flagged (below)
//   5. matmul_backward(dhidden, dW, E, hidden_scaled, W): dhidden = E @ W, dW += E^T @ hidden_scaled (cuBLASLt)
//   6. scale_rows     dhidden_i *= s_i
// Why: the classifier's read and write of the (N, Vp) logits go (GPT-2 d12 at B = 64: 13 GB of DRAM traffic and
// 3.4 ms a step), for an exp an element in the GEMM's epilogue (under the other warpgroup's products) and passes over
// (N, C) rows.
// Precision: S_i sums the fp32 values of E (before their rounding), so the loss has fp32 accuracy, from the fp32
// logits (the classifier reads cuBLASLt's bf16 ones); E_it - S_i is formed in fp32 and rounded once (as the
// classifier's p - 1); dlogits_ij = s_i E_ij with E rounded to bf16 (as the classifier's dlogits are); dhidden is
// rounded twice (E @ W, then times s_i).
// Range: the epilogue caps the exponent at 2^64, so a row's sum stays finite. A row whose sum reaches 2^64 (a loss of
// >= 44 nats, or a capped exp) is listed by combine and recomputed by fixup: its logits by fp32 dot products (W read
// whole per row: slow, but only such rows), E with r = the row's max, then the same finish. A masked row's E and
// hidden_scaled are 0, so the GEMMs add nothing for it.
// Deterministic: fixed-order sums everywhere (fixup's rows are independent, whatever order they are listed in).
#include "kernels.h"
#include "common.cuh"
#include "env_switch.h"
#include "gemm_sm90.h"

#include <algorithm>
#include <cmath>

namespace {
#ifdef GPT2CU_HAVE_SM90_GEMM  // the fused path's kernels (built where gemm_sm90 is)

constexpr int kWarpRows = 8;           // target_logit, fixup's blocks: 8 warps
constexpr int kCombineRows = 32;       // combine: 32 rows a block of 8 warps, 4 finished by each warp
constexpr float kFlagSum = 0x1p64f;    // a row sum from here on: recomputed (gemm_sm90's exponent cap is 64)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// a . b over C (a multiple of 8) bf16 values, by one warp, in fp32; every lane gets the sum
__device__ __forceinline__ float warp_dot(const bf16* a, const bf16* b, int C, int lane) {
    float s = 0.f;
    for (int c = 8 * lane; c < C; c += 256) {
        const x128 va = load128(a + c), vb = load128(b + c);
#pragma unroll
        for (int k = 0; k < 8; ++k) s = fmaf((float)va[k], (float)vb[k], s);
    }
    return warp_sum(s);
}

// 1. r_i = hidden_i . W[t_i] (a warp a row); block 0 also clears the flagged-row count for combine
__global__ void target_logit_kernel(float* __restrict__ shift, int* __restrict__ flagged,
                                    const bf16* __restrict__ hidden, const bf16* __restrict__ W,
                                    const int* __restrict__ targets, int N, int C) {
    if (blockIdx.x == 0 && threadIdx.x == 0) flagged[0] = 0;
    const int row = blockIdx.x * kWarpRows + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const int t = targets[row];
    const float r = t < 0 ? INFINITY : warp_dot(hidden + (size_t)row * C, W + (size_t)t * C, C, lane);
    if (lane == 0) shift[row] = r;
}

// A row's outputs from its sum S and loss, by one warp: losses, the row scale s = dloss / S, and with dloss != 0 the
// target's E_t -= S (lane 0) and hidden_scaled = round(s hidden). S = 0 (a masked row): loss 0, s 0, zeros.
__device__ void finish_row(int row, int t, float S, float loss, float dloss, float* __restrict__ losses,
                           float* __restrict__ row_scale, bf16* __restrict__ E, bf16* __restrict__ hidden_scaled,
                           const bf16* __restrict__ hidden, int C, int Vp, int lane) {
    const float s = t < 0 ? 0.f : dloss / S;
    if (lane == 0) {
        losses[row] = t < 0 ? 0.f : loss;
        row_scale[row] = s;
        if (dloss != 0.f && t >= 0) {
            bf16* e = E + (size_t)row * Vp + t;
            *e = __float2bfloat16_rn((float)*e - S);
        }
    }
    if (dloss == 0.f) return;
    for (int c = 8 * lane; c < C; c += 256) {
        const x128 h = load128(hidden + (size_t)row * C + c);
        x128 out;
#pragma unroll
        for (int k = 0; k < 8; ++k) out[k] = __float2bfloat16_rn(s * (float)h[k]);
        store128(hidden_scaled + (size_t)row * C + c, out);
    }
}

// 3. S_i from the (tiles, N) partial sums: warp w adds tiles w, w + 8, ... of the block's 32 rows (lane = row:
// coalesced), then every warp adds the 8 warps' sums of its 4 rows in warp order
__global__ void __launch_bounds__(256)
    combine_kernel(float* __restrict__ losses, float* __restrict__ row_scale, int* __restrict__ flagged,
                   bf16* __restrict__ E, bf16* __restrict__ hidden_scaled, const float* __restrict__ partials,
                   const bf16* __restrict__ hidden, const int* __restrict__ targets, float dloss, int N, int C,
                   int Vp, int tiles) {
    constexpr int kWarps = 8;
    __shared__ float part[kWarps][kCombineRows];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = blockIdx.x * kCombineRows;
    float sum = 0.f;
    if (row0 + lane < N)
        for (int j = warp; j < tiles; j += kWarps) sum += partials[(size_t)j * N + row0 + lane];
    part[warp][lane] = sum;
    __syncthreads();
    for (int k = 0; k < kCombineRows / kWarps; ++k) {
        const int i = (kCombineRows / kWarps) * warp + k, row = row0 + i;
        if (row >= N) return;
        float S = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) S += part[w][i];
        const int t = targets[row];
        if (t >= 0 && !(S < kFlagSum)) {  // (NaN too)
            if (lane == 0) flagged[1 + atomicAdd(flagged, 1)] = row;
            continue;
        }
        finish_row(row, t, S, logf(S), dloss, losses, row_scale, E, hidden_scaled, hidden, C, Vp, lane);
    }
}

// 4. The flagged rows, a block each (grid-stride over the count): hidden_i in shared memory (fp32), the row's max
// logit (pass 1), then E_ij = round(exp(x_ij - max)) and their sum (pass 2, the logits recomputed), the target's
// logit, and the finish with loss = max + ln S - x_t.
__global__ void __launch_bounds__(256)
    fixup_kernel(float* __restrict__ losses, float* __restrict__ row_scale, const int* __restrict__ flagged,
                 bf16* __restrict__ E, bf16* __restrict__ hidden_scaled, const bf16* __restrict__ hidden,
                 const bf16* __restrict__ W, const int* __restrict__ targets, float dloss, int C, int V, int Vp) {
    extern __shared__ float h[];  // C
    __shared__ float warp_vals[kWarpRows];
    __shared__ float target_logit;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int count = flagged[0];
    for (int f = blockIdx.x; f < count; f += gridDim.x) {
        const int row = flagged[1 + f], t = targets[row];
        __syncthreads();  // the previous row's reads of h and warp_vals are done
        for (int c = threadIdx.x; c < C; c += blockDim.x) h[c] = (float)hidden[(size_t)row * C + c];
        __syncthreads();
        auto logit = [&](int j) {  // every lane gets x_ij
            float s = 0.f;
            for (int c = lane; c < C; c += 32) s = fmaf(h[c], (float)W[(size_t)j * C + c], s);
            return warp_sum(s);
        };
        float m = -INFINITY;
        for (int j = warp; j < V; j += kWarpRows) m = fmaxf(m, logit(j));
        if (lane == 0) warp_vals[warp] = m;
        __syncthreads();
        m = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarpRows; ++w) m = fmaxf(m, warp_vals[w]);
        __syncthreads();
        float sum = 0.f;
        for (int j = warp; j < V; j += kWarpRows) {
            const float x = logit(j), e = expf(x - m);
            if (lane == 0) E[(size_t)row * Vp + j] = __float2bfloat16_rn(e);
            sum += e;
            if (j == t && lane == 0) target_logit = x;
        }
        if (lane == 0) warp_vals[warp] = sum;
        __syncthreads();  // E's row, the sums and the target's logit written
        if (warp == 0) {
            float S = 0.f;
#pragma unroll
            for (int w = 0; w < kWarpRows; ++w) S += warp_vals[w];
            finish_row(row, t, S, m + logf(S) - target_logit, dloss, losses, row_scale, E, hidden_scaled, hidden, C,
                       Vp, lane);
        }
    }
}

// 6. dhidden_i *= s_i (C a multiple of 8)
__global__ void scale_rows_kernel(bf16* __restrict__ x, const float* __restrict__ row_scale, int N, int C) {
    const size_t vecs = (size_t)N * (C / 8);
    for (size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x; v < vecs; v += (size_t)gridDim.x * blockDim.x) {
        const float s = row_scale[v / (C / 8)];
        x128 a = load128(x + 8 * v);
#pragma unroll
        for (int k = 0; k < 8; ++k) a[k] = __float2bfloat16_rn(s * (float)a[k]);
        store128(x + 8 * v, a);
    }
}
#endif

EnvSwitch g_fused("GPT2CU_FUSED_LM_HEAD", 1, 0);  // lm_head_set_fused: 1 on, 0 off

// The scratch, in floats, each part 16-byte aligned: shift (N), row scale (N), the flagged count and rows (1 + N),
// the row sums (column tiles x N: room for 128-column ones, the narrowest), hidden_scaled (N x C bf16)
size_t up4(size_t n) { return (n + 3) / 4 * 4; }
#ifdef GPT2CU_HAVE_SM90_GEMM
struct Scratch {
    float *shift, *row_scale, *partials;
    int* flagged;
    bf16* hidden_scaled;
};
Scratch carve(float* p, int N, int C, int Vp) {
    Scratch s;
    s.shift = p;
    s.row_scale = s.shift + up4(N);
    s.flagged = reinterpret_cast<int*>(s.row_scale + up4(N));
    s.partials = reinterpret_cast<float*>(s.flagged) + up4((size_t)N + 1);
    s.hidden_scaled = reinterpret_cast<bf16*>(s.partials + up4((size_t)ceil_div(Vp, 128) * N));
    return s;
}
#endif

}  // namespace

size_t lm_head_loss_scratch_floats(int N, int C, int Vp) {
    return 2 * up4(N) + up4((size_t)N + 1) + up4((size_t)ceil_div(Vp, 128) * N) + up4(((size_t)N * C + 1) / 2);
}

int lm_head_set_fused(int mode) {
    return g_fused.set(mode < 0 ? mode : mode ? 1 : 0);
}

void lm_head_loss(float* losses, bf16* dhidden, bf16* dweight, bf16* logits, const bf16* hidden, const bf16* weight,
                  const int* targets, float dloss, int N, int C, int V, int Vp, float* scratch, size_t scratch_floats,
                  cudaStream_t stream) {
    require(N >= 0 && C >= 1 && V >= 1 && V <= Vp, "lm_head_loss: need N >= 0, C >= 1, 1 <= V <= Vp");
    require(dloss == 0.f || (dhidden && dweight), "lm_head_loss: dloss != 0 needs dhidden and dweight");
    if (N == 0) return;
#ifdef GPT2CU_HAVE_SM90_GEMM
    // (C <= 12288: fixup's fp32 copy of a hidden row fits the default 48 KB of shared memory)
    const bool fused = g_fused.get() && matmul_sm90_active() && C % 8 == 0 && C <= 12288 &&
                       gemm_sm90_supported(N, Vp, C, {logits, hidden, weight, dhidden, scratch});
#else
    const bool fused = false;
#endif
    if (!fused) {
        matmul_forward(logits, nullptr, hidden, weight, nullptr, nullptr, N, C, Vp, stream);
        fused_classifier(logits, losses, targets, dloss, nullptr, 0.f, nullptr, N, V, Vp, stream);
        if (dloss != 0.f)
            matmul_backward(dhidden, dweight, nullptr, logits, hidden, weight, nullptr, nullptr, nullptr, 0, N, C, Vp,
                            stream);
        return;
    }
#ifdef GPT2CU_HAVE_SM90_GEMM
    require(scratch_floats >= lm_head_loss_scratch_floats(N, C, Vp), "lm_head_loss: scratch too small");
    const Scratch s = carve(scratch, N, C, Vp);
    target_logit_kernel<<<ceil_div(N, kWarpRows), 32 * kWarpRows, 0, stream>>>(s.shift, s.flagged, hidden, weight,
                                                                              targets, N, C);
    CUDA_CHECK_LAUNCH();
    gemm_exp_sm90(logits, s.partials, hidden, weight, s.shift, N, Vp, C, V, stream);
    combine_kernel<<<ceil_div(N, kCombineRows), 256, 0, stream>>>(losses, s.row_scale, s.flagged, logits,
                                                                  s.hidden_scaled, s.partials, hidden, targets, dloss,
                                                                  N, C, Vp, Vp / gemm_sm90_tile_cols(Vp));
    CUDA_CHECK_LAUNCH();
    static int sms = 0;
    if (sms == 0) sms = device_sm_count();
    fixup_kernel<<<sms, 32 * kWarpRows, C * sizeof(float), stream>>>(losses, s.row_scale, s.flagged, logits,
                                                                    s.hidden_scaled, hidden, weight, targets, dloss,
                                                                    C, V, Vp);
    CUDA_CHECK_LAUNCH();
    if (dloss == 0.f) return;
    matmul_backward(dhidden, dweight, nullptr, logits, s.hidden_scaled, weight, nullptr, nullptr, nullptr, 0, N, C, Vp,
                    stream);
    scale_rows_kernel<<<std::min(ceil_div(N * (C / 8), 256), 8 * sms), 256, 0, stream>>>(dhidden, s.row_scale, N, C);
    CUDA_CHECK_LAUNCH();
#endif
}
