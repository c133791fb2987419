// Fused softmax cross-entropy and its gradient, in place over the logits (N rows of Vp, V real columns).
//   lse = max + log(sum_j exp(x_j - max)),  loss = lse - x[target]
//   dlogits_j = dloss * (exp(x_j - lse) - [j == target]) for j < V, 0 for V <= j < Vp
// One block of 1024 threads per row (a row of Vp = 50304 bf16 is 6288 16-byte vectors, ~6 per thread).
// Pass 1 keeps a per-thread online (max, sum of exp) over the vectors covering the first V columns
// (the last, partial one masks columns >= V with -inf), combined across the block in a fixed tree.
// It walks the row from the end, so the row's beginning is the most recently read when pass 2 walks
// it from the start: with ~264 rows (26 MB) in flight on an H100, pass 2's reads mostly hit L2.
// Pass 1 loads normally (to keep the row in L2); pass 2 is the last use of the logits and writes the
// gradient with streaming (evict-first) loads and stores. Targets < 0: loss 0, a zero row (not read).
// Exponentials are exp2f((x - max) * log2 e), one MUFU op each.
// Optional, for policy-gradient losses (gpt2cu/rl): a row's dlogits are scaled by a weight computed from
// the row's own log p = x[target] - lse and its policy terms (old log p, advantage A, reference log p, KL
// coefficient k), between pass 1 and pass 2, so the LM head runs once per update and no weights cross to
// the host (numpy_ops.policy_weights is the reference):
//   r = exp(log p - old);  w = r * A unless (A > 0 and r > 1 + clip) or (A < 0 and r < 1 - clip), then 0;
//   w -= k * (1 - exp(ref - log p)) when k != 0          (PPO's clipped surrogate, GRPO's KL term)
// Every thread reads x[target] and computes the same w. The row's entropy -sum p log p = lse - sum p x
// comes from a third running sum, sum exp(x - max) * x, kept beside (max, sum) in pass 1 (a template
// flag: the pretraining kernel does no extra work).
// Vp not a multiple of 8 (or unaligned logits) runs the same code with 1-column vectors.
#include <math.h>
#include "common.cuh"

constexpr int CLS_THREADS = 1024;
constexpr float LOG2E = 1.4426950408889634f;

struct MaxSum {
    float max, sum, dot;  // running max, sum of exp(x - max), and sum of exp(x - max) * x (entropy only)
};

// commutative (bitwise: max and + are), so the xor butterflies agree across lanes
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.max, b.max);
    const float fa = a.max == -INFINITY ? 0.0f : exp2f((a.max - m) * LOG2E);
    const float fb = b.max == -INFINITY ? 0.0f : exp2f((b.max - m) * LOG2E);
    return {m, a.sum * fa + b.sum * fb, a.dot * fa + b.dot * fb};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = combine(v, {__shfl_xor_sync(FULL_MASK, v.max, o), __shfl_xor_sync(FULL_MASK, v.sum, o),
                        __shfl_xor_sync(FULL_MASK, v.dot, o)});
    return v;
}

