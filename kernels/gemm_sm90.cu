// gemm_sm90.cu: C (M, N) = A (M, K) @ B with a GeLU epilogue, for Hopper (sm_90a): TMA loads, wgmma products,
// the epilogue of one tile overlapped with the products of another. Two epilogues (template kEpi):
//   kEpiGelu:  pre = round(acc + bias), out = round(gelu(acc + bias)) from the fp32 value; B = w (N, K) row-major
//              (K-major), the fc layer's forward (cuBLASLt's GELU_AUX_BIAS; bias may be null)
//   kEpiDGelu: out = round(acc * gelu'(pre)), pre read; B = w (K, N) row-major (N-major, an MN-major wgmma operand),
//              the backward of the projection after the GeLU (cuBLASLt's DGELU)
// gelu and gelu' are gelu.cuh's (tanh form, one exp2 and one fast divide). Deterministic: each output element is
// one warpgroup's sum over k in a fixed order (no split-K, no atomics).
// Shapes (gemm_sm90_supported): N a multiple of the tile width (128 or 256 by variant), K of 64, pointers 16-byte
// aligned; any M (TMA zero-fills the rows past M, the stores skip them). matmul.cu uses this file on compute
// capability 9.x for those shapes and cuBLASLt for the others (and for every GEMM without a GeLU epilogue).
//
// Why: GPT-2's fc GEMMs (M = B*T = 65536, N = 3072, K = 768) are short in K: a 128 x 256 tile's products take
// ~12k cycles of the tensor cores (4096 flop/cycle/SM), and its epilogue (two special-function ops per element
// for the GeLU at 16 per cycle per SM: ~4k cycles, plus ~10 fp32 ops and two bf16 stores per element) is a third
// of that. A kernel that runs the epilogue between tiles (cuBLASLt's, measured at 72% of the GEMM rate) loses
// it; here the epilogue of one tile runs while the tensor cores work on another.
//
// Schedule: "ping-pong". A persistent grid (one CTA per multiprocessor, 384 threads); tile i of a CTA (tiles
// blockIdx.x, blockIdx.x + gridDim.x, ..., in row-major tile order: the CTAs of a wave share their A rows and
// all of B through L2) belongs to consumer warpgroup i % 2.
//   warpgroup 0, the producer (setmaxnreg 40): one thread loads the k-blocks of 64 of each tile's A and B rows by
//     TMA (128-byte swizzle) into a ring of kStages stages (a "full" mbarrier per stage completed by the byte
//     count, an "empty" one the consuming warpgroup's 128 threads arrive on).
//   warpgroups 1, 2, the consumers (setmaxnreg 232): each runs its tile's whole k loop (wgmma from shared
//     memory, fp32 accumulators in registers), then passes the turn to the other (named barriers 1, 2) and runs
//     the epilogue from registers straight to global memory while the other's products run.
// Tiles per warpgroup, 128 accumulator registers a thread either way (a 128-register accumulator is the most that
// leaves room for the epilogue in 232; two warpgroups' tiles at once is what the overlap needs, so a 128 x 256
// accumulator per warpgroup is out):
//   variant 1: 128 x 128 (two m64n128k16 per k step): stage 32 KB (A 16 + B 16), 6 stages (192 KB); L2 -> SM
//     traffic 16 KB per MFLOP.
//   variant 2: 64 x 256 (one m64n256k16): stage 40 KB (A 8 + B 32), 5 stages (200 KB); 20 KB per MFLOP, but the
//     fewest shared-memory bytes per product (B read once per 64 rows instead of per 64 x 128).
// (A cooperative 128 x 256 tile shared by both warpgroups needs 12 KB per MFLOP but leaves the epilogue exposed.)
// Stores: the accumulator fragment's bf16 pairs, 4 bytes a thread (8 rows x 16 bytes a warp instruction), streaming
// (evict-first) so the outputs do not push A and B out of L2; the DGELU's pre is read the same way.
#include "kernels.h"
#include "common.cuh"
#include "gelu.cuh"
#include "gemm_sm90.h"
#include "sm90_common.cuh"
#include "wgmma_sm90.cuh"

