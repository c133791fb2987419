// A scalar head on a final norm's output (gpt2cu/rl/reward_model.py: the reward model, PPO's value head):
//   values[i] = sum_c x[i, c] w[c] + b,   head = [w (C) | b] fp32, x (N, C) bf16
// Optional, PPO's clipped value loss of each row from its terms (old value o, return R, weight a) and clip
// (numpy_ops.clipped_value_loss is the reference):
//   vc = o + clamp(v - o, -clip, clip);  loss = 0.5 max((v - R)^2, (vc - R)^2)
//   losses[i] = a loss;  values[i] is overwritten by scale * a * d loss / d v
// (as the fused classifier leaves its gradient in the logits), which is what the backward takes:
//   dinp[i, c] += dvalues[i] w[c]   (the sum in fp32, rounded to nearest even)
//   dhead += [sum_i dvalues[i] x[i, :] | sum_i dvalues[i]]   (fp32, deterministic)
// Forward: one warp per row, the row in registers (common.cuh's row helpers): value, loss and gradient in
// one read of x. A row of weight a = 0 (PPO: every position outside the completions) has loss 0 and
// gradient 0 whatever its value, so with terms it is not read at all; the backward skips rows with
// dvalues[i] = 0 likewise (adding 0 changes neither dinp nor dhead). At T = 512 with 32 new tokens that
// leaves ~1/16 of the rows to read.
// Backward: SH_WARPS warps of a block take SH_ROWS_PER_BLOCK rows, interleaved; each lane sums
// dvalues[i] x[i, c] over its rows for its channels; the block adds its warps in order into one fp32
// partial row of scratch [C | 1], and column_sum_add adds the partial rows in order into dhead.
#include "common.cuh"

constexpr int SH_WARPS = 8;
constexpr int SH_THREADS = 32 * SH_WARPS;
constexpr int SH_ROWS_PER_WARP = 4;
constexpr int SH_ROWS_PER_BLOCK = SH_WARPS * SH_ROWS_PER_WARP;

// loss and d loss / d v of one row (the header's formula); the gradient is that of the larger square
// (the clipped one's is 0 outside the clip range)
__device__ __forceinline__ void clipped_value_loss(float v, float old, float ret, float clip, float& loss,
                                                   float& grad) {
    const float vc = old + fminf(fmaxf(v - old, -clip), clip);
    const float plain = (v - ret) * (v - ret), clipped = (vc - ret) * (vc - ret);
    grad = plain >= clipped ? v - ret : (fabsf(v - old) < clip ? vc - ret : 0.0f);
    loss = 0.5f * fmaxf(plain, clipped);
}

template <int VPL>
__global__ void __launch_bounds__(SH_THREADS)
    scalar_head_forward_kernel(float* __restrict__ values, float* __restrict__ losses, const bf16* __restrict__ inp,
                               const float* __restrict__ head, const float* __restrict__ terms, float clip,
                               float scale, int N, int C) {
    const int lane = threadIdx.x % 32, row = blockIdx.x * SH_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const float weight = terms ? terms[3 * (size_t)row + 2] : 1.0f;
    if (weight == 0.0f) {
        if (lane == 0) values[row] = losses[row] = 0.0f;
        return;
    }
    const int vecs = C / 8;
    x128 x[VPL];
    load_row<VPL>(x, inp, (size_t)row * C, lane, vecs);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < VPL; j++)
        if (lane + 32 * j < vecs) {
            const Vec<float, 8> w = load_vec<8>(head + (lane + 32 * j) * 8);
#pragma unroll
            for (int k = 0; k < 8; k++) s += (float)x[j][k] * w[k];
        }
    const float v = warp_sum(s) + head[C];
    if (lane != 0) return;
    if (!terms) {
        values[row] = v;
        return;
    }
    float loss, grad;
    clipped_value_loss(v, terms[3 * (size_t)row], terms[3 * (size_t)row + 1], clip, loss, grad);
    losses[row] = weight * loss;
    values[row] = scale * weight * grad;
}

