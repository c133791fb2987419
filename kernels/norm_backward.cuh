// The backward of a row norm over the last dimension C, LayerNorm's (layernorm.cu) or RMSNorm's (rmsnorm.cu):
//   xhat = (x - mean) * rstd (RMSNorm: mean = 0), dnorm = dout * weight,
//   dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))   (RMSNorm: no mean(dnorm) term),
//   dweight += sum_rows dout * xhat, dbias += sum_rows dout (LayerNorm only),
//   optionally dinp_sum += sum_rows dinp (the new dinp, as stored): dinp is the residual stream's gradient, and
//   its column sum is the bias gradient of the projection that wrote into that stream, summed here where the
//   rows are in registers instead of in another pass over them (bias.cu).
// A block of ceil(C / 256) warps owns NORM_ROWS_PER_BLOCK consecutive rows, and thread v owns channels 8v..8v+7
// of each of them (C / 8 threads busy), so its column sums stay in its registers over the block's rows and the
// block's partial rows are stored without any reduction across threads (the former design, a warp per row with
// per-warp sums in shared memory, spent half its instructions on those sums and fit 12 warps per SM; in one
// process on an H200 at N = 65536, C = 768 this one takes 144.4 us against its 162.0). A row's sums (of dnorm
// and dnorm * xhat) are reduced over the block by a butterfly per warp and the warps' results through shared
// memory (double-buffered: one barrier a row). Partials: one fp32 row per block of [dweight | dbias] (LayerNorm,
// 2C floats) or dweight (RMSNorm, C), and with dinp_sum one row of C floats per block after them; column_sum_add
// then adds them in block order, so the result depends only on N. Requires C % 8 == 0, C <= 2048.
// Loads: each row's slices of dout, inp and dinp are needed before its first reduction, and a block has nothing else
// to do while they come, so the loads alone keep only one row per block in flight (77% of the DRAM floor at
// GPT-2's shape). On sm_90 the bulk copy engine brings them instead: thread 0 copies each row's three slices
// (cp.async.bulk, C * 2 bytes each) into a ring of NORM_RING rows in shared memory, one mbarrier per slot, and
// refills a slot with the row NORM_RING on as soon as the row's barrier shows every thread has read it, so
// NORM_RING rows are in flight per block at no register cost (holding the next row in registers instead cost 36
// registers and 3 of 8 blocks an SM: slower); the block's means and rstds are read into shared memory first, so
// no load is left on a row's path. Elsewhere the threads load their slices themselves, as before.
// The arithmetic is the same either way (same values, same order): the bits do not depend on the path.
#pragma once
#include "common.cuh"
#include "sm90_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define NORM_BWD_BULK 1  // the rows come through the shared ring (device code for sm_90 and later)
#else
#define NORM_BWD_BULK 0
#endif

constexpr int NORM_ROWS_PER_BLOCK = 64;  // one partial row per 64 rows
constexpr int NORM_BWD_MAX_WARPS = 8;    // C <= 2048
constexpr int NORM_RING = 4;             // rows in flight per block on sm_90 (6C bytes each: 18 KB at C = 768)

// dweight (and dbias) sums per block, in floats per channel: LayerNorm 2, RMSNorm 1
template <bool RMS> constexpr int norm_sums = RMS ? 1 : 2;

// The warps' values of one row's sum, added in warp order (the zero slots past the block's warps change nothing)
__device__ __forceinline__ float block_sum(const float (&slots)[NORM_BWD_MAX_WARPS]) {
    static_assert(NORM_BWD_MAX_WARPS == 8, "two float4 reads");
    const float4 a = reinterpret_cast<const float4*>(slots)[0], b = reinterpret_cast<const float4*>(slots)[1];
    return ((((((a.x + a.y) + a.z) + a.w) + b.x) + b.y) + b.z) + b.w;
}

