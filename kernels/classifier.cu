// Fused softmax cross-entropy and its gradient, in place over the logits (N rows of Vp, V real columns).
//   lse = max + log(sum_j exp(x_j - max)),  loss = lse - x[target]
//   dlogits_j = dloss * (exp(x_j - lse) - [j == target]) for j < V, 0 for V <= j < Vp
// One block of CLS_THREADS = 512 threads per row, two rows on an SM at a time (56-64 registers); a row of
// Vp = 50304 bf16 is 6288 16-byte vectors, ~12 per thread, loaded CLS_UNROLL = 6 at a time so that each
// thread has 96 bytes in flight (the kernel waits on memory latency, not on instructions: docs/perf.md).
// Pass 1 keeps a per-thread online (max, sum of exp) over the vectors wholly inside the first V columns:
// per group of vectors one max (packed bf16 compares, exact), at most one rescale, then the exps; the
// row's last, partial vector reads its columns >= V as the lowest bf16 (exp 0). The per-thread values
// are combined across the block in a fixed tree (deterministic). Pass 1 walks the row from the end, so
// the row's beginning is the most recently read when pass 2 walks it from the start: with 264 rows
// (26 MB) in flight, pass 2's reads hit L2 (DRAM moves the minimum bytes). Pass 1 loads normally (to
// keep the row in L2); pass 2 is the last use of the logits and writes the gradient with streaming
// (evict-first) loads and stores. Targets < 0: loss 0, a zero row (not read).
// Exponentials are base 2 on the special-function unit (ex2.approx.ftz: results under 2^-126 flush to 0):
// with mL = max * log2 e, exp(x - max) = 2^(x * log2 e - mL), one FFMA and one MUFU a column. Pass 2
// folds the row's scale dloss / sum into the exponent, dlogits_j = sign(dloss) * 2^(x_j * log2 e - c)
// with c = mL + log2(sum / |dloss|), and the target's column is fixed after the sweep (the thread that
// wrote its vector rewrites that element), so the sweep has no compares or multiplies. bf16 -> fp32 is a
// shift (or a mask) of each 32-bit pair; fp32 -> bf16 one packed conversion a pair.
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

constexpr int CLS_THREADS = 512, CLS_BLOCKS_PER_SM = 2, CLS_UNROLL = 6;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

struct MaxSum {
    float max, sum, dot;  // running max, sum of 2^(x log2e - max log2e), and sum of those times x (entropy)
};

// Commutative bitwise (max, and the rounded products and sum: no FMA contraction), so the xor
// butterflies agree across lanes.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.max, b.max), mL = m * LOG2E;
    const float fa = a.max == -INFINITY ? 0.0f : fast_exp2(a.max * LOG2E - mL);
    const float fb = b.max == -INFINITY ? 0.0f : fast_exp2(b.max * LOG2E - mL);
    return {m, __fadd_rn(__fmul_rn(a.sum, fa), __fmul_rn(b.sum, fb)),
            __fadd_rn(__fmul_rn(a.dot, fa), __fmul_rn(b.dot, fb))};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = combine(v, {__shfl_xor_sync(FULL_MASK, v.max, o), __shfl_xor_sync(FULL_MASK, v.sum, o),
                        __shfl_xor_sync(FULL_MASK, v.dot, o)});
    return v;
}

