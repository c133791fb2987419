// gemm_sm90.cu: C (M, N) = A (M, K) @ B with a GeLU epilogue, for Hopper (sm_90a): TMA loads, wgmma products,
// the epilogue of one tile overlapped with the products of another. Two epilogues (template kEpi):
//   kEpiGelu:  pre = round(acc + bias), out = round(gelu(acc + bias)) from the fp32 value; B = w (N, K) row-major
//              (K-major), the fc layer's forward (cuBLASLt's GELU_AUX_BIAS; bias may be null)
//   kEpiDGelu: out = round(acc * gelu'(pre)), pre read; B = w (K, N) row-major (N-major, an MN-major wgmma operand),
//              the backward of the projection after the GeLU (cuBLASLt's DGELU)
// gelu and gelu' are gelu.cuh's (tanh form, one exp2 and one fast divide). Deterministic: each output element is
// one warpgroup's sum over k in a fixed order (no split-K, no atomics).
// Shapes (gemm_sm90_supported): N a multiple of 128, K of 64, pointers 16-byte aligned; any M (TMA zero-fills the
// rows past M, the stores skip them). matmul.cu uses this file on compute capability 9.x for those shapes and
// cuBLASLt for the others (and for every GEMM without a GeLU epilogue).
//
// Why: GPT-2's fc GEMMs (M = B*T = 65536, N = 3072, K = 768) are short in K: a 128 x 128 tile's products take
// ~6k cycles of the tensor cores (4096 flop/cycle/SM), and its epilogue (two special-function ops per element for
// the GeLU at 16 per cycle per SM, ~10 fp32 ops, two bf16 stores or a load and a store) costs a good part of that.
// cuBLASLt's epilogue kernels run at 78% of torch.matmul's rate on this shape (H200, dev/gemm_sm90/bench.py).
//
// Schedule: "ping-pong". A persistent grid (one CTA per multiprocessor, 384 threads); tile i of a CTA (tiles
// blockIdx.x, blockIdx.x + gridDim.x, ..., in row-major tile order: the CTAs of a wave share their A rows and
// all of B through L2) belongs to consumer warpgroup i % 2.
//   warpgroup 0, the producer (setmaxnreg 40): one thread loads the k-blocks of 64 of each tile's A and B rows by
//     TMA (128-byte swizzle) into a ring of 6 stages of 32 KB (a "full" mbarrier per stage completed by the byte
//     count, an "empty" one the consuming warpgroup's 128 threads arrive on).
//   warpgroups 1, 2, the consumers (setmaxnreg 232): each runs its tile's whole k loop (two m64n128k16 wgmma per
//     k step from shared memory, fp32 accumulators in registers), then passes the turn to the other (named barriers
//     1, 2) and runs the epilogue while the other's products run.
// Tile: 128 x 128 per warpgroup, 128 accumulator registers a thread (the most that leaves room for the epilogue in
// 232, with two warpgroups' tiles live at once, which the overlap needs: 128 x 256 per warpgroup is out). Measured
// on an H200 at fc's shape with the epilogue left out: 128 x 128 ran the products at 98% of torch.matmul's rate,
// 64 x 256 (one m64n256k16, 40 KB stages) at 80% (dev/gemm_sm90/bench.py, 2026-12-02).
// Epilogue (measured: done from the fragments with 4-byte stores and per-column loads it took 3x the products'
// time): each warp moves its accumulators through shared memory, 16 rows x 32 columns at a time (fp32, rows 44
// words apart: the fragment writes and the row reads are free of bank conflicts), so each lane then holds 8
// consecutive columns of a row: the GeLU math there, 16-byte streaming (evict-first) stores covering whole 32-byte
// sectors. The bias (forward) and pre (backward) values a lane needs are loaded before the tile's k loop, in
// registers, their latency hidden under the products.
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
constexpr int kBM = 128, kBN = 128, kBK = 64;  // a warpgroup's tile; k per stage (one 128-byte swizzled panel)
constexpr int kABytes = kBM * 128;              // 128 rows of 64 k
constexpr int kBBytes = kBN * 128;              // K-major: 128 rows of 64 k; MN-major: 2 panels of 64 k rows x 64 n
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kStages = 6;
constexpr int kEpiCols = 32, kEpiStride = 44;   // epilogue staging per warp: 16 rows x 32 fp32, rows 44 words apart
constexpr int kEpiWarpBytes = 16 * kEpiStride * 4;
constexpr int kEpiOffset = kStages * kStageBytes;
constexpr int kBarOffset = kEpiOffset + 8 * kEpiWarpBytes;
constexpr int kSmemBytes = kBarOffset + 16 * kStages + 1024;  // + barriers, + alignment slack
static_assert(kSmemBytes <= 227 * 1024, "shared memory");

// a shared-memory descriptor moved by `bytes` (the address field cannot carry: shared addresses are < 2^18)
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) {
    return (desc & 0xffffffff00000000ull) | ((uint32_t)desc + (bytes >> 4));
}