#include <cstdint>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPT2CU_SM90A_DEVICE 1
#endif

namespace {

using namespace sm90;

constexpr int kEpiGelu = 0, kEpiDGelu = 1;
constexpr int kThreads = 384;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "register file");

// a warpgroup's tile: MI x 64 rows by BN columns; BMN: B is MN-major (w stored K x N)
template <int MI, int BN, bool BMN>
struct GemmCfg {
    static constexpr int kBM = 64 * MI;
    static constexpr int kBN = BN;
    static constexpr int kBK = 64;  // one 128-byte swizzled panel of k
    static constexpr int kABytes = kBM * 128;
    static constexpr int kBBytes = BN * 128;  // K-major: BN rows of 128 bytes; MN-major: BN/64 panels of 64 k rows
    static constexpr int kStageBytes = kABytes + kBBytes;
    static constexpr int kStages = (200 * 1024) / kStageBytes;
    static constexpr int kSmemBytes = kStages * kStageBytes + 16 * kStages + 1024;  // + barriers, + alignment slack
    static_assert(kSmemBytes <= 227 * 1024, "shared memory");
    static_assert(BN == 128 || BN == 256, "tile width");
};

// a shared-memory descriptor moved by `bytes` (the address field cannot carry: shared addresses are < 2^18)
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) {
    return (desc & 0xffffffff00000000ull) | ((uint32_t)desc + (bytes >> 4));
}

template <int BN, int TB>
__device__ __forceinline__ void wgmma_tile(float (&d)[BN / 2], uint64_t da, uint64_t db, int scale_d) {
    if constexpr (BN == 128)
        wgmma_ss_n128<0, TB>(d, da, db, scale_d);
    else
        wgmma_ss_n256<0, TB>(d, da, db, scale_d);
}

