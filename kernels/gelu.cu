// tanh GeLU, elementwise over n values, fp32 math on bf16 storage; the functions and their formulas are in
// gelu.cuh (shared with the GEMM epilogues of gemm_sm90.cu).
// Memory bound: each thread streams 8-element (16-byte) vectors (for_each_vector: scalar head/tail for
// sizes and offsets that are not multiples of 8). The backward may run in place (dinp == dout): every
// element is read and then written by the same thread.
#include "common.cuh"
#include "gelu.cuh"

constexpr int GELU_THREADS = 256;

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
            d[k] = __float2bfloat16_rn((float)g[k] * gelu_grad((float)x[k]));
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