__device__ __forceinline__ MaxSum block_combine(MaxSum v) {
    __shared__ MaxSum warp_vals[CLS_THREADS / 32];
    __shared__ MaxSum total;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_combine(v);
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_combine(warp_vals[lane]);  // CLS_THREADS / 32 == 32 warps
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// -d loss / d log p of one row (the header comment's w); t = the row's 4 policy terms
__device__ __forceinline__ float policy_weight(float logp, const float* t, float clip) {
    const float old = t[0], adv = t[1], ref = t[2], kl = t[3];
    const float ratio = expf(logp - old);
    const bool clipped = (adv > 0.0f && ratio > 1.0f + clip) || (adv < 0.0f && ratio < 1.0f - clip);
    float w = clipped ? 0.0f : ratio * adv;
    if (kl != 0.0f) w -= kl * (1.0f - expf(ref - logp));
    return w;
}

template <int VW, bool ENTROPY>
__global__ void __launch_bounds__(CLS_THREADS, 2)
    fused_classifier_kernel(bf16* __restrict__ logits, float* __restrict__ losses, const int* __restrict__ targets,
                            float dloss, const float* __restrict__ policy, float clip, float* __restrict__ entropy,
                            int V, int Vp) {
    static_assert(CLS_THREADS == 1024, "block_combine reads one value per warp into one warp");
    const int tid = threadIdx.x;
    bf16* x = logits + (size_t)blockIdx.x * Vp;
    const int target = targets[blockIdx.x];
    const int vecs = Vp / VW;

    if (target < 0) {
        if (tid == 0) {
            losses[blockIdx.x] = 0.0f;
            if (ENTROPY) entropy[blockIdx.x] = 0.0f;
        }
        if (dloss != 0.0f) {
            Vec<bf16, VW> zero;
#pragma unroll
            for (int k = 0; k < VW; k++) zero[k] = __float2bfloat16_rn(0.0f);
            for (int i = tid; i < vecs; i += CLS_THREADS) store_vec_cs<VW>(x + i * VW, zero);
        }
        return;
    }
    // read before the barrier in block_combine: after it, other threads overwrite the row
    const float target_logit = tid == 0 || policy ? (float)x[target] : 0.0f;

    MaxSum ms = {-INFINITY, 0.0f, 0.0f};
    for (int i = ceil_div(V, VW) - 1 - tid; i >= 0; i -= CLS_THREADS) {
        const Vec<bf16, VW> xv = load_vec<VW>(x + i * VW);
        float f[VW], vmax = -INFINITY;
#pragma unroll
        for (int k = 0; k < VW; k++) {
            f[k] = i * VW + k < V ? (float)xv[k] : -INFINITY;
            vmax = fmaxf(vmax, f[k]);
        }
        if (vmax > ms.max) {
            const float rescale = exp2f((ms.max - vmax) * LOG2E);  // 0 on the first vector (max = -inf)
            ms.sum *= rescale;
            if (ENTROPY) ms.dot *= rescale;
            ms.max = vmax;
        }
#pragma unroll
        for (int k = 0; k < VW; k++) {
            const float e = exp2f((f[k] - ms.max) * LOG2E);
            ms.sum += e;
            if (ENTROPY && f[k] != -INFINITY) ms.dot += e * f[k];  // masked columns: 0 * -inf would be NaN
        }
    }
    ms = block_combine(ms);

    const float lse = ms.max + logf(ms.sum);
    if (tid == 0) {
        losses[blockIdx.x] = lse - target_logit;
        if (ENTROPY) entropy[blockIdx.x] = lse - ms.dot / ms.sum;
    }
    if (dloss == 0.0f) return;
    const float row_dloss =
        policy ? dloss * policy_weight(target_logit - lse, policy + 4 * (size_t)blockIdx.x, clip) : dloss;
    const float scale = row_dloss / ms.sum;
    for (int i = tid; i < vecs; i += CLS_THREADS) {
        Vec<bf16, VW> d;
        if (i * VW < V) {
            const Vec<bf16, VW> xv = load_vec_cs<VW>(x + i * VW);
#pragma unroll
            for (int k = 0; k < VW; k++) {
                const int col = i * VW + k;
                const float p = col < V ? scale * exp2f(((float)xv[k] - ms.max) * LOG2E) : 0.0f;
                d[k] = __float2bfloat16_rn(col == target ? p - row_dloss : p);
            }
        } else {
#pragma unroll
            for (int k = 0; k < VW; k++) d[k] = __float2bfloat16_rn(0.0f);
        }
        store_vec_cs<VW>(x + i * VW, d);
    }
}

template <int VW>
static void launch_classifier(bf16* logits, float* losses, const int* targets, float dloss, const float* policy,
                              float clip, float* entropy, int N, int V, int Vp, cudaStream_t stream) {
    if (entropy)
        fused_classifier_kernel<VW, true>
            <<<N, CLS_THREADS, 0, stream>>>(logits, losses, targets, dloss, policy, clip, entropy, V, Vp);
    else
        fused_classifier_kernel<VW, false>
            <<<N, CLS_THREADS, 0, stream>>>(logits, losses, targets, dloss, policy, clip, entropy, V, Vp);
}

void fused_classifier(bf16* logits, float* losses, const int* targets, float dloss, const float* policy,
                      float clip, float* entropy, int N, int V, int Vp, cudaStream_t stream) {
    require(N >= 0 && V >= 1 && V <= Vp, "fused_classifier: need 1 <= V <= Vp");
    if (N == 0) return;
    if (Vp % 8 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0)
        launch_classifier<8>(logits, losses, targets, dloss, policy, clip, entropy, N, V, Vp, stream);
    else
        launch_classifier<1>(logits, losses, targets, dloss, policy, clip, entropy, N, V, Vp, stream);
    CUDA_CHECK_LAUNCH();
}
