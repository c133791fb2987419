// Squared L2 norm of a bf16 gradient buffer, deterministic: out[0] = sum_i grads[i]^2 (fp32).
// Phase 1: a grid of at most GN_BLOCKS blocks (a function of n only, not of the GPU) strides over n
// with 16-byte vectors (scalar head/tail: any n, any offset); each thread keeps an fp32 sum, the
// block adds its threads in a fixed tree and writes one partial. Phase 2: one block adds the partials
// in a fixed tree into out[0]. 1024 blocks of 256 threads fill an H100 (132 SMs x 8) in one wave.
#include "common.cuh"

constexpr int GN_THREADS = 256;
constexpr int GN_BLOCKS = 1024;
constexpr int GN_FINAL_THREADS = 1024;

template <int V>
__global__ void __launch_bounds__(GN_THREADS)
    global_norm_partial_kernel(float* __restrict__ partials, const bf16* __restrict__ grads, size_t n, size_t head) {
    float acc = 0.0f;
    for_each_vector<V>(n, head, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const Vec<bf16, W> g = load_vec_cs<W>(grads + i);
#pragma unroll
        for (int k = 0; k < W; k++) acc += (float)g[k] * (float)g[k];
    });
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(GN_FINAL_THREADS)
    global_norm_final_kernel(float* __restrict__ out, const float* __restrict__ partials, int count) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < count; i += GN_FINAL_THREADS) acc += partials[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc;
}

static int global_norm_blocks(size_t n) {
    const size_t blocks = ceil_div(ceil_div(n, (size_t)8), (size_t)GN_THREADS);
    return blocks < 1 ? 1 : blocks > GN_BLOCKS ? GN_BLOCKS : (int)blocks;
}

size_t global_norm_scratch_floats(size_t n) {
    return global_norm_blocks(n);
}

void global_norm_squared(float* out, const bf16* grads, size_t n, float* scratch, size_t scratch_floats,
                         cudaStream_t stream) {
    const int blocks = global_norm_blocks(n);
    require(scratch_floats >= (size_t)blocks, "global_norm_squared: scratch too small");
    const long long head = vector_head(n, grads);
    if (head >= 0)
        global_norm_partial_kernel<8><<<blocks, GN_THREADS, 0, stream>>>(scratch, grads, n, head);
    else
        global_norm_partial_kernel<1><<<blocks, GN_THREADS, 0, stream>>>(scratch, grads, n, 0);
    CUDA_CHECK_LAUNCH();
    global_norm_final_kernel<<<1, GN_FINAL_THREADS, 0, stream>>>(out, scratch, blocks);
    CUDA_CHECK_LAUNCH();
}
