// Rotary position embedding (RoPE) on the packed qkv (B, T, (NH + 2 NKV) HS) = [q heads | k heads | v heads],
// pairing channel i < HS/2 of a head with channel i + HS/2 (transformers' rotate_half convention):
//   forward:  at position t, (x_i, x_{i+HS/2}) -> (x_i cos - x_{i+HS/2} sin, x_{i+HS/2} cos + x_i sin),
//             cos = cos[t, i], sin = sin[t, i]: fp32 tables (T, HS/2) (numpy_llama_ops.rope_tables);
//   backward: the transpose of that rotation, the rotation by -angle: the same with sin negated.
// q and k heads are rotated; v heads are copied, unless out == inp: the op may run in place (the model
// rotates its qkv buffer: nothing later needs the unrotated q and k), and then v costs no traffic.
//
// Memory bound. A thread rotates 8 consecutive pairs of one head: a 16-byte vector from each half, and
// 8 cos and 8 sin (two float4 each). Consecutive threads take consecutive vectors of a row, so a warp's
// loads are contiguous. Requires HS % 16 == 0 (LLaMA heads are 64 or 128) and 16-byte aligned pointers.
// A thread reads both halves before it writes them, so out may alias inp (no __restrict__ on those).
#include "common.cuh"

constexpr int ROPE_THREADS = 256;
constexpr int ROPE_PAIRS = 8;  // pairs per thread: one x128 from each half of a head

template <bool INVERSE>
__global__ void __launch_bounds__(ROPE_THREADS)
    rope_kernel(bf16* out, const bf16* inp, const float* __restrict__ cos, const float* __restrict__ sin, int N,
                int T, int rotated_heads, int heads, int HS, int width) {
    const int vectors = HS / (2 * ROPE_PAIRS);  // per half head
    const size_t units = (size_t)N * heads * vectors;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t u = blockIdx.x * (size_t)blockDim.x + threadIdx.x; u < units; u += stride) {
        const int vec = (int)(u % vectors);
        const size_t row_head = u / vectors;
        const int head = (int)(row_head % heads);
        const size_t row = row_head / heads;
        bf16* dst = out + row * width + head * HS + vec * ROPE_PAIRS;
        const bf16* src = inp + row * width + head * HS + vec * ROPE_PAIRS;
        const x128 a = load128cs(src), b = load128cs(src + HS / 2);
        if (head >= rotated_heads) {  // a v head, copied
            store128(dst, a);
            store128(dst + HS / 2, b);
            continue;
        }
        const size_t angle = (size_t)(row % T) * (HS / 2) + vec * ROPE_PAIRS;
        const Vec<float, 8> c = load_vec<8>(cos + angle), s = load_vec<8>(sin + angle);
        x128 ra, rb;
#pragma unroll
        for (int k = 0; k < ROPE_PAIRS; k++) {
            const float sk = INVERSE ? -s[k] : s[k];
            ra[k] = __float2bfloat16_rn((float)a[k] * c[k] - (float)b[k] * sk);
            rb[k] = __float2bfloat16_rn((float)b[k] * c[k] + (float)a[k] * sk);
        }
        store128(dst, ra);
        store128(dst + HS / 2, rb);
    }
}

template <bool INVERSE>
static void rope_launch(bf16* out, const bf16* inp, const float* cos, const float* sin, int B, int T, int NH,
                        int NKV, int HS, cudaStream_t stream) {
    require(B >= 0 && T >= 0 && NH > 0 && NKV > 0, "rope: bad sizes");
    require(HS > 0 && HS % (2 * ROPE_PAIRS) == 0, "rope: the head size must be a positive multiple of 16");
    for (const void* p : {(const void*)out, (const void*)inp, (const void*)cos, (const void*)sin})
        require(reinterpret_cast<uintptr_t>(p) % 16 == 0, "rope: pointers must be 16-byte aligned");
    const int N = B * T;
    if (N == 0) return;
    const int rotated_heads = NH + NKV;
    const int heads = out == inp ? rotated_heads : rotated_heads + NKV;
    const size_t units = (size_t)N * heads * (HS / (2 * ROPE_PAIRS));
    rope_kernel<INVERSE><<<elementwise_blocks(units, 1, ROPE_THREADS), ROPE_THREADS, 0, stream>>>(
        out, inp, cos, sin, N, T, rotated_heads, heads, HS, (NH + 2 * NKV) * HS);
    CUDA_CHECK_LAUNCH();
}

void rope_forward(bf16* out, const bf16* inp, const float* cos, const float* sin, int B, int T, int NH, int NKV,
                  int HS, cudaStream_t stream) {
    rope_launch<false>(out, inp, cos, sin, B, T, NH, NKV, HS, stream);
}

void rope_backward(bf16* dinp, const bf16* dout, const float* cos, const float* sin, int B, int T, int NH, int NKV,
                   int HS, cudaStream_t stream) {
    rope_launch<true>(dinp, dout, cos, sin, B, T, NH, NKV, HS, stream);
}