__device__ __forceinline__ float2 bf16x2_to_float2(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The accumulator of m64 sub-tile mi: acc[mi][4j + e] is row 64 mi + 16 warp + g + 8 (e >> 1), column 8j + 2t + (e & 1)
// of the tile (g = lane / 4, t = lane % 4).
template <class Cfg, int kEpi>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                     bf16* __restrict__ out, bf16* __restrict__ pre, const bf16* __restrict__ bias, int M, int N,
                     int K) {
#ifdef GPT2CU_SM90A_DEVICE
    constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kStages = Cfg::kStages, MI = kBM / 64;
    constexpr bool BMN = kEpi == kEpiDGelu;
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * Cfg::kStageBytes);
    uint64_t* empty = full + kStages;
    auto stage_a = [&](int st) { return smem + st * Cfg::kStageBytes; };
    auto stage_b = [&](int st) { return smem + st * Cfg::kStageBytes + Cfg::kABytes; };

    const int tid = threadIdx.x;
    const int wg = warpgroup_index();
    const int tiles_n = N / kBN;
    const int num_tiles = ceil_div(M, kBM) * tiles_n;
    const int num_kb = K / Cfg::kBK;

    if (tid == 0) {
        tma_prefetch_desc(&tm_a);
        tma_prefetch_desc(&tm_b);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 128);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---------------- producer ----------------
        setmaxnreg_dec<kProducerRegs>();
        if (tid == 0) {
            int pos = 0;  // k-blocks loaded so far: ring position
            for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
                const int m0 = (tile / tiles_n) * kBM, n0 = (tile % tiles_n) * kBN;
                for (int kb = 0; kb < num_kb; ++kb, ++pos) {
                    const int st = pos % kStages;
                    if (pos >= kStages) mbar_wait(&empty[st], ((pos / kStages) - 1) & 1);
                    mbar_arrive_expect_tx(&full[st], Cfg::kStageBytes);
                    tma_load_2d(stage_a(st), &tm_a, &full[st], kb * 64, m0);
                    if constexpr (BMN) {
#pragma unroll
                        for (int p = 0; p < kBN / 64; ++p)
                            tma_load_2d(stage_b(st) + p * 64 * 128, &tm_b, &full[st], n0 + 64 * p, kb * 64);
                    } else {
                        tma_load_2d(stage_b(st), &tm_b, &full[st], kb * 64, n0);
                    }
                }
            }
        }
        return;
    }

    // ---------------- consumers ----------------
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1;  // tiles cw, cw + 2, ... of this CTA
    const int ctid = tid - 128 * wg;
    const int warp = ctid / 32, lane = ctid % 32;
    const int g = lane >> 2, t = lane & 3;

    // A: K-major, m64 sub-tile mi 64 rows (8 KB) further, k16 step +32 bytes. B: K-major, the same; MN-major:
    // 64-column panels of 64 k rows (8 KB, the LBO), k16 step +16 rows (2048 bytes).
    const uint64_t da0 = make_desc(smem_u32(smem), 16, 1024);
    const uint64_t db0 = BMN ? make_desc(smem_u32(smem + Cfg::kABytes), 64 * 128, 1024)
                             : make_desc(smem_u32(smem + Cfg::kABytes), 16, 1024);

    // turns: warpgroup cw waits on barrier 1 + cw and passes to the other's; warpgroup 0 goes first
    auto turn_wait = [&]() { named_barrier_sync(1 + cw, 256); };
    auto turn_pass = [&]() { named_barrier_arrive(2 - cw, 256); };
    if (cw == 1) named_barrier_arrive(1, 256);

    float acc[MI][kBN / 2];
    int i = cw;  // this CTA's tile index
    for (int tile = blockIdx.x + cw * gridDim.x; tile < num_tiles; tile += 2 * gridDim.x, i += 2) {
        const int pos0 = i * num_kb;
        turn_wait();
        for (int kb = 0; kb < num_kb; ++kb) {
            const int pos = pos0 + kb, st = pos % kStages;
            mbar_wait(&full[st], (pos / kStages) & 1);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
                    wgmma_tile<kBN, BMN ? 1 : 0>(
                        acc[mi], desc_at(da0, st * Cfg::kStageBytes + mi * 64 * 128 + kk * 32),
                        desc_at(db0, st * Cfg::kStageBytes + (BMN ? kk * 2048 : kk * 32)), kb > 0 || kk > 0);
            wgmma_commit();
            if (kb > 0) {  // the previous k-block's products are done: release its stage
                wgmma_wait<1>();
                mbar_arrive(&empty[(pos - 1) % kStages]);
            }
        }
        turn_pass();  // the other warpgroup's products queue behind this one's last
        wgmma_wait<0>();
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) reg_fence(acc[mi]);
        mbar_arrive(&empty[(pos0 + num_kb - 1) % kStages]);

        // ---------------- epilogue ----------------
        const int m0 = (tile / tiles_n) * kBM, n0 = (tile % tiles_n) * kBN;
        const int row0 = m0 + 16 * warp + g;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
            const int col = n0 + 8 * j + 2 * t;
            float2 b = make_float2(0.f, 0.f);
            if (kEpi == kEpiGelu && bias != nullptr) b = bf16x2_to_float2(*reinterpret_cast<const uint32_t*>(bias + col));
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = row0 + 64 * mi + 8 * h;
                    if (row >= M) continue;
                    const size_t off = (size_t)row * N + col;
                    const float v0 = acc[mi][4 * j + 2 * h], v1 = acc[mi][4 * j + 2 * h + 1];
                    uint32_t* o = reinterpret_cast<uint32_t*>(out + off);
                    uint32_t* p = reinterpret_cast<uint32_t*>(pre + off);
                    if constexpr (kEpi == kEpiGelu) {
                        const float x0 = v0 + b.x, x1 = v1 + b.y;
                        __stcs(p, pack_bf16x2(x0, x1));
                        __stcs(o, pack_bf16x2(x0 * gelu_sigmoid(x0), x1 * gelu_sigmoid(x1)));
                    } else {
                        const float2 x = bf16x2_to_float2(__ldcs(p));
                        __stcs(o, pack_bf16x2(v0 * gelu_grad(x.x), v1 * gelu_grad(x.y)));
                    }
                }
        }
    }
    // the turn passed after this CTA's last tile goes to warpgroup (tile count) % 2: it takes it, so every
    // arrival is matched
    const int my_tiles = (num_tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    if (cw == my_tiles % 2) turn_wait();
#endif
}