__device__ __forceinline__ float2 bf16x2_to_float2(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The accumulator of m64 sub-tile mi: acc[mi][4j + e] is row 64 mi + 16 warp + g + 8 (e >> 1), column 8j + 2t + (e & 1)
// of the tile (g = lane / 4, t = lane % 4). In the epilogue, lane l holds, per sub-tile mi and 32-column chunk c,
// row 64 mi + 16 warp + (l & 15), columns 32c + 8 grp .. + 7 for grp = (l >> 4) + 2k, k = 0, 1: "item" (mi, c, k).
template <int kEpi>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                     bf16* __restrict__ out, bf16* __restrict__ pre, const bf16* __restrict__ bias, int M, int N,
                     int K) {
#ifdef GPT2CU_SM90A_DEVICE
    constexpr bool BMN = kEpi == kEpiDGelu;
    constexpr int MI = kBM / 64, kChunks = kBN / kEpiCols;
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
    uint64_t* empty = full + kStages;

    const int tid = threadIdx.x;
    const int wg = warpgroup_index();
    const int tiles_n = N / kBN;
    const int num_tiles = ceil_div(M, kBM) * tiles_n;
    const int num_kb = K / kBK;

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
                    uint8_t* sa = smem + st * kStageBytes;
                    if (pos >= kStages) mbar_wait(&empty[st], ((pos / kStages) - 1) & 1);
                    mbar_arrive_expect_tx(&full[st], kStageBytes);
                    tma_load_2d(sa, &tm_a, &full[st], kb * kBK, m0);
                    if constexpr (BMN) {
#pragma unroll
                        for (int p = 0; p < kBN / 64; ++p)
                            tma_load_2d(sa + kABytes + p * kBK * 128, &tm_b, &full[st], n0 + 64 * p, kb * kBK);
                    } else {
                        tma_load_2d(sa + kABytes, &tm_b, &full[st], kb * kBK, n0);
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
    const int er = lane & 15, egrp = lane >> 4;  // epilogue: row, first 8-column group of the lane's items
    const uint32_t stage_w = smem_u32(smem + kEpiOffset + (cw * 4 + warp) * kEpiWarpBytes);

    // A: K-major, m64 sub-tile mi 64 rows (8 KB) further, k16 step +32 bytes. B: K-major, the same; MN-major:
    // 64-column panels of 64 k rows (8 KB, the LBO), k16 step +16 rows (2048 bytes).
    const uint64_t da0 = make_desc(smem_u32(smem), 16, 1024);
    const uint64_t db0 = BMN ? make_desc(smem_u32(smem + kABytes), kBK * 128, 1024)
                             : make_desc(smem_u32(smem + kABytes), 16, 1024);

    // turns: warpgroup cw waits on barrier 1 + cw and passes to the other's; warpgroup 0 goes first
    auto turn_wait = [&]() { named_barrier_sync(1 + cw, 256); };
    auto turn_pass = [&]() { named_barrier_arrive(2 - cw, 256); };
    if (cw == 1) named_barrier_arrive(1, 256);

    float acc[MI][kBN / 2];
    // the epilogue's inputs, loaded before the k loop: forward: the bias of the lane's columns (the same for every
    // row); backward: pre of the lane's items (bf16 x 8 each)
    uint4 ein[kEpi == kEpiGelu ? 1 : MI][kChunks][2];
    int i = cw;  // this CTA's tile index
    for (int tile = blockIdx.x + cw * gridDim.x; tile < num_tiles; tile += 2 * gridDim.x, i += 2) {
        const int m0 = (tile / tiles_n) * kBM, n0 = (tile % tiles_n) * kBN;
        const int row0 = m0 + 16 * warp + er;  // the lane's epilogue row in sub-tile 0
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int col = n0 + kEpiCols * c + 8 * (egrp + 2 * k);
                if constexpr (kEpi == kEpiGelu) {
                    ein[0][c][k] = bias ? *reinterpret_cast<const uint4*>(bias + col) : make_uint4(0, 0, 0, 0);
                } else {
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        const int row = row0 + 64 * mi;
                        ein[mi][c][k] = row < M ? __ldcs(reinterpret_cast<const uint4*>(pre + (size_t)row * N + col))
                                                : make_uint4(0, 0, 0, 0);
                    }
                }
            }

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
                    wgmma_ss_n128<0, BMN ? 1 : 0>(acc[mi], desc_at(da0, st * kStageBytes + mi * 64 * 128 + kk * 32),
                                                  desc_at(db0, st * kStageBytes + (BMN ? kk * 2048 : kk * 32)),
                                                  kb > 0 || kk > 0);
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
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                __syncwarp();  // the previous chunk's reads are done
#pragma unroll
                for (int jj = 0; jj < kEpiCols / 8; ++jj)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int j = (kEpiCols / 8) * c + jj;
                        st_shared_f32x2(stage_w + ((g + 8 * h) * kEpiStride + 8 * jj + 2 * t) * 4,
                                        acc[mi][4 * j + 2 * h], acc[mi][4 * j + 2 * h + 1]);
                    }
                __syncwarp();
                const int row = row0 + 64 * mi;