template <bool RMS, bool DINP_SUM>
__global__ void __launch_bounds__(NORM_BWD_MAX_WARPS * 32)
    norm_backward_kernel(bf16* __restrict__ dinp, float* __restrict__ partials, const bf16* __restrict__ dout,
                         const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                         const float* __restrict__ mean, const float* __restrict__ rstd, int N, int C) {
    // per warp: the row's sum of dnorm, of dnorm * xhat; the slots past the block's warps stay 0, so every row adds
    // all NORM_BWD_MAX_WARPS of each (two 16-byte reads) without a loop over the block's warp count
    __shared__ __align__(16) float exchange[2][2][NORM_BWD_MAX_WARPS];
    const int v = threadIdx.x, lane = v % 32, warp = v / 32, warps = blockDim.x / 32;
    const bool owner = v < C / 8;
    const int c = 8 * v;
    const float inv_C = 1.0f / C;
    if (v < 4 * NORM_BWD_MAX_WARPS && v % NORM_BWD_MAX_WARPS >= warps) (&exchange[0][0][0])[v] = 0.0f;
    float w[8], dw[8] = {}, db[8] = {}, di_sum[8] = {};
    if (owner) {
        const x128 wv = load128(weight + c);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = (float)wv[k];
    }
    const int row0 = blockIdx.x * NORM_ROWS_PER_BLOCK, rows = min(NORM_ROWS_PER_BLOCK, N - row0);
#if NORM_BWD_BULK
    extern __shared__ __align__(16) bf16 ring[];  // NORM_RING slots of [dout | inp | dinp] rows, C each
    __shared__ uint64_t full[NORM_RING];          // slot s: row s + k * NORM_RING landed (phase k)
    __shared__ float row_mean[NORM_ROWS_PER_BLOCK], row_rstd[NORM_ROWS_PER_BLOCK];
    const uint32_t row_bytes = C * sizeof(bf16);
    auto fetch = [&](int i) {  // thread 0: row i into slot i % NORM_RING
        uint64_t* bar = &full[i % NORM_RING];
        bf16* dst = ring + (size_t)(i % NORM_RING) * 3 * C;
        const size_t off = (size_t)(row0 + i) * C;
        sm90::mbar_arrive_expect_tx(bar, 3 * row_bytes);
        sm90::bulk_load(dst, dout + off, row_bytes, bar);
        sm90::bulk_load(dst + C, inp + off, row_bytes, bar);
        sm90::bulk_load(dst + 2 * C, dinp + off, row_bytes, bar);
    };
    if (v == 0) {
        for (int s = 0; s < NORM_RING; s++) sm90::mbar_init(&full[s], 1);
        sm90::mbar_init_fence();
        for (int i = 0; i < min(NORM_RING, rows); i++) fetch(i);
    }
    for (int i = v; i < rows; i += blockDim.x) {  // the rows' statistics, off each row's path
        if (!RMS) row_mean[i] = mean[row0 + i];
        row_rstd[i] = rstd[row0 + i];
    }
#endif
    __syncthreads();  // the unused exchange slots (and on sm_90 the barriers' initialisation and the statistics)
    for (int i = 0; i < rows; i++) {
        const size_t off = (size_t)(row0 + i) * C + c;
        x128 g, x, di;
#if NORM_BWD_BULK
        sm90::mbar_wait(&full[i % NORM_RING], (i / NORM_RING) & 1);
        if (owner) {
            const bf16* src = ring + (size_t)(i % NORM_RING) * 3 * C + c;
            g = load128(src);
            x = load128(src + C);
            di = load128(src + 2 * C);
        }
        const float m = RMS ? 0.0f : row_mean[i], s = row_rstd[i];
#else
        if (owner) {
            g = load128cs(dout + off);
            x = load128cs(inp + off);
            di = load128(dinp + off);
        }
        const float m = RMS ? 0.0f : mean[row0 + i], s = rstd[row0 + i];
#endif
        float sum_dn = 0.0f, sum_dnx = 0.0f;
        if (owner) {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float dn = (float)g[k] * w[k];
                if (!RMS) sum_dn += dn;
                sum_dnx += dn * (((float)x[k] - m) * s);
            }
        }
        if (!RMS) sum_dn = warp_sum(sum_dn);
        sum_dnx = warp_sum(sum_dnx);
        if (lane == 0) {  // rewritten two rows on, past the next barrier
            exchange[i & 1][0][warp] = sum_dn;
            exchange[i & 1][1][warp] = sum_dnx;
        }
        __syncthreads();
#if NORM_BWD_BULK
        if (v == 0 && i + NORM_RING < rows) fetch(i + NORM_RING);  // every thread read slot i % NORM_RING above
#endif
        const float mean_dn = RMS ? 0.0f : block_sum(exchange[i & 1][0]) * inv_C;
        const float mean_dnx = block_sum(exchange[i & 1][1]) * inv_C;
        if (!owner) continue;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float xhat = ((float)x[k] - m) * s, d = (float)g[k], dn = d * w[k];
            if (!RMS) db[k] += d;
            dw[k] += d * xhat;
            di[k] = __float2bfloat16_rn((float)di[k] + s * (dn - mean_dn - xhat * mean_dnx));
            if (DINP_SUM) di_sum[k] += (float)di[k];
        }
        store128(dinp + off, di);
    }
    if (!owner) return;
    auto store8 = [](float* dst, const float (&a)[8]) {
        *reinterpret_cast<float4*>(dst) = make_float4(a[0], a[1], a[2], a[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(a[4], a[5], a[6], a[7]);
    };
    constexpr int S = norm_sums<RMS>;
    float* dst = partials + (size_t)blockIdx.x * S * C + c;
    store8(dst, dw);
    if (!RMS) store8(dst + C, db);
    if (DINP_SUM) store8(partials + (size_t)gridDim.x * S * C + (size_t)blockIdx.x * C + c, di_sum);
}

// One launch of the kernel, with the ring's shared memory where the loaded device code is sm_90's (its PTX
// version tells which of the kernel's two paths was compiled in).
template <bool RMS, bool DINP_SUM>
inline void norm_backward_launch(int blocks, int warps, bf16* dinp, float* partials, const bf16* dout,
                                 const bf16* inp, const bf16* weight, const float* mean, const float* rstd, int N,
                                 int C, cudaStream_t stream) {
    const auto kernel = norm_backward_kernel<RMS, DINP_SUM>;
    static const cudaFuncAttributes attr = [kernel] {
        cudaFuncAttributes a;
        CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
        if (a.ptxVersion >= 90)  // the rings of 8 blocks an SM (160 KB at C = 768) before L1
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            cudaSharedmemCarveoutMaxShared));
        return a;
    }();
    const size_t smem = attr.ptxVersion >= 90 ? (size_t)NORM_RING * 3 * C * sizeof(bf16) : 0;
    if (smem + attr.sharedSizeBytes > 48 * 1024)  // C close to 2048: past the default limit, opt in
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<blocks, 32 * warps, smem, stream>>>(dinp, partials, dout, inp, weight, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH();
}