template <int VPL>
__global__ void __launch_bounds__(SH_THREADS)
    scalar_head_backward_kernel(bf16* __restrict__ dinp, float* __restrict__ partials,
                                const float* __restrict__ dvalues, const bf16* __restrict__ inp,
                                const float* __restrict__ head, int N, int C) {
    extern __shared__ float warp_sums[];  // [SH_WARPS][C + 1]
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, vecs = C / 8;
    float acc[VPL][8] = {}, acc_bias = 0.0f;
    for (int i = 0; i < SH_ROWS_PER_WARP; i++) {
        const int row = blockIdx.x * SH_ROWS_PER_BLOCK + i * SH_WARPS + warp;
        if (row >= N) break;
        const float d = dvalues[row];
        if (d == 0.0f) continue;
        acc_bias += d;
        const size_t off = (size_t)row * C;
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                const int c = (lane + 32 * j) * 8;
                const x128 x = load128cs(inp + off + c);
                x128 di = load128(dinp + off + c);
                const Vec<float, 8> w = load_vec<8>(head + c);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    acc[j][k] += d * (float)x[k];
                    di[k] = __float2bfloat16_rn((float)di[k] + d * w[k]);
                }
                store128(dinp + off + c, di);
            }
    }
    float* mine = warp_sums + warp * (C + 1);
#pragma unroll
    for (int j = 0; j < VPL; j++)
        if (lane + 32 * j < vecs) {
#pragma unroll
            for (int k = 0; k < 8; k++) mine[(lane + 32 * j) * 8 + k] = acc[j][k];
        }
    if (lane == 0) mine[C] = acc_bias;
    __syncthreads();
    float* dst = partials + (size_t)blockIdx.x * (C + 1);
    for (int c = threadIdx.x; c <= C; c += SH_THREADS) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < SH_WARPS; w++) t += warp_sums[w * (C + 1) + c];
        dst[c] = t;
    }
}

static void check_head(const float* head) {
    require(reinterpret_cast<uintptr_t>(head) % 16 == 0, "scalar_head: head must be 16-byte aligned");
}

void scalar_head_forward(float* values, float* losses, const bf16* inp, const float* head, const float* terms,
                         float clip, float scale, int N, int C, cudaStream_t stream) {
    const int vpl = check_rows(N, C, "scalar_head_forward", {inp});
    check_head(head);
    require(!terms || losses, "scalar_head_forward: terms need losses");
    if (N == 0) return;
    dispatch_row_vectors(vpl, [&](auto v) {
        constexpr int VPL = decltype(v)::value;
        scalar_head_forward_kernel<VPL><<<ceil_div(N, SH_WARPS), SH_THREADS, 0, stream>>>(
            values, losses, inp, head, terms, clip, scale, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

size_t scalar_head_backward_scratch_floats(int N, int C) {
    return (size_t)ceil_div(N, SH_ROWS_PER_BLOCK) * (C + 1);
}

void scalar_head_backward(bf16* dinp, float* dhead, const float* dvalues, const bf16* inp, const float* head,
                          float* scratch, size_t scratch_floats, int N, int C, cudaStream_t stream) {
    const int vpl = check_rows(N, C, "scalar_head_backward", {dinp, inp});
    check_head(head);
    if (N == 0) return;
    require(scratch_floats >= scalar_head_backward_scratch_floats(N, C), "scalar_head_backward: scratch too small");
    const int blocks = ceil_div(N, SH_ROWS_PER_BLOCK);
    const int smem = SH_WARPS * (C + 1) * (int)sizeof(float);  // 24.6 KB at C = 768, 64 KB at 2048
    dispatch_row_vectors(vpl, [&](auto v) {
        constexpr int VPL = decltype(v)::value;
        auto kernel = scalar_head_backward_kernel<VPL>;
        if (smem > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        kernel<<<blocks, SH_THREADS, smem, stream>>>(dinp, scratch, dvalues, inp, head, N, C);
        CUDA_CHECK_LAUNCH();
    });
    column_sum_add(dhead, dhead + C, C, scratch, blocks, C + 1, stream);
}