template <int MI, int BN, int kEpi>
void launch(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
            cudaStream_t stream) {
    using Cfg = GemmCfg<MI, BN, kEpi == kEpiDGelu>;
    auto kernel = gemm_sm90_kernel<Cfg, kEpi>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    const cuuint64_t a_dims[2] = {(cuuint64_t)K, (cuuint64_t)M};
    const cuuint64_t a_strides[1] = {(cuuint64_t)K * 2};
    const cuuint32_t a_box[2] = {64, (cuuint32_t)Cfg::kBM};
    const CUtensorMap tm_a = tensor_map_bf16(a, 2, a_dims, a_strides, a_box);
    CUtensorMap tm_b;
    if (kEpi == kEpiDGelu) {  // w (K, N): boxes of 64 columns x 64 k rows
        const cuuint64_t dims[2] = {(cuuint64_t)N, (cuuint64_t)K};
        const cuuint64_t strides[1] = {(cuuint64_t)N * 2};
        const cuuint32_t box[2] = {64, 64};
        tm_b = tensor_map_bf16(w, 2, dims, strides, box);
    } else {  // w (N, K): boxes of 64 k x BN rows
        const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)N};
        const cuuint64_t strides[1] = {(cuuint64_t)K * 2};
        const cuuint32_t box[2] = {64, (cuuint32_t)BN};
        tm_b = tensor_map_bf16(w, 2, dims, strides, box);
    }
    const long long tiles = (long long)ceil_div(M, Cfg::kBM) * (N / BN);
    require(tiles <= 0x7fffffffLL, "gemm_sm90: too many tiles");
    static int sms = 0;
    if (sms == 0) sms = device_sm_count();
    const int grid = (int)(tiles < sms ? tiles : sms);
    kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(tm_a, tm_b, out, pre, bias, M, N, K);
    CUDA_CHECK_LAUNCH();
}

template <int kEpi>
void dispatch(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K, int variant,
              cudaStream_t stream) {
    if (variant == 2)
        launch<1, 256, kEpi>(out, pre, a, w, bias, M, N, K, stream);
    else
        launch<2, 128, kEpi>(out, pre, a, w, bias, M, N, K, stream);
}

}  // namespace

bool gemm_sm90_supported(int variant, int M, int N, int K, std::initializer_list<const void*> ptrs) {
    if (variant < 1 || variant > kGemmSm90Variants || M < 1 || N < 1 || K < 1) return false;
    const int bn = variant == 2 ? 256 : 128;
    if (N % bn != 0 || K % 64 != 0) return false;
    for (const void* p : ptrs)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    return true;
}

void gemm_gelu_forward_sm90(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
                            int variant, cudaStream_t stream) {
    require(gemm_sm90_supported(variant, M, N, K, {out, pre, a, w, bias}), "gemm_gelu_forward_sm90: unsupported shape");
    dispatch<kEpiGelu>(out, pre, a, w, bias, M, N, K, variant, stream);
}

void gemm_dgelu_sm90(bf16* out, const bf16* a, const bf16* w, const bf16* pre, int M, int N, int K, int variant,
                     cudaStream_t stream) {
    require(gemm_sm90_supported(variant, M, N, K, {out, a, w, pre}), "gemm_dgelu_sm90: unsupported shape");
    dispatch<kEpiDGelu>(out, const_cast<bf16*>(pre), a, w, nullptr, M, N, K, variant, stream);
}