#pragma unroll
                for (int k = 0; k < 2 && row < M; ++k) {  // (no early exit: every lane reaches the next __syncwarp)
                    const int grp = egrp + 2 * k;
                    const uint32_t src = stage_w + (er * kEpiStride + 8 * grp) * 4;
                    const float4 lo = ld_shared_f32x4(src), hi = ld_shared_f32x4(src + 16);
                    const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
                    const uint4 in = ein[kEpi == kEpiGelu ? 0 : mi][c][k];
                    const uint32_t in2[4] = {in.x, in.y, in.z, in.w};
                    uint32_t o[4], p[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 x2 = bf16x2_to_float2(in2[e]);
                        if constexpr (kEpi == kEpiGelu) {
                            const float x0 = v[2 * e] + x2.x, x1 = v[2 * e + 1] + x2.y;
                            p[e] = pack_bf16x2(x0, x1);
                            o[e] = pack_bf16x2(x0 * gelu_sigmoid(x0), x1 * gelu_sigmoid(x1));
                        } else {
                            o[e] = pack_bf16x2(v[2 * e] * gelu_grad(x2.x), v[2 * e + 1] * gelu_grad(x2.y));
                        }
                    }
                    const size_t off = (size_t)row * N + n0 + kEpiCols * c + 8 * grp;
                    __stcs(reinterpret_cast<uint4*>(out + off), make_uint4(o[0], o[1], o[2], o[3]));
                    if constexpr (kEpi == kEpiGelu)
                        __stcs(reinterpret_cast<uint4*>(pre + off), make_uint4(p[0], p[1], p[2], p[3]));
                }
            }
    }
    // the turn passed after this CTA's last tile goes to warpgroup (tile count) % 2: it takes it, so every
    // arrival is matched
    const int my_tiles = (num_tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    if (cw == my_tiles % 2) turn_wait();
#endif
}

template <int kEpi>
void launch(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
            cudaStream_t stream) {
    auto kernel = gemm_sm90_kernel<kEpi>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    const cuuint64_t a_dims[2] = {(cuuint64_t)K, (cuuint64_t)M};
    const cuuint64_t a_strides[1] = {(cuuint64_t)K * 2};
    const cuuint32_t a_box[2] = {kBK, kBM};
    const CUtensorMap tm_a = tensor_map_bf16(a, 2, a_dims, a_strides, a_box);
    CUtensorMap tm_b;
    if (kEpi == kEpiDGelu) {  // w (K, N): boxes of 64 columns x 64 k rows
        const cuuint64_t dims[2] = {(cuuint64_t)N, (cuuint64_t)K};
        const cuuint64_t strides[1] = {(cuuint64_t)N * 2};
        const cuuint32_t box[2] = {64, kBK};
        tm_b = tensor_map_bf16(w, 2, dims, strides, box);
    } else {  // w (N, K): boxes of 64 k x 128 rows
        const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)N};
        const cuuint64_t strides[1] = {(cuuint64_t)K * 2};
        const cuuint32_t box[2] = {kBK, kBN};
        tm_b = tensor_map_bf16(w, 2, dims, strides, box);
    }
    const long long tiles = (long long)ceil_div(M, kBM) * (N / kBN);
    require(tiles <= 0x7fffffffLL, "gemm_sm90: too many tiles");
    static int sms = 0;
    if (sms == 0) sms = device_sm_count();
    const int grid = (int)(tiles < sms ? tiles : sms);
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(tm_a, tm_b, out, pre, bias, M, N, K);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

bool gemm_sm90_supported(int M, int N, int K, std::initializer_list<const void*> ptrs) {
    if (M < 1 || N < 1 || K < 1 || N % kBN != 0 || K % kBK != 0) return false;
    for (const void* p : ptrs)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    return true;
}

void gemm_gelu_forward_sm90(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
                            cudaStream_t stream) {
    require(gemm_sm90_supported(M, N, K, {out, pre, a, w, bias}), "gemm_gelu_forward_sm90: unsupported shape");
    launch<kEpiGelu>(out, pre, a, w, bias, M, N, K, stream);
}

void gemm_dgelu_sm90(bf16* out, const bf16* a, const bf16* w, const bf16* pre, int M, int N, int K,
                     cudaStream_t stream) {
    require(gemm_sm90_supported(M, N, K, {out, a, w, pre}), "gemm_dgelu_sm90: unsupported shape");
    launch<kEpiDGelu>(out, const_cast<bf16*>(pre), a, w, nullptr, M, N, K, stream);
}