template <bool RMS>
inline size_t norm_backward_scratch_floats(int N, int C) {
    return (size_t)ceil_div(N, NORM_ROWS_PER_BLOCK) * (norm_sums<RMS> + 1) * C;  // partial rows, dinp_sum rows
}

// The launch and the column sums: dweight (and dbias) in bf16, dinp_sum (optional) in fp32; mean unused by RMSNorm.
template <bool RMS>
inline void norm_backward(const char* family, bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                          const bf16* weight, const float* mean, const float* rstd, float* scratch,
                          size_t scratch_floats, int N, int C, cudaStream_t stream, float* dinp_sum) {
    const int warps = check_rows(N, C, family, {dinp, dout, inp, weight});  // one per 256 channels
    if (N == 0) return;
    if (scratch_floats < norm_backward_scratch_floats<RMS>(N, C))
        throw std::runtime_error(std::string("gpt2cu kernels: ") + family + ": scratch too small");
    const int blocks = ceil_div(N, NORM_ROWS_PER_BLOCK);
    if (dinp_sum)
        norm_backward_launch<RMS, true>(blocks, warps, dinp, scratch, dout, inp, weight, mean, rstd, N, C, stream);
    else
        norm_backward_launch<RMS, false>(blocks, warps, dinp, scratch, dout, inp, weight, mean, rstd, N, C, stream);
    constexpr int S = norm_sums<RMS>;
    column_sum_add(dweight, RMS ? dweight : dbias, C, scratch, blocks, S * C, stream);
    if (dinp_sum) column_sum_add(dinp_sum, dinp_sum, C, scratch + (size_t)blocks * S * C, blocks, C, stream);
}
