// SwiGLU (LLaMA's MLP activation), elementwise over N rows of H outputs, fp32 math on bf16 storage.
//   inp (N, 2H) = [gate | up]  (the MLP's first matmul stacks gate_proj's rows on up_proj's),
//   out (N, H) = silu(gate) * up,   silu(g) = g sig(g),   sig(g) = 1 / (1 + exp(-g));
//   dinp (N, 2H) = [dgate | dup]:   dgate = dout * up * sig(g) (1 + g (1 - sig(g))),   dup = dout * silu(g).
// exp overflow (g < -88) gives sig = 1/inf = 0, the right limit, and no NaN: 0 * g = 0.
// Memory bound: a thread handles 8 consecutive outputs of a row (16-byte vectors of gate, up, out) when
// H % 8 == 0 and every pointer is 16-byte aligned (for_each_vector with no scalar head: a vector then never
// crosses a row), else one element at a time. The backward may run in place on its input (dinp == inp):
// each thread reads its gate and up before writing their gradients.
#include "common.cuh"

constexpr int SWIGLU_THREADS = 256;
constexpr float NEG_LOG2E = -1.4426950408889634f;  // exp(-g) = exp2(-log2(e) g)

__device__ __forceinline__ float sigmoid(float g) {
    return __fdividef(1.0f, 1.0f + exp2f(NEG_LOG2E * g));
}

// element i of the (N, H) output: its gate is at row * 2H + col of the input, its up H further
__device__ __forceinline__ size_t gate_index(size_t i, int H) {
    return (i / H) * 2 * H + i % H;
}

template <int V>
__global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_forward_kernel(bf16* __restrict__ out, const bf16* __restrict__ inp, size_t n, int H) {
    for_each_vector<V>(n, 0, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const size_t gi = gate_index(i, H);
        const Vec<bf16, W> g = load_vec_cs<W>(inp + gi), u = load_vec_cs<W>(inp + gi + H);
        Vec<bf16, W> y;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float gk = (float)g[k];
            y[k] = __float2bfloat16_rn(gk * sigmoid(gk) * (float)u[k]);
        }
        store_vec<W>(out + i, y);
    });
}

// no __restrict__ on dinp/inp: they may alias
template <int V>
__global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_backward_kernel(bf16* dinp, const bf16* __restrict__ dout, const bf16* inp, size_t n, int H) {
    for_each_vector<V>(n, 0, [&](size_t i, auto width) {
        constexpr int W = decltype(width)::value;
        const size_t gi = gate_index(i, H);
        const Vec<bf16, W> g = load_vec_cs<W>(inp + gi), u = load_vec_cs<W>(inp + gi + H);
        const Vec<bf16, W> d = load_vec_cs<W>(dout + i);
        Vec<bf16, W> dg, du;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const float gk = (float)g[k], dk = (float)d[k], sig = sigmoid(gk);
            dg[k] = __float2bfloat16_rn(dk * (float)u[k] * sig * (1.0f + gk * (1.0f - sig)));
            du[k] = __float2bfloat16_rn(dk * gk * sig);
        }
        store_vec<W>(dinp + gi, dg);
        store_vec<W>(dinp + gi + H, du);
    });
}

// 8-wide vectors need rows of whole vectors and aligned pointers (the second half of a row is then too)
template <class... P>
static bool vectorizable(int H, const P*... ptrs) {
    return H % 8 == 0 && ((reinterpret_cast<uintptr_t>(ptrs) % 16 == 0) && ...);
}

void swiglu_forward(bf16* out, const bf16* inp, int N, int H, cudaStream_t stream) {
    require(N >= 0 && H > 0, "swiglu_forward: bad sizes");
    const size_t n = (size_t)N * H;
    if (n == 0) return;
    if (vectorizable(H, out, inp))
        swiglu_forward_kernel<8><<<elementwise_blocks(n, 8, SWIGLU_THREADS), SWIGLU_THREADS, 0, stream>>>(
            out, inp, n, H);
    else
        swiglu_forward_kernel<1><<<elementwise_blocks(n, 1, SWIGLU_THREADS), SWIGLU_THREADS, 0, stream>>>(
            out, inp, n, H);
    CUDA_CHECK_LAUNCH();
}

void swiglu_backward(bf16* dinp, const bf16* dout, const bf16* inp, int N, int H, cudaStream_t stream) {
    require(N >= 0 && H > 0, "swiglu_backward: bad sizes");
    const size_t n = (size_t)N * H;
    if (n == 0) return;
    if (vectorizable(H, dinp, dout, inp))
        swiglu_backward_kernel<8><<<elementwise_blocks(n, 8, SWIGLU_THREADS), SWIGLU_THREADS, 0, stream>>>(
            dinp, dout, inp, n, H);
    else
        swiglu_backward_kernel<1><<<elementwise_blocks(n, 1, SWIGLU_THREADS), SWIGLU_THREADS, 0, stream>>>(
            dinp, dout, inp, n, H);
    CUDA_CHECK_LAUNCH();
}
