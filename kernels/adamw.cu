// AdamW on one contiguous segment of n elements (a tensor or a ZeRO shard), elementwise:
//   g = grad * grad_scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   w -= lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w)
// w is the fp32 master copy when there is one, else the params themselves. bf16 params get w rounded
// stochastically, so updates below half a bf16 ulp still reach the forward on average (measured closer to
// an fp32-weights PyTorch run than round-to-nearest, docs/perf.md). fp32 params with fp32 gradients (a small
// fp32 tensor such as RL's value head, updated beside the model) are w itself.
// The per-step scalars come from device memory (one captured graph serves every step); adamw_scalars_clipped
// writes them there from the gradients' norm, so the clip and the skip of a non-finite step need no host read.
// Stochastic rounding adds 16 random bits below the bf16 mantissa and truncates: the value rounds up
// with probability equal to the dropped fraction. The bits hash (seed, element index in the segment).
// Memory bound (28 bytes per element with a master copy): 8 elements per thread with 16-byte accesses
// once every array is 16-byte aligned (for_each_vector's scalar head handles a segment that starts at
// any offset, its tail any n); if the arrays cannot be aligned together, 1 element per thread.
#include <math.h>
#include <type_traits>
#include "common.cuh"

constexpr int ADAMW_THREADS = 256;

// lowbias32 (C. Wellons): a cheap, well-mixed 32-bit bijection
__device__ __forceinline__ unsigned int mix32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

__device__ __forceinline__ bf16 round_stochastic(float x, unsigned int seed, size_t index) {
    const unsigned int key = mix32(seed ^ ((unsigned int)(index >> 32) * 0x9e3779b9u));
    const unsigned int random = mix32((unsigned int)index ^ key) & 0xffffu;
    const unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return __float2bfloat16_rn(x);  // inf, nan: no dithering
    return __ushort_as_bfloat16((unsigned short)((bits + random) >> 16));
}

template <int V, typename TParam, typename TGrad>
__global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_kernel(TParam* __restrict__ params, float* __restrict__ master, const TGrad* __restrict__ grads,
                 float* __restrict__ m, float* __restrict__ v, size_t n, size_t head,
                 const AdamWScalars* __restrict__ scalars, float beta1, float beta2, float eps, float weight_decay,
                 unsigned int rounding_salt) {
    if (scalars->skip) return;  // the same for every thread: a skipped step changes nothing
    const float lr = scalars->lr, grad_scale = scalars->grad_scale;
    const float b1c = scalars->beta1_correction, b2c = scalars->beta2_correction;
    const unsigned int seed = scalars->seed ^ mix32(rounding_salt);  // tensors get independent dither
    for_each_vector<V>(n, head, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const Vec<TGrad, W> g = load_vec_cs<W>(grads + i);
        Vec<float, W> mm = load_vec_cs<W>(m + i), vv = load_vec_cs<W>(v + i), w;
        if (master) {
            w = load_vec_cs<W>(master + i);
        } else {
            const Vec<TParam, W> p = load_vec_cs<W>(params + i);
#pragma unroll
            for (int k = 0; k < W; k++) w[k] = (float)p[k];
        }
        Vec<TParam, W> p;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float grad = (float)g[k] * grad_scale;
            mm[k] = beta1 * mm[k] + (1.0f - beta1) * grad;
            vv[k] = beta2 * vv[k] + (1.0f - beta2) * grad * grad;
            const float update = (mm[k] / b1c) / (sqrtf(vv[k] / b2c) + eps) + weight_decay * w[k];
            w[k] -= lr * update;
            if constexpr (std::is_same_v<TParam, float>)
                p[k] = w[k];
            else
                p[k] = round_stochastic(w[k], seed, i + k);
        }
        store_vec_cs<W>(m + i, mm);
        store_vec_cs<W>(v + i, vv);
        if (master) store_vec_cs<W>(master + i, w);
        store_vec_cs<W>(params + i, p);
    });
}

template <typename TParam, typename TGrad>
static void launch_adamw(TParam* params, float* master, const TGrad* grads, float* m, float* v, size_t n,
                         const AdamWScalars* scalars, float beta1, float beta2, float eps, float weight_decay,
                         unsigned int rounding_salt, cudaStream_t stream) {
    if (n == 0) return;
    const long long head = vector_head(n, params, grads, master, m, v);
    if (head >= 0)
        adamw_kernel<8><<<elementwise_blocks(n, 8, ADAMW_THREADS), ADAMW_THREADS, 0, stream>>>(
            params, master, grads, m, v, n, head, scalars, beta1, beta2, eps, weight_decay, rounding_salt);
    else
        adamw_kernel<1><<<elementwise_blocks(n, 1, ADAMW_THREADS), ADAMW_THREADS, 0, stream>>>(
            params, master, grads, m, v, n, 0, scalars, beta1, beta2, eps, weight_decay, rounding_salt);
    CUDA_CHECK_LAUNCH();
}

void adamw_update(bf16* params, float* master, const bf16* grads, float* m, float* v, size_t n,
                  const AdamWScalars* scalars, float beta1, float beta2, float eps, float weight_decay,
                  unsigned int rounding_salt, cudaStream_t stream) {
    launch_adamw(params, master, grads, m, v, n, scalars, beta1, beta2, eps, weight_decay, rounding_salt, stream);
}

void adamw_update(float* params, const float* grads, float* m, float* v, size_t n, const AdamWScalars* scalars,
                  float beta1, float beta2, float eps, float weight_decay, cudaStream_t stream) {
    launch_adamw(params, (float*)nullptr, grads, m, v, n, scalars, beta1, beta2, eps, weight_decay, 0u, stream);
}

__global__ void adamw_scalars_clipped_kernel(AdamWScalars* out, float lr, float beta1_correction,
                                             float beta2_correction, unsigned int seed,
                                             const float* __restrict__ norm_squared, const float* __restrict__ loss,
                                             double max_norm) {
    const float norm = sqrtf(norm_squared[0]);  // IEEE sqrt (no fast math): the host's np.sqrt of the float32
    const bool finite = isfinite(norm) && (loss == nullptr || isfinite(loss[0]));
    out->lr = lr;
    out->grad_scale = (double)norm > max_norm ? (float)(max_norm / (double)norm) : 1.0f;
    out->beta1_correction = beta1_correction;
    out->beta2_correction = beta2_correction;
    out->seed = seed;
    out->skip = finite ? 0u : 1u;
}

void adamw_scalars_clipped(AdamWScalars* out, float lr, float beta1_correction, float beta2_correction,
                           unsigned int seed, const float* norm_squared, const float* loss, double max_norm,
                           cudaStream_t stream) {
    adamw_scalars_clipped_kernel<<<1, 1, 0, stream>>>(out, lr, beta1_correction, beta2_correction, seed,
                                                      norm_squared, loss, max_norm);
    CUDA_CHECK_LAUNCH();
}
