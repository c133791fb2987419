// Decode attention: one new query per sequence against that sequence's cached keys and values (the KV-cache
// decoders, gpt2cu/kv_cache.py and gpt2cu/rl/rollout.py). For sequence b and query head h, with kv head
// g = h / (NH / NKV), keys k_j and values v_j (positions j = 0..n-1 of b's cache) and q = row n-1's head h:
//   s_j = (q . k_j) / sqrt(HS),   p_j = exp(s_j - max_j s_j) / sum_j exp(s_j - max_j s_j)
//   out[b, h*HS + d] = sum_j p_j v_j[d]
// fp32 arithmetic on bf16 inputs, the output rounded to bf16 once. The cache is the packed qkv layout
// (QkvLayout, common.cuh); sequences start `seq_stride` elements apart (the decoders keep `capacity`
// positions per sequence and pass the first n).
//
// One block per (sequence, query head), three passes over shared memory: thread j computes the scores of
// keys j, j + blockDim, ... (a whole key row per thread, 16-byte loads), the block's max and sum of
// exponentials follow, then threads split into blockDim/HS groups of HS, one output channel each, the
// groups taking interleaved keys (warps read whole value rows), and the groups' partial sums are added in
// a fixed order. No split of the keys across blocks: B*NH blocks (192 at B=16 for GPT-2 small) already
// cover the SMs, and a rollout's n is a few hundred to a few thousand positions.
#include "common.cuh"

constexpr int DECODE_THREADS = 256;

// VEC: bf16 elements per load of a key row: 8 (HS % 8 == 0 and 16-byte aligned rows) or 1
template <int VEC>
__global__ void __launch_bounds__(DECODE_THREADS)
    decode_attention_kernel(bf16* __restrict__ out, const bf16* __restrict__ qkv, long long seq_stride, int n,
                            QkvLayout lay, float scale) {
    extern __shared__ float smem[];  // q (HS) | scores, then probabilities (n) | partial outputs (blockDim)
    const int HS = lay.HS, W = lay.row_stride();
    const int b = blockIdx.x / lay.NH, h = blockIdx.x % lay.NH, g = lay.kv_head(h);
    float* q = smem;
    float* p = smem + HS;
    float* partial = p + n;
    const bf16* seq = qkv + b * seq_stride;
    const bf16* keys = seq + lay.k(g);
    const bf16* values = seq + lay.v(g);
    for (int d = threadIdx.x; d < HS; d += blockDim.x) q[d] = (float)seq[(size_t)(n - 1) * W + lay.q(h) + d];
    __syncthreads();

    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const bf16* k = keys + (size_t)j * W;
        float dot = 0.0f;
        for (int d = 0; d < HS; d += VEC) {
            const Vec<bf16, VEC> kv = load_vec<VEC>(k + d);
#pragma unroll
            for (int i = 0; i < VEC; i++) dot += q[d + i] * (float)kv[i];
        }
        p[j] = dot * scale;
        m = fmaxf(m, dot * scale);
    }
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        p[j] = expf(p[j] - m);
        sum += p[j];
    }
    const float inv_sum = 1.0f / block_sum(sum);  // block_sum's barriers also publish every p[j]

    const int groups = blockDim.x / HS, group = threadIdx.x / HS, d = threadIdx.x % HS;
    if (group < groups) {
        float acc = 0.0f;
#pragma unroll 8  // independent loads in flight: a thread walks n / groups value rows
        for (int j = group; j < n; j += groups) acc += p[j] * (float)values[(size_t)j * W + d];
        partial[threadIdx.x] = acc;
    }
    __syncthreads();
    if (threadIdx.x < HS) {
        float o = 0.0f;
        for (int k = 0; k < groups; k++) o += partial[k * HS + threadIdx.x];
        out[((size_t)b * lay.NH + h) * HS + threadIdx.x] = __float2bfloat16_rn(o * inv_sum);
    }
}

void decode_attention(bf16* out, const bf16* qkv, long long seq_stride, int B, int n, int NH, int NKV, int HS,
                      cudaStream_t stream) {
    require(B >= 0 && n >= 1 && NH > 0 && NKV > 0 && NH % NKV == 0, "decode_attention: bad sizes");
    require(HS >= 1 && HS <= DECODE_THREADS, "decode_attention: the head size must be in 1..256");
    const QkvLayout lay{NH, NKV, HS};
    require(seq_stride >= (long long)n * lay.row_stride(), "decode_attention: sequences overlap");
    if (B == 0) return;
    const size_t smem = (size_t)(HS + n + DECODE_THREADS) * sizeof(float);
    const bool vec8 = HS % 8 == 0 && lay.row_stride() % 8 == 0 && seq_stride % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
    auto launch = [&](auto kernel) {
        if (smem > 48 * 1024) {  // long caches: opt in to more shared memory (n up to ~50K floats on sm_80/90)
            int device = 0, max_smem = 0;
            CUDA_CHECK(cudaGetDevice(&device));
            CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
            require(smem + 1024 <= (size_t)max_smem, "decode_attention: n too large for shared memory");
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        }
        kernel<<<B * NH, DECODE_THREADS, smem, stream>>>(out, qkv, seq_stride, n, lay, 1.0f / sqrtf((float)HS));
        CUDA_CHECK_LAUNCH();
    };
    if (vec8)
        launch(decode_attention_kernel<8>);
    else
        launch(decode_attention_kernel<1>);
}
