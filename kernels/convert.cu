// bf16 <-> fp32 conversion, elementwise (master weights at start-up and resume, exports), and bf16
// accumulation out += x computed in fp32, x bf16 (ZeRO-2/3 add each micro-step's reduced gradient into the
// shard) or fp32 (a bias gradient summed in fp32 by the layernorm backward).
// 8 elements per thread with 16-byte accesses (scalar head/tail for any n and offset).
// Every bf16 result is rounded to nearest even.
#include "common.cuh"

constexpr int CONVERT_THREADS = 256;

template <int V, class To, class From>
__global__ void __launch_bounds__(CONVERT_THREADS)
    convert_kernel(To* __restrict__ out, const From* __restrict__ inp, size_t n, size_t head) {
    for_each_vector<V>(n, head, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const Vec<From, W> x = load_vec_cs<W>(inp + i);
        Vec<To, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) {
            if constexpr (std::is_same_v<To, bf16>)
                y[k] = __float2bfloat16_rn(x[k]);
            else
                y[k] = __bfloat162float(x[k]);
        }
        store_vec<W>(out + i, y);
    });
}

template <class To, class From>
static void convert(To* out, const From* inp, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    const long long head = vector_head(n, out, inp);
    if (head >= 0)
        convert_kernel<8><<<elementwise_blocks(n, 8, CONVERT_THREADS), CONVERT_THREADS, 0, stream>>>(out, inp, n, head);
    else
        convert_kernel<1><<<elementwise_blocks(n, 1, CONVERT_THREADS), CONVERT_THREADS, 0, stream>>>(out, inp, n, 0);
    CUDA_CHECK_LAUNCH();
}

void bf16_to_float(float* out, const bf16* inp, size_t n, cudaStream_t stream) {
    convert(out, inp, n, stream);
}

void float_to_bf16(bf16* out, const float* inp, size_t n, cudaStream_t stream) {
    convert(out, inp, n, stream);
}

template <int V, class From>
__global__ void __launch_bounds__(CONVERT_THREADS)
    accumulate_kernel(bf16* __restrict__ out, const From* __restrict__ x, size_t n, size_t head) {
    for_each_vector<V>(n, head, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const Vec<bf16, W> a = load_vec<W>(out + i);
        const Vec<From, W> b = load_vec_cs<W>(x + i);
        Vec<bf16, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) y[k] = __float2bfloat16_rn(__bfloat162float(a[k]) + (float)b[k]);
        store_vec<W>(out + i, y);
    });
}

template <class From>
static void accumulate(bf16* out, const From* x, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    const long long head = vector_head(n, out, x);
    if (head >= 0)
        accumulate_kernel<8>
            <<<elementwise_blocks(n, 8, CONVERT_THREADS), CONVERT_THREADS, 0, stream>>>(out, x, n, head);
    else
        accumulate_kernel<1><<<elementwise_blocks(n, 1, CONVERT_THREADS), CONVERT_THREADS, 0, stream>>>(out, x, n, 0);
    CUDA_CHECK_LAUNCH();
}

void bf16_accumulate(bf16* out, const bf16* x, size_t n, cudaStream_t stream) {
    accumulate(out, x, n, stream);
}

void bf16_accumulate(bf16* out, const float* x, size_t n, cudaStream_t stream) {
    accumulate(out, x, n, stream);
}
