// tanh GeLU, elementwise over n values, fp32 math on bf16 storage.
//   u = sqrt(2/pi) * (x + 0.044715 x^3),  gelu(x) = 0.5 x (1 + tanh u)
//   gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// The tanh is evaluated through 0.5 (1 + tanh u) = sigmoid(2u) = 1 / (1 + exp(-2u)), so
//   gelu(x) = x * sig,   gelu'(x) = sig * (1 + 2 x (1 - sig) du/dx)   (1 - tanh^2 u = 4 sig (1 - sig)),
// the same functions with one exp2 and one fast divide: tanhf would make these kernels compute bound.
// Memory bound: each thread streams 8-element (16-byte) vectors (for_each_vector: scalar head/tail for
// sizes and offsets that are not multiples of 8). The backward may run in place (dinp == dout): every
// element is read and then written by the same thread.
#include "common.cuh"

constexpr int GELU_THREADS = 256;
constexpr float GELU_SCALE = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float GELU_CUBIC = 0.044715f;
constexpr float GELU_EXP2 = -2.302208198144325f;  // -2 * log2(e) * sqrt(2/pi): exp(-2u) = exp2(GELU_EXP2 * ...)

// sigmoid(2u) = 0.5 (1 + tanh u); exp2 overflow gives 1/inf = 0, the right limit
__device__ __forceinline__ float gelu_sigmoid(float x) {
    return __fdividef(1.0f, 1.0f + exp2f(GELU_EXP2 * (x + GELU_CUBIC * x * x * x)));
}

template <int V>
__global__ void __launch_bounds__(GELU_THREADS)
    gelu_forward_kernel(bf16* __restrict__ out, const bf16* __restrict__ inp, size_t n, size_t head) {
    for_each_vector<V>(n, head, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const Vec<bf16, W> x = load_vec_cs<W>(inp + i);
        Vec<bf16, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float v = (float)x[k];
            y[k] = __float2bfloat16_rn(v * gelu_sigmoid(v));
        }
        store_vec<W>(out + i, y);
    });
}

// no __restrict__ on dinp/dout: they may alias
template <int V>
__global__ void __launch_bounds__(GELU_THREADS)
    gelu_backward_kernel(bf16* dinp, const bf16* dout, const bf16* __restrict__ inp, size_t n, size_t head) {
    for_each_vector<V>(n, head, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const Vec<bf16, W> x = load_vec_cs<W>(inp + i);
        const Vec<bf16, W> g = load_vec_cs<W>(dout + i);
        Vec<bf16, W> d;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float v = (float)x[k], sig = gelu_sigmoid(v);
            const float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * v * v);
            const float grad = sig * (1.0f + 2.0f * v * (1.0f - sig) * du);
            d[k] = __float2bfloat16_rn((float)g[k] * grad);
        }
        store_vec<W>(dinp + i, d);
    });
}

void gelu_forward(bf16* out, const bf16* inp, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    const long long head = vector_head(n, out, inp);
    if (head >= 0)
        gelu_forward_kernel<8><<<elementwise_blocks(n, 8, GELU_THREADS), GELU_THREADS, 0, stream>>>(out, inp, n, head);
    else
        gelu_forward_kernel<1><<<elementwise_blocks(n, 1, GELU_THREADS), GELU_THREADS, 0, stream>>>(out, inp, n, 0);
    CUDA_CHECK_LAUNCH();
}

void gelu_backward(bf16* dinp, const bf16* dout, const bf16* inp, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    const long long head = vector_head(n, dinp, dout, inp);
    if (head >= 0)
        gelu_backward_kernel<8><<<elementwise_blocks(n, 8, GELU_THREADS), GELU_THREADS, 0, stream>>>(
            dinp, dout, inp, n, head);
    else
        gelu_backward_kernel<1><<<elementwise_blocks(n, 1, GELU_THREADS), GELU_THREADS, 0, stream>>>(
            dinp, dout, inp, n, 0);
    CUDA_CHECK_LAUNCH();
}