// One barrier: every warp combines the per-warp values itself (the same tree, so the same bits).
__device__ __forceinline__ MaxSum block_combine(MaxSum v) {
    static_assert(CLS_THREADS % 32 == 0 && CLS_THREADS <= 1024, "one value per warp, combined in one warp");
    constexpr int WARPS = CLS_THREADS / 32;
    __shared__ MaxSum warp_vals[WARPS];
    const int lane = threadIdx.x % 32;
    v = warp_combine(v);
    if (lane == 0) warp_vals[threadIdx.x / 32] = v;
    __syncthreads();
    return warp_combine(lane < WARPS ? warp_vals[lane] : MaxSum{-INFINITY, 0.0f, 0.0f});
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

// the VW columns of a vector in fp32: a bf16 is the high half of its fp32
template <int VW>
__device__ __forceinline__ void unpack(const Vec<bf16, VW>& v, float (&f)[VW]) {
    if constexpr (VW % 2 == 0) {
#pragma unroll
        for (int j = 0; j < VW / 2; j++) {
            const uint32_t w = reinterpret_cast<const uint32_t*>(&v)[j];
            f[2 * j] = __uint_as_float(w << 16);
            f[2 * j + 1] = __uint_as_float(w & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int k = 0; k < VW; k++) f[k] = __bfloat162float(v[k]);
    }
}

// max over N vectors, in bf16 pairs (exact: a max picks one of its inputs)
template <int N, int VW>
__device__ __forceinline__ float group_max(const Vec<bf16, VW> (&v)[N]) {
    if constexpr (VW % 2 == 0) {
        __nv_bfloat162 m = reinterpret_cast<const __nv_bfloat162*>(&v[0])[0];
#pragma unroll
        for (int j = 0; j < N; j++)
#pragma unroll
            for (int k = j == 0 ? 1 : 0; k < VW / 2; k++)
                m = __hmax2(m, reinterpret_cast<const __nv_bfloat162*>(&v[j])[k]);
        return fmaxf(__low2float(m), __high2float(m));
    } else {
        float m = -INFINITY;
#pragma unroll
        for (int j = 0; j < N; j++)
#pragma unroll
            for (int k = 0; k < VW; k++) m = fmaxf(m, __bfloat162float(v[j][k]));
        return m;
    }
}

// Adds N vectors to the running (max, sum, dot); mL = ms.max * LOG2E beside it.
template <bool ENTROPY, int N, int VW>
__device__ __forceinline__ void accumulate(MaxSum& ms, float& mL, const Vec<bf16, VW> (&v)[N]) {
    const float vmax = group_max(v);
    if (vmax > ms.max) {
        const float vmL = vmax * LOG2E;
        const float rescale = fast_exp2(mL - vmL);  // 0 on the first group (mL = -inf)
        ms.sum *= rescale;
        if (ENTROPY) ms.dot *= rescale;
        ms.max = vmax;
        mL = vmL;
    }
    float s[2] = {0.0f, 0.0f}, d[2] = {0.0f, 0.0f};  // two chains of adds, for latency
#pragma unroll
    for (int j = 0; j < N; j++) {
        float f[VW];
        unpack(v[j], f);
#pragma unroll
        for (int k = 0; k < VW; k++) {
            const float e = fast_exp2(fmaf(f[k], LOG2E, -mL));
            s[k % 2] += e;
            if (ENTROPY) d[k % 2] = fmaf(e, f[k], d[k % 2]);  // the lowest bf16 of a masked column: 0 * x = 0
        }
    }
    ms.sum += s[0] + s[1];
    if (ENTROPY) ms.dot += d[0] + d[1];
}

// sign * 2^(x log2e - c) of every column of a vector, rounded to bf16
template <int VW>
__device__ __forceinline__ Vec<bf16, VW> gradient(const Vec<bf16, VW>& v, float c, bool negative) {
    float f[VW];
    unpack(v, f);
#pragma unroll
    for (int k = 0; k < VW; k++) f[k] = fast_exp2(fmaf(f[k], LOG2E, -c));
    Vec<bf16, VW> d;
    if constexpr (VW % 2 == 0) {
        const uint32_t sign = negative ? 0x80008000u : 0u;
#pragma unroll
        for (int j = 0; j < VW / 2; j++)
            reinterpret_cast<uint32_t*>(&d)[j] = pack_bf16x2(f[2 * j], f[2 * j + 1]) ^ sign;
    } else {
#pragma unroll
        for (int k = 0; k < VW; k++) d[k] = __float2bfloat16_rn(negative ? -f[k] : f[k]);
    }
    return d;
}

template <int VW, bool ENTROPY>
__global__ void __launch_bounds__(CLS_THREADS, CLS_BLOCKS_PER_SM)
    fused_classifier_kernel(bf16* __restrict__ logits, float* __restrict__ losses, const int* __restrict__ targets,
                            float dloss, const float* __restrict__ policy, float clip, float* __restrict__ entropy,
                            int V, int Vp) {
    const int tid = threadIdx.x;
    bf16* x = logits + (size_t)blockIdx.x * Vp;
    const int target = targets[blockIdx.x];
    const int vecs = Vp / VW, full = V / VW;  // vectors in the row; those wholly inside the first V columns
    using VecT = Vec<bf16, VW>;

    if (target < 0) {
        if (tid == 0) {
            losses[blockIdx.x] = 0.0f;
            if (ENTROPY) entropy[blockIdx.x] = 0.0f;
        }
        if (dloss != 0.0f) {
            VecT zero;
#pragma unroll
            for (int k = 0; k < VW; k++) zero[k] = __float2bfloat16_rn(0.0f);
            for (int i = tid; i < vecs; i += CLS_THREADS) store_vec_cs<VW>(x + i * VW, zero);
        }
        return;
    }
    // read before the barrier in block_combine: after it, other threads overwrite the row
    const float target_logit = (float)x[target];

    MaxSum ms = {-INFINITY, 0.0f, 0.0f};
    float mL = -INFINITY;
    int i = full - 1 - tid;
    for (; i >= (CLS_UNROLL - 1) * CLS_THREADS; i -= CLS_UNROLL * CLS_THREADS) {
        const bf16* p = x + i * VW;
        VecT v[CLS_UNROLL];
#pragma unroll
        for (int j = 0; j < CLS_UNROLL; j++) v[j] = load_vec<VW>(p - j * CLS_THREADS * VW);
        accumulate<ENTROPY>(ms, mL, v);
    }
    for (; i >= 0; i -= CLS_THREADS) {
        const VecT v[1] = {load_vec<VW>(x + i * VW)};
        accumulate<ENTROPY>(ms, mL, v);
    }
    if (V % VW != 0 && tid == CLS_THREADS - 1) {  // (a thread with the fewest vectors)
        VecT v[1] = {load_vec<VW>(x + full * VW)};
#pragma unroll
        for (int k = 0; k < VW; k++)
            if (full * VW + k >= V) v[0][k] = __ushort_as_bfloat16(0xff7f);  // the lowest finite bf16
        accumulate<ENTROPY>(ms, mL, v);
    }
    ms = block_combine(ms);
    mL = ms.max * LOG2E;

    // the sum is of 2^(x log2e - mL), mL = max log2e - delta (delta: the product's rounding, exact by FMA)
    const float log2_sum = log2f(ms.sum);
    const float lse = ms.max + (log2_sum - fmaf(ms.max, LOG2E, -mL)) * LN2;
    if (tid == 0) {
        losses[blockIdx.x] = lse - target_logit;
        if (ENTROPY) entropy[blockIdx.x] = lse - ms.dot / ms.sum;
    }
    if (dloss == 0.0f) return;
    const float row_dloss =
        policy ? dloss * policy_weight(target_logit - lse, policy + 4 * (size_t)blockIdx.x, clip) : dloss;
    const float c = mL + (log2_sum - log2f(fabsf(row_dloss)));  // row_dloss = 0: c = inf, every 2^(.) = 0
    const bool negative = row_dloss < 0.0f;
    for (i = tid; i + (CLS_UNROLL - 1) * CLS_THREADS < full; i += CLS_UNROLL * CLS_THREADS) {
        bf16* p = x + i * VW;
        VecT v[CLS_UNROLL];
#pragma unroll
        for (int j = 0; j < CLS_UNROLL; j++) v[j] = load_vec_cs<VW>(p + j * CLS_THREADS * VW);
#pragma unroll
        for (int j = 0; j < CLS_UNROLL; j++) store_vec_cs<VW>(p + j * CLS_THREADS * VW, gradient(v[j], c, negative));
    }
    for (; i < full; i += CLS_THREADS) store_vec_cs<VW>(x + i * VW, gradient(load_vec_cs<VW>(x + i * VW), c, negative));
    // the partial vector and the padding: 0 in columns >= V
    for (i = full + tid; i < vecs; i += CLS_THREADS) {
        VecT d;
        if (i * VW < V) d = gradient(load_vec_cs<VW>(x + i * VW), c, negative);
#pragma unroll
        for (int k = 0; k < VW; k++)
            if (i * VW + k >= V) d[k] = __float2bfloat16_rn(0.0f);
        store_vec_cs<VW>(x + i * VW, d);
    }
    // the target's column, p - row_dloss, by the thread that wrote its vector (program order keeps this last)
    const int tv = target / VW;
    if (tid == (tv < full ? tv : tv - full) % CLS_THREADS) {
        const float p = fast_exp2(fmaf(target_logit, LOG2E, -c));
        x[target] = __float2bfloat16_rn((negative ? -p : p) - row_dloss);
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
