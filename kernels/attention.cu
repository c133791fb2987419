// attention.cu: causal flash attention (FlashAttention-2 algorithm) with grouped key/value heads, forward
// and backward.
//
// ---- Layout -----------------------------------------------------------------------------------------
// qkv (B, T, (NH + 2 NKV) HS), each row [q: NH heads | k: NKV heads | v: NKV heads]; query head h reads
// key/value head h / G, G = NH / NKV (grouped-query attention; NKV == NH is GPT-2's (B, T, 3C)). out
// (B, T, NH HS), lse (B, NH, T); dqkv has qkv's layout, dK and dV of a key/value head summing the G
// query heads of its group.
//
// ---- The math (one (batch b, query head h); T rows; HS = head size; scale = 1/sqrt(HS)) ----------
//   S = scale * Q K^T (T x T),  S[i,j] = -inf for j > i (causal)
//   P = softmax_rows(S),  O = P V,  lse[i] = log(sum_j exp(S[i,j]))   (natural log)
//
// Forward, online softmax (never materialises S): for each block of keys, per query row i,
//   s_j   = S[i,j] * log2(e)                       (scores prescaled so exp() becomes one exp2)
//   m'    = max(m, max_j s_j),   c = 2^(m - m')    (c rescales what was accumulated so far)
//   p_j   = 2^(s_j - m'),        l' = c l + sum_j p_j,   o' = c o + sum_j p_j V[j,:]
//   at the end O[i,:] = o / l  and  lse[i] = m ln2 + ln l.
// Backward (dO given), with P recomputed from lse so nothing T x T is stored:
//   P[i,j]  = exp(S[i,j] - lse[i]) = 2^(S[i,j] log2e - lse[i] log2e)
//   dV      = P^T dO
//   dP      = dO V^T
//   D[i]    = sum_j P[i,j] dP[i,j] = sum_d dO[i,d] O[i,d]   (the cheap form, computed first)
//   dS      = P * (dP - D)            (softmax backward, elementwise; dS is w.r.t. the scaled score)
//   dQ      = scale * dS K,   dK = scale * dS^T Q
//
// ---- Decomposition ---------------------------------------------------------------------------------
// All kernels: 4 warps (128 threads) per CTA; every warp owns 16*MT rows of the "row" operand and runs
// tensor-core mma.sync.m16n8k16 (bf16 in, fp32 accumulate); operands come from shared memory through
// ldmatrix (.trans where the operand must be transposed), tiles arrive by cp.async, double-buffered.
// Shared tiles are row-major with a row stride of HS+8 elements: the 16-byte pad makes the 8 row
// addresses of every ldmatrix phase fall in 8 different bank groups (no conflicts).
//   forward  one CTA per (query block, query head, batch): query block = 128 rows (HS 64, 2 m-tiles a warp)
//            or 64 rows (HS 128, 1 m-tile a warp, to stay within 255 registers); key/value tiles of 64
//            keys stream through. Q fragments stay in registers for HS 128; for HS 64 (two m-tiles,
//            no registers left) they are re-read from shared memory per k-chunk. P goes from the score
//            accumulators straight into bf16 A fragments of P V (no shared-memory round trip). Key
//            blocks entirely above the diagonal are never loaded; a warp skips a block whose keys all
//            exceed its rows; only blocks that straddle the diagonal evaluate the mask. Query blocks are
//            launched in decreasing order (the last ones have the most keys) so long CTAs start first.
//   backward, deterministic (no atomics: every output element is written by exactly one thread once):
//     1. preprocess: D[b,h,i] = dO[i,:] . O[i,:] into the scratch (fp32, B*NH*T floats), or given by the caller:
//        matmul_backward computes it with dO (the output projection's dinp) on Hopper, in its GEMM's epilogue
//        (gemm_sm90.cu's HeadDot), and through attention_backward_preprocess elsewhere.
//     2. dK/dV: one CTA per (key block, key/value head, batch); each warp owns 16*MT keys (HS 64: MT = 2,
//        128-key blocks; HS 128: MT = 1, 64-key blocks); loops over the G query heads of the group and, for
//        each, over the 64-query blocks from the diagonal to the end, as one pipelined sequence of tiles
//        (K/V loaded once for the group; dK/dV summed over it in registers, in that fixed order), each block
//        in steps of SUB queries (HS 64: 16, which keeps the 32 x SUB score tiles small enough to hold 2
//        m-tiles of dK/dV accumulators; HS 128: the whole block): S^T = K Q^T, P^T, dV += P^T dO,
//        dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q. Two m-tiles a warp halve the shared-memory
//        reads of Q/dO per mma (the backward is bound by them). Accumulators in registers, written once.
//     3. dQ: one CTA per (query block, query head, batch); each warp owns 16*MT queries (HS 64: MT = 2,
//        128-query blocks, key steps of 16; HS 128: MT = 1, 64); loops over the 64-key blocks up to the
//        diagonal: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K. Written once.
//   Rows/keys past T are zero-filled on load (so no garbage, possibly NaN, enters a product) and never
//   stored; the causal mask alone removes keys >= T from every real row (j >= T > i).
//     4. with dqkv_bias (the qkv projection's bias gradient): bias_backward on the stored dqkv.
//
// ---- Dispatch ------------------------------------------------------------------------------------------
// On compute capability 9.x, where the build includes sm_90 (GPT2CU_HAVE_SM90_ATTENTION), attention_forward and
// attention_backward run the Hopper kernels of attention_sm90.cu (wgmma + TMA; same contract, also
// deterministic); the kernels below serve sm_80 and any build without 90. attention_set_backend(1) forces
// these, 2 keeps only the backward here (kernels.h). The Hopper backward sums dQ in fp32 in the scratch after D
// (from its start when the caller gives D), and dqkv_bias from the values it stores (attention_sm90.cu).
//
// ---- mma.sync.m16n8k16 fragment layouts (lane = 4*g + t, g = lane>>2, t = lane&3) ------------------
//   A (16x16, row-major), 4 regs of 2 bf16: a0 (row g, k 2t..2t+1), a1 (row g+8, k 2t..), a2 (row g,
//     k 2t+8..), a3 (row g+8, k 2t+8..).  B (16x8, k x n), 2 regs: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., g).
//   C/D (16x8 fp32), 4 regs: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1).
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of lane l receives
//     matrix i's (row l>>2, cols 2(l&3), +1); with .trans it receives (rows 2(l&3), +1; col l>>2).
//   Lower column (or k) index sits in the lower 16 bits of each register in all of the above.
#include "kernels.h"
#include "common.cuh"
#ifdef GPT2CU_HAVE_SM90_ATTENTION
#include "attention_sm90.h"
#endif

#include <cmath>
#include <cstdint>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Keys per K/V tile (forward, dQ), and rows per CTA / queries per tile in the backward kernels.
constexpr int kBlock = 64;

// ---- PTX wrappers -------------------------------------------------------------------------------------
// (smem_addr, cp_async_16, cp_async_commit, cp_async_wait: common.cuh)
// 4-byte variant of cp_async_16 (fp32 rows of lse / D whose start need not be 16-byte aligned).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c (16x8 fp32) += a (16x16 bf16, row) * b (16x8 bf16, col)
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- tile loads (whole CTA) ---------------------------------------------------------------------------
// ROWS x HS bf16 from global rows row0.. (row stride g_stride elements) into a shared tile with row
// stride STRIDE; rows >= T are zero-filled. Consecutive threads take consecutive 16-byte chunks of a
// row, so each warp reads whole 128-byte lines.
template <int ROWS, int HS, int STRIDE>
__device__ __forceinline__ void load_tile_async(bf16* s, const bf16* g, size_t g_stride, int row0, int T,
                                                int tid) {
    constexpr int kChunks = HS / 8;  // 16-byte chunks per row
    static_assert((ROWS * kChunks) % kThreads == 0, "tile must split evenly over the CTA");
#pragma unroll
    for (int k = 0; k < ROWS * kChunks / kThreads; ++k) {
        const int idx = tid + k * kThreads;
        const int r = idx / kChunks, c = idx % kChunks;
        const int row = row0 + r;
        const bool valid = row < T;
        // an invalid row still gets an in-bounds address (row 0), though src-size 0 reads nothing
        cp_async_16(s + r * STRIDE + c * 8, g + (size_t)(valid ? row : 0) * g_stride + c * 8, valid);
    }
}

// kBlock fp32 values g[row0 ..] into s (zero past T).
__device__ __forceinline__ void load_row_floats_async(float* s, const float* g, int row0, int T, int tid) {
    if (tid < kBlock) {
        const int row = row0 + tid;
        const bool valid = row < T;
        cp_async_4(s + tid, g + (valid ? row : 0), valid);
    }
}

// ---- warp-level tile products -------------------------------------------------------------------------
// A fragments for k-chunk kc (columns 16kc..16kc+15) of MT m-tiles (rows 16mt..16mt+15) of a
// row-major shared tile whose first row is sA. Lanes 0-15 address rows 0-15 at column 0 of the chunk
// (matrices 0, 1 = a0, a1), lanes 16-31 rows 0-15 at column 8 (matrices 2, 3 = a2, a3).
template <int MT, int STRIDE>
__device__ __forceinline__ void ldmatrix_a(uint32_t (&a)[MT][4], const bf16* sA, int kc, int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], sA + (mt * 16 + (lane & 15)) * STRIDE + kc * 16 + ((lane >> 4) << 3));
}

// The A operand of a product (16*MT rows of a shared tile, all KC k-chunks): either preloaded once into
// registers (IN_REGS: cheaper in shared-memory bandwidth, costs KC*MT*4 registers) or re-read from
// shared memory chunk by chunk (for HS 128 in the backward, where registers are short).
template <int MT, int KC, int STRIDE, bool IN_REGS>
struct AOperand {
    uint32_t frag[IN_REGS ? KC : 1][MT][4];
    const bf16* smem;
    int lane;
    __device__ __forceinline__ AOperand(const bf16* s, int lane_) : smem(s), lane(lane_) {}
    __device__ __forceinline__ void preload() {
        if constexpr (IN_REGS) {
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) ldmatrix_a<MT, STRIDE>(frag[kc], smem, kc, lane);
        }
    }
    __device__ __forceinline__ void operator()(int kc, uint32_t (&a)[MT][4]) const {
        if constexpr (IN_REGS) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) a[mt][i] = frag[kc][mt][i];
        } else {
            ldmatrix_a<MT, STRIDE>(a, smem, kc, lane);
        }
    }
};

// acc[mt][n] (16 x 8) += A[mt] (16 x 16KC) * B^T, where B = rows 8n..8n+7 (n < NT), columns
// 0..16KC-1 of the row-major shared tile sB: the product "rows of A dotted with rows of B"
// (S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T). mma wants B as k x n with b0 = (k 2t..2t+1,
// n g), i.e. B-tile row g, columns 2t..2t+1: exactly a non-transposed ldmatrix of the B rows. One x4
// covers two n-tiles of one k-chunk: lanes 0-7 rows 0-7 col 0 (b0 of tile 2np), 8-15 rows 0-7 col 8 (b1
// of 2np), 16-23 rows 8-15 col 0 (b0 of 2np+1), 24-31 rows 8-15 col 8 (b1 of 2np+1).
template <int MT, int KC, int NT, int STRIDE, class LoadA>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[MT][NT][4], const LoadA& load_a, const bf16* sB,
                                             int lane) {
    static_assert(NT % 2 == 0, "n-tiles go in pairs");
    const int b_row = (lane & 7) + ((lane >> 4) << 3);
    const int b_col = ((lane >> 3) & 1) << 3;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
        uint32_t a[MT][4];
        load_a(kc, a);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, sB + (np * 16 + b_row) * STRIDE + kc * 16 + b_col);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_bf16(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_bf16(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// acc[mt][n] (16 x 8) += A[kc][mt] (register fragments, 16 x 16KC) * B, where B = rows 0..16KC-1 (k),
// columns 8n..8n+7 (n < NT) of the row-major shared tile sB: the product "A times the rows of B"
// (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K). b0 = (k 2t..2t+1, n g) = B-tile elements
// [2t][g], [2t+1][g]: a transposed ldmatrix. One x4 covers two n-tiles of one k-chunk: lanes 0-7 k rows
// 0-7 col 0 (b0 of tile 2np), 8-15 k rows 8-15 col 0 (b1 of 2np), 16-23 k rows 0-7 col 8 (b0 of 2np+1),
// 24-31 k rows 8-15 col 8 (b1 of 2np+1).
template <int MT, int KC, int NT, int STRIDE>
__device__ __forceinline__ void warp_mma_ab(float (&acc)[MT][NT][4], const uint32_t (&a)[KC][MT][4],
                                            const bf16* sB, int lane) {
    static_assert(NT % 2 == 0, "n-tiles go in pairs");
    const int b_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int b_col = (lane >> 4) << 3;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sB + (kc * 16 + b_row) * STRIDE + np * 16 + b_col);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_bf16(acc[mt][2 * np], a[kc][mt], b[0], b[1]);
                mma_bf16(acc[mt][2 * np + 1], a[kc][mt], b[2], b[3]);
            }
        }
    }
}

// Accumulator tiles (16 x 8NT fp32) -> bf16 A fragments over k = their columns, in registers: k-chunk kc
// is n-tiles 2kc (k 0..7) and 2kc+1 (k 8..15); a0 = (row g, k 2t..) = c0,c1 of tile 2kc, a1 = (row g+8)
// = c2,c3 of tile 2kc, a2/a3 likewise from tile 2kc+1.
template <int MT, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[NT / 2][MT][4], const float (&c)[MT][NT][4]) {
#pragma unroll
    for (int kc = 0; kc < NT / 2; ++kc)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[kc][mt][0] = pack_bf16x2(c[mt][2 * kc][0], c[mt][2 * kc][1]);
            a[kc][mt][1] = pack_bf16x2(c[mt][2 * kc][2], c[mt][2 * kc][3]);
            a[kc][mt][2] = pack_bf16x2(c[mt][2 * kc + 1][0], c[mt][2 * kc + 1][1]);
            a[kc][mt][3] = pack_bf16x2(c[mt][2 * kc + 1][2], c[mt][2 * kc + 1][3]);
        }
}

// Where one accumulator element sits: its fragment indices, and its row / column in the warp's
// 16*MT x 8*NT tile (the C/D layout above). The indices are compile-time constants once unrolled.
struct AccIndex {
    int mt, n, r, row, col;
};

// acc[...] = f(acc[...], AccIndex) for every element a lane holds.
template <int MT, int NT, class F>
__device__ __forceinline__ void map_acc(float (&acc)[MT][NT][4], int lane, F f) {
    const int gr = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                acc[mt][n][r] =
                    f(acc[mt][n][r], AccIndex{mt, n, r, mt * 16 + gr + (r >> 1) * 8, n * 8 + 2 * t + (r & 1)});
}

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
    map_acc(acc, 0, [](float, AccIndex) { return 0.f; });
}

// Stores a warp's 16*MT x HS accumulator (times mul) as bf16 into global rows row0.. (row stride
// g_stride), skipping rows >= T. Each quad writes 4 x 4 contiguous bytes of a row per n-tile.
template <int MT, int NT>
__device__ __forceinline__ void store_rows(bf16* g, size_t g_stride, const float (&acc)[MT][NT][4], int row0,
                                           int T, float mul, int lane) {
    const int gr = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = row0 + mt * 16 + gr + hf * 8;
            if (row < T) {
                bf16* p = g + (size_t)row * g_stride + 2 * t;
#pragma unroll
                for (int n = 0; n < NT; ++n)
                    *reinterpret_cast<__nv_bfloat162*>(p + n * 8) =
                        __floats2bfloat162_rn(acc[mt][n][2 * hf] * mul, acc[mt][n][2 * hf + 1] * mul);
            }
        }
}

// ---- forward ------------------------------------------------------------------------------------------
template <int HS>
struct FwdConfig {
    // m16 tiles per warp: 2 halves the K/V shared-memory reads per mma; HS 128 has no registers for it
    static constexpr int kMT = HS == 64 ? 2 : 1;
    static constexpr int kBlockQ = 16 * kMT * kWarps;
    // Q fragments held in registers for HS 128 (1 m-tile); for HS 64 the 2 m-tiles' score and output
    // accumulators leave no room (it spills), so Q is re-read from shared memory per k-chunk.
    static constexpr bool kQInRegs = HS == 128;
    static constexpr int kStride = HS + 8;
    // Q tile + double-buffered K and V tiles
    static constexpr size_t kSmemBytes = (size_t)(kBlockQ + 4 * kBlock) * kStride * sizeof(bf16);
};

template <int HS>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int T,
                             QkvLayout lay, int num_bh, int num_qblocks, float scale_log2) {
    using Cfg = FwdConfig<HS>;
    constexpr int MT = Cfg::kMT, BQ = Cfg::kBlockQ, S = Cfg::kStride;
    constexpr int KC = HS / 16;      // k-chunks of Q K^T
    constexpr int NTS = kBlock / 8;  // n-tiles of a score block (keys)
    constexpr int NTO = HS / 8;      // n-tiles of the output
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + BQ * S;           // [2][kBlock][S]
    bf16* sV = sK + 2 * kBlock * S;   // [2][kBlock][S]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gr = lane >> 2, t = lane & 3;
    // query blocks in decreasing order: the first CTAs launched are the ones with the most keys
    const int qb = num_qblocks - 1 - (int)(blockIdx.x / num_bh);
    const int bh = blockIdx.x % num_bh;
    const int b = bh / lay.NH, h = bh % lay.NH;
    const int C = lay.NH * HS;
    const size_t row_stride = lay.row_stride();
    const bf16* row_g = qkv + (size_t)b * T * row_stride;
    const bf16* q_g = row_g + lay.q(h);
    const bf16* k_g = row_g + lay.k(lay.kv_head(h));
    const bf16* v_g = row_g + lay.v(lay.kv_head(h));
    const int q0 = qb * BQ;
    const int num_kblocks = (min(q0 + BQ, T) - 1) / kBlock + 1;  // up to the block of the last real row

    load_tile_async<BQ, HS, S>(sQ, q_g, row_stride, q0, T, tid);
    load_tile_async<kBlock, HS, S>(sK, k_g, row_stride, 0, T, tid);
    load_tile_async<kBlock, HS, S>(sV, v_g, row_stride, 0, T, tid);
    cp_async_commit();

    const int warp_row0 = q0 + warp * 16 * MT;  // first query row of this warp
    AOperand<MT, KC, S, Cfg::kQInRegs> q_frag(sQ + warp * 16 * MT * S, lane);
    float o[MT][NTO][4];
    zero_acc(o);
    float row_max[MT][2], row_sum[MT][2];  // per (m-tile, row g / g+8); row_sum is this thread's share
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            row_max[mt][hf] = -INFINITY;
            row_sum[mt][hf] = 0.f;
        }

    for (int kb = 0; kb < num_kblocks; ++kb) {
        const int buf = kb & 1;
        if (kb + 1 < num_kblocks) {
            // buffer buf^1 was last read in iteration kb-1, which ended in __syncthreads
            load_tile_async<kBlock, HS, S>(sK + (buf ^ 1) * kBlock * S, k_g, row_stride, (kb + 1) * kBlock, T, tid);
            load_tile_async<kBlock, HS, S>(sV + (buf ^ 1) * kBlock * S, v_g, row_stride, (kb + 1) * kBlock, T, tid);
            cp_async_commit();
            cp_async_wait<1>();  // everything but the prefetch just issued has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (kb == 0) q_frag.preload();

        const int k0 = kb * kBlock;
        if (k0 <= warp_row0 + 16 * MT - 1) {  // else every key of the block is above all rows of the warp
            float s[MT][NTS][4];
            zero_acc(s);
            warp_mma_abt<MT, KC, NTS, S>(s, q_frag, sK + buf * kBlock * S, lane);

            // log2-domain scores; the causal mask only where the block reaches past the warp's first row
            const bool diag = k0 + kBlock - 1 > warp_row0;
            map_acc(s, lane, [&](float x, AccIndex e) {
                return diag && k0 + e.col > warp_row0 + e.row ? -INFINITY : x * scale_log2;
            });

            // online softmax: a row lives in the 4 lanes of a quad (2 columns per n-tile each)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    float mx = row_max[mt][hf];
#pragma unroll
                    for (int n = 0; n < NTS; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hf], s[mt][n][2 * hf + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    // a row with no unmasked key so far keeps max -inf; subtract 0 instead so that
                    // -inf - -inf never makes a NaN (its p are all 2^-inf = 0)
                    const float base = mx == -INFINITY ? 0.f : mx;
                    const float corr = fast_exp2(row_max[mt][hf] - base);
                    row_max[mt][hf] = mx;
                    float sum = 0.f;
#pragma unroll
                    for (int n = 0; n < NTS; ++n) {
                        const float p0 = fast_exp2(s[mt][n][2 * hf] - base);
                        const float p1 = fast_exp2(s[mt][n][2 * hf + 1] - base);
                        s[mt][n][2 * hf] = p0;
                        s[mt][n][2 * hf + 1] = p1;
                        sum += p0 + p1;
                    }
                    row_sum[mt][hf] = row_sum[mt][hf] * corr + sum;
#pragma unroll
                    for (int n = 0; n < NTO; ++n) {
                        o[mt][n][2 * hf] *= corr;
                        o[mt][n][2 * hf + 1] *= corr;
                    }
                }

            uint32_t p_frag[NTS / 2][MT][4];
            acc_to_a<MT, NTS>(p_frag, s);
            warp_mma_ab<MT, NTS / 2, NTO, S>(o, p_frag, sV + buf * kBlock * S, lane);
        }
        __syncthreads();  // buffer buf is refilled by the next iteration's prefetch
    }

    // epilogue: O = o / l, lse = m ln2 + ln l (m is in the log2 domain)
    float inv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float l = row_sum[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[mt][hf] = l > 0.f ? 1.f / l : 0.f;
            const int row = warp_row0 + mt * 16 + gr + hf * 8;
            if (row < T && t == 0) lse[(size_t)bh * T + row] = row_max[mt][hf] * kLn2 + logf(l);
        }
    map_acc(o, lane, [&](float x, AccIndex e) { return x * inv[e.mt][e.r >> 1]; });
    store_rows<MT, NTO>(out + (size_t)b * T * C + (size_t)h * HS, C, o, warp_row0, T, 1.f, lane);
}

// ---- backward -----------------------------------------------------------------------------------------
template <int HS>
struct BwdConfig {
    static constexpr int kStride = HS + 8;
    static constexpr int kTile = kBlock * kStride;  // elements of one 64-row tile
    // Keep the warp's fixed A operands (K, V in dK/dV; Q, dO in dQ) in registers only for HS 64; for HS
    // 128 they would take 64 more registers next to 128 of accumulators and spill.
    static constexpr bool kAInRegs = HS == 64;
    // dQ: m16 tiles of queries per warp, queries per CTA, keys per inner step (the score tile of a step
    // is 16*kDqMT x kDqSub; 2 m-tiles halve the K/V shared-memory reads per mma, the short step keeps the
    // score/dP accumulators small enough for that).
    static constexpr int kDqMT = HS == 64 ? 2 : 1;
    static constexpr int kDqRows = 16 * kDqMT * kWarps;
    static constexpr int kDqSub = HS == 64 ? 16 : kBlock;
    // dK/dV likewise: m16 tiles of keys per warp, keys per CTA, queries per inner step. K fragments stay
    // in registers for HS 64; V is re-read from shared memory (with V in registers too, 2 m-tiles spill).
    static constexpr int kKvMT = HS == 64 ? 2 : 1;
    static constexpr int kKvRows = 16 * kKvMT * kWarps;
    static constexpr int kKvSub = HS == 64 ? 16 : kBlock;
    static constexpr bool kKInRegs = kAInRegs;
    static constexpr bool kVInRegs = kAInRegs && kKvMT == 1;
    // dK/dV: K, V (kKvRows each), Q[2], dO[2] tiles + lse[2], D[2] rows
    static constexpr size_t kDkdvSmemBytes =
        (2 * (size_t)kKvRows * kStride + 4 * (size_t)kTile) * sizeof(bf16) + 4 * kBlock * sizeof(float);
    // dQ: Q, dO (kDqRows each), K[2], V[2] tiles
    static constexpr size_t kDqSmemBytes = (2 * (size_t)kDqRows * kStride + 4 * (size_t)kTile) * sizeof(bf16);
};

// D[b,h,t] = sum_d dO[b,t,h*HS+d] * O[b,t,h*HS+d]. A row (b,t,h) is HS contiguous elements at offset
// ((b*T+t)*NH+h)*HS of both (B,T,C) tensors; HS/8 consecutive threads read it in 16-byte pieces and
// reduce with shuffles (fixed order: deterministic).
template <int HS>
__global__ void attention_backward_preprocess_kernel(float* __restrict__ dvec, const bf16* __restrict__ dout,
                                                     const bf16* __restrict__ out, int B, int T, int NH) {
    constexpr int G = HS / 8;  // threads per row, divides 32
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t total = (size_t)B * T * NH * G;
    float acc = 0.f;
    if (idx < total) {
        const uint4 a = *reinterpret_cast<const uint4*>(dout + idx * 8);
        const uint4 c = *reinterpret_cast<const uint4*>(out + idx * 8);
        const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
        const __nv_bfloat162* c2 = reinterpret_cast<const __nv_bfloat162*>(&c);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 x = __bfloat1622float2(a2[k]);
            const float2 y = __bfloat1622float2(c2[k]);
            acc = fmaf(x.x, y.x, acc);
            acc = fmaf(x.y, y.y, acc);
        }
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (idx < total && idx % G == 0) {
        const size_t row = idx / G;  // (b*T + t)*NH + h
        const int h = (int)(row % NH);
        const size_t bt = row / NH;
        const int tt = (int)(bt % T);
        const size_t b = bt / T;
        dvec[(b * NH + h) * T + tt] = acc;
    }
}

// dK, dV for one key block of kKvRows keys of one key/value head (warp w owns keys 16*MT*w.. +16*MT-1),
// looping over the group's query heads and, for each, over the 64-query blocks that reach the block's keys:
// tile it of the sequence is query block qb_first + it % nq of query head G kh + it / nq. Each query block
// is taken kKvSub queries at a time.
template <int HS>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                   const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                   const float* __restrict__ dvec, int T, QkvLayout lay, int num_bkv,
                                   int num_qblocks, float scale, float scale_log2) {
    using Cfg = BwdConfig<HS>;
    constexpr int S = Cfg::kStride, TILE = Cfg::kTile;
    constexpr int MT = Cfg::kKvMT, BK = Cfg::kKvRows, SUB = Cfg::kKvSub;
    constexpr int KC = HS / 16;   // k-chunks over the head dimension
    constexpr int NTS = SUB / 8;  // n-tiles over the SUB queries of a step
    constexpr int NTO = HS / 8;   // n-tiles over the head dimension
    static_assert(kBlock % SUB == 0 && SUB % 16 == 0, "query steps must tile the query block");
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + BK * S;
    bf16* sQ = sV + BK * S;     // [2][TILE]
    bf16* sdO = sQ + 2 * TILE;  // [2][TILE]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * TILE);  // [2][kBlock]
    float* sD = sLse + 2 * kBlock;                           // [2][kBlock]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // key blocks in increasing order: block 0 meets every query block, so it starts first
    const int kb = (int)(blockIdx.x / num_bkv);
    const int bkv = blockIdx.x % num_bkv;
    const int b = bkv / lay.NKV, kh = bkv % lay.NKV;
    const int G = lay.NH / lay.NKV;
    const int C = lay.NH * HS;
    const size_t row_stride = lay.row_stride();
    const bf16* row_g = qkv + (size_t)b * T * row_stride;
    const bf16* k_g = row_g + lay.k(kh);
    const bf16* v_g = row_g + lay.v(kh);
    // the group's first query head; head G kh + j is j HS columns (Q, dO) or j T rows (lse, D) further
    const int h0 = G * kh;
    const bf16* q_g = row_g + lay.q(h0);
    const bf16* do_g = dout + (size_t)b * T * C + (size_t)h0 * HS;
    const float* lse_g = lse + ((size_t)b * lay.NH + h0) * T;
    const float* d_g = dvec + ((size_t)b * lay.NH + h0) * T;
    const int k0 = kb * BK;
    // the first query block is the one holding query k0 (queries before k0 see none of these keys)
    const int qb_first = k0 / kBlock;
    const int nq = num_qblocks - qb_first;  // query blocks per query head
    // tile `it` of the sequence (Q, dO, lse, D rows of its head and query block) into buffer nb
    auto load_q_tile = [&](int it, int nb) {
        const int j = it / nq, q0 = (qb_first + it - j * nq) * kBlock;
        load_tile_async<kBlock, HS, S>(sQ + nb * TILE, q_g + j * HS, row_stride, q0, T, tid);
        load_tile_async<kBlock, HS, S>(sdO + nb * TILE, do_g + j * HS, C, q0, T, tid);
        load_row_floats_async(sLse + nb * kBlock, lse_g + (size_t)j * T, q0, T, tid);
        load_row_floats_async(sD + nb * kBlock, d_g + (size_t)j * T, q0, T, tid);
    };

    load_tile_async<BK, HS, S>(sK, k_g, row_stride, k0, T, tid);
    load_tile_async<BK, HS, S>(sV, v_g, row_stride, k0, T, tid);
    load_q_tile(0, 0);
    cp_async_commit();

    const int warp_key0 = k0 + warp * 16 * MT;
    AOperand<MT, KC, S, Cfg::kKInRegs> k_frag(sK + warp * 16 * MT * S, lane);
    AOperand<MT, KC, S, Cfg::kVInRegs> v_frag(sV + warp * 16 * MT * S, lane);
    float dk[MT][NTO][4], dv[MT][NTO][4];
    zero_acc(dk);
    zero_acc(dv);

    for (int it = 0; it < G * nq; ++it) {
        const int buf = it & 1;
        if (it + 1 < G * nq) {
            load_q_tile(it + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
            k_frag.preload();
            v_frag.preload();
        }
        const int q0 = (qb_first + it % nq) * kBlock;
#pragma unroll
        for (int sub = 0; sub < kBlock / SUB; ++sub) {
            const int qs = q0 + sub * SUB;  // first query of the step
            if (qs + SUB - 1 < warp_key0) continue;  // every query of the step precedes every key of the warp
            const bf16* sQb = sQ + buf * TILE + sub * SUB * S;
            const bf16* sdOb = sdO + buf * TILE + sub * SUB * S;
            const float* sLseb = sLse + buf * kBlock + sub * SUB;
            const float* sDb = sD + buf * kBlock + sub * SUB;

            // P^T (16MT keys x SUB queries) = exp2(S^T log2e scale - lse log2e), masked where query < key.
            // Query rows past T have Q = dO = 0 and lse = D = 0 (zero-filled): P = 1 there but every term
            // it enters (P^T dO, dP^T = V dO^T = 0) vanishes.
            float st[MT][NTS][4];
            zero_acc(st);
            warp_mma_abt<MT, KC, NTS, S>(st, k_frag, sQb, lane);
            const bool diag = qs < warp_key0 + 16 * MT - 1;  // some query of the step precedes some key
            map_acc(st, lane, [&](float x, AccIndex e) {  // rows: keys of the warp, columns: queries of the step
                const float p = fast_exp2(fmaf(x, scale_log2, -sLseb[e.col] * kLog2e));
                return diag && warp_key0 + e.row > qs + e.col ? 0.f : p;
            });
            uint32_t a_frag[NTS / 2][MT][4];
            acc_to_a<MT, NTS>(a_frag, st);
            warp_mma_ab<MT, NTS / 2, NTO, S>(dv, a_frag, sdOb, lane);  // dV += P^T dO

            float dpt[MT][NTS][4];
            zero_acc(dpt);
            warp_mma_abt<MT, KC, NTS, S>(dpt, v_frag, sdOb, lane);  // dP^T = V dO^T
            map_acc(dpt, lane, [&](float x, AccIndex e) {  // dS^T
                return st[e.mt][e.n][e.r] * (x - sDb[e.col]);
            });
            acc_to_a<MT, NTS>(a_frag, dpt);
            warp_mma_ab<MT, NTS / 2, NTO, S>(dk, a_frag, sQb, lane);  // dK += dS^T Q (times scale below)
        }
        __syncthreads();
    }

    bf16* drow_g = dqkv + (size_t)b * T * row_stride;
    store_rows<MT, NTO>(drow_g + lay.k(kh), row_stride, dk, warp_key0, T, scale, lane);
    store_rows<MT, NTO>(drow_g + lay.v(kh), row_stride, dv, warp_key0, T, 1.f, lane);
}

// dQ for one query block of kDqRows queries (warp w owns queries 16*MT*w.. +16*MT-1), looping over the
// 64-key blocks up to the diagonal; each key block is taken kDqSub keys at a time.
template <int HS>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                 const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                 const float* __restrict__ dvec, int T, QkvLayout lay, int num_bh,
                                 int num_blocks, float scale, float scale_log2) {
    using Cfg = BwdConfig<HS>;
    constexpr int S = Cfg::kStride, TILE = Cfg::kTile;
    constexpr int MT = Cfg::kDqMT, BQ = Cfg::kDqRows, SUB = Cfg::kDqSub;
    constexpr int KC = HS / 16;
    constexpr int NTS = SUB / 8;  // n-tiles over the SUB keys of a step
    constexpr int NTO = HS / 8;
    static_assert(kBlock % SUB == 0 && SUB % 16 == 0, "key steps must tile the key block");
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sdO = sQ + BQ * S;
    bf16* sK = sdO + BQ * S;   // [2][TILE]
    bf16* sV = sK + 2 * TILE;  // [2][TILE]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gr = lane >> 2;
    const int qb = num_blocks - 1 - (int)(blockIdx.x / num_bh);  // most keys first
    const int bh = blockIdx.x % num_bh;
    const int b = bh / lay.NH, h = bh % lay.NH;
    const int C = lay.NH * HS;
    const size_t row_stride = lay.row_stride();
    const bf16* row_g = qkv + (size_t)b * T * row_stride;
    const bf16* q_g = row_g + lay.q(h);
    const bf16* k_g = row_g + lay.k(lay.kv_head(h));
    const bf16* v_g = row_g + lay.v(lay.kv_head(h));
    const bf16* do_g = dout + (size_t)b * T * C + (size_t)h * HS;
    const int q0 = qb * BQ;
    const int num_kblocks = (min(q0 + BQ, T) - 1) / kBlock + 1;

    load_tile_async<BQ, HS, S>(sQ, q_g, row_stride, q0, T, tid);
    load_tile_async<BQ, HS, S>(sdO, do_g, C, q0, T, tid);
    load_tile_async<kBlock, HS, S>(sK, k_g, row_stride, 0, T, tid);
    load_tile_async<kBlock, HS, S>(sV, v_g, row_stride, 0, T, tid);
    cp_async_commit();

    const int warp_row0 = q0 + warp * 16 * MT;
    // this thread's rows (g, g+8 of each m-tile): lse in the log2 domain and D; rows past T get 0
    float lse2[MT][2], dval[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = warp_row0 + mt * 16 + gr + hf * 8;
            lse2[mt][hf] = row < T ? lse[(size_t)bh * T + row] * kLog2e : 0.f;
            dval[mt][hf] = row < T ? dvec[(size_t)bh * T + row] : 0.f;
        }
    AOperand<MT, KC, S, Cfg::kAInRegs> q_frag(sQ + warp * 16 * MT * S, lane);
    AOperand<MT, KC, S, Cfg::kAInRegs> do_frag(sdO + warp * 16 * MT * S, lane);
    float dq[MT][NTO][4];
    zero_acc(dq);

    for (int kb = 0; kb < num_kblocks; ++kb) {
        const int buf = kb & 1;
        if (kb + 1 < num_kblocks) {
            load_tile_async<kBlock, HS, S>(sK + (buf ^ 1) * TILE, k_g, row_stride, (kb + 1) * kBlock, T, tid);
            load_tile_async<kBlock, HS, S>(sV + (buf ^ 1) * TILE, v_g, row_stride, (kb + 1) * kBlock, T, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (kb == 0) {
            q_frag.preload();
            do_frag.preload();
        }
#pragma unroll
        for (int sub = 0; sub < kBlock / SUB; ++sub) {
            const int ks = kb * kBlock + sub * SUB;  // first key of the step
            if (ks > warp_row0 + 16 * MT - 1) break;  // this and later steps: all keys follow all rows of the warp
            const bf16* sKb = sK + buf * TILE + sub * SUB * S;
            const bf16* sVb = sV + buf * TILE + sub * SUB * S;
            float s[MT][NTS][4];
            zero_acc(s);
            warp_mma_abt<MT, KC, NTS, S>(s, q_frag, sKb, lane);  // S = Q K^T
            const bool diag = ks + SUB - 1 > warp_row0;
            map_acc(s, lane, [&](float x, AccIndex e) {
                const float p = fast_exp2(fmaf(x, scale_log2, -lse2[e.mt][e.r >> 1]));
                return diag && ks + e.col > warp_row0 + e.row ? 0.f : p;
            });
            float dp[MT][NTS][4];
            zero_acc(dp);
            warp_mma_abt<MT, KC, NTS, S>(dp, do_frag, sVb, lane);  // dP = dO V^T
            map_acc(dp, lane, [&](float x, AccIndex e) {  // dS
                return s[e.mt][e.n][e.r] * (x - dval[e.mt][e.r >> 1]);
            });
            uint32_t ds_frag[NTS / 2][MT][4];
            acc_to_a<MT, NTS>(ds_frag, dp);
            warp_mma_ab<MT, NTS / 2, NTO, S>(dq, ds_frag, sKb, lane);  // dQ += dS K (times scale below)
        }
        __syncthreads();
    }

    store_rows<MT, NTO>(dqkv + (size_t)b * T * row_stride + lay.q(h), row_stride, dq, warp_row0, T, scale, lane);
}

// ---- host side ----------------------------------------------------------------------------------------
int g_attention_backend = 0;  // attention_set_backend: 0 automatic, 1 always the mma.sync kernels above
int g_sm90_forward_variant = -1;  // attention_set_sm90_forward_variant

#ifdef GPT2CU_HAVE_SM90_ATTENTION
// compute capability major of the current device (cached per device ordinal)
int current_cc_major() {
    static int cache[64];  // 0 = not read yet
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    if (device < 0 || device >= 64) return 0;
    if (cache[device] == 0) CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrComputeCapabilityMajor, device));
    return cache[device];
}
#endif

// the Hopper kernels (attention_sm90.cu) run when they were built, the device is 9.x, and the shape is
// supported; backend 2 keeps the backward on the mma.sync kernels
bool attention_sm90_forward_selected(int B, int T, int NH, int HS) {
#ifdef GPT2CU_HAVE_SM90_ATTENTION
    return g_attention_backend != 1 && current_cc_major() == 9 && attention_sm90_supported(B, T, NH, HS);
#else
    (void)B, (void)T, (void)NH, (void)HS;
    return false;
#endif
}
bool attention_sm90_backward_selected(int B, int T, int NH, int HS) {
    return g_attention_backend == 0 && attention_sm90_forward_selected(B, T, NH, HS);
}

void check_shapes(int B, int T, int NH, int NKV, int HS) {
    require(B > 0 && T > 0 && NH > 0, "attention: B, T, NH must be positive");
    require(NKV > 0 && NH % NKV == 0, "attention: NKV must divide NH");
    require(HS == 64 || HS == 128, "attention: head size must be 64 or 128");
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 1-D grids of blocks_per_head * heads CTAs; the head/batch index varies fastest.
unsigned int grid_size(int blocks, int num_heads) {
    const long long n = (long long)blocks * num_heads;
    require(n <= 0x7fffffffLL, "attention: grid too large");
    return (unsigned int)n;
}

float scale_log2_of(int HS) { return (float)(1.0 / std::sqrt((double)HS) * 1.4426950408889634); }

template <int HS>
void launch_forward(bf16* out, float* lse, const bf16* qkv, int B, int T, QkvLayout lay, cudaStream_t stream) {
    using Cfg = FwdConfig<HS>;
    auto kernel = attention_forward_kernel<HS>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Cfg::kSmemBytes));
    const int num_bh = B * lay.NH;
    const int num_qblocks = ceil_div(T, Cfg::kBlockQ);
    kernel<<<grid_size(num_qblocks, num_bh), kThreads, Cfg::kSmemBytes, stream>>>(out, lse, qkv, T, lay, num_bh,
                                                                                   num_qblocks, scale_log2_of(HS));
    CUDA_CHECK_LAUNCH();
}

template <int HS>
void launch_preprocess(float* dvec, const bf16* dout, const bf16* out, int B, int T, int NH, cudaStream_t stream) {
    const size_t threads = (size_t)B * T * NH * (HS / 8);
    const int block = 256;
    const size_t grid = (threads + block - 1) / block;
    require(grid <= 0x7fffffffULL, "attention_backward: grid too large");
    attention_backward_preprocess_kernel<HS><<<(unsigned int)grid, block, 0, stream>>>(dvec, dout, out, B, T, NH);
    CUDA_CHECK_LAUNCH();
}

// the dK/dV and dQ kernels, after launch_preprocess
template <int HS>
void launch_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dvec, int B,
                     int T, QkvLayout lay, cudaStream_t stream) {
    using Cfg = BwdConfig<HS>;
    const int num_qblocks = ceil_div(T, kBlock);  // 64-query blocks the dK/dV kernel loops over
    const float scale = (float)(1.0 / std::sqrt((double)HS)), scale_log2 = scale_log2_of(HS);
    {
        auto kernel = attention_backward_dkdv_kernel<HS>;
        CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Cfg::kDkdvSmemBytes));
        const int num_bkv = B * lay.NKV;
        kernel<<<grid_size(ceil_div(T, Cfg::kKvRows), num_bkv), kThreads, Cfg::kDkdvSmemBytes, stream>>>(
            dqkv, dout, qkv, lse, dvec, T, lay, num_bkv, num_qblocks, scale, scale_log2);
        CUDA_CHECK_LAUNCH();
    }
    {
        auto kernel = attention_backward_dq_kernel<HS>;
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Cfg::kDqSmemBytes));
        const int num_bh = B * lay.NH;
        const int num_dq_blocks = ceil_div(T, Cfg::kDqRows);
        kernel<<<grid_size(num_dq_blocks, num_bh), kThreads, Cfg::kDqSmemBytes, stream>>>(
            dqkv, dout, qkv, lse, dvec, T, lay, num_bh, num_dq_blocks, scale, scale_log2);
        CUDA_CHECK_LAUNCH();
    }
}

}  // namespace

void attention_set_backend(int backend) {
    require(backend >= 0 && backend <= 2,
            "attention_set_backend: 0 (automatic), 1 (mma.sync kernels only), 2 (sm_90 forward, mma.sync backward)");
    g_attention_backend = backend;
}

void attention_set_sm90_forward_variant(int variant) {
    require(variant >= -1 && variant <= 1, "attention_set_sm90_forward_variant: -1 (default), 0 or 1");
    g_sm90_forward_variant = variant;
}

int attention_backend_in_use(int B, int T, int NH, int HS) {
    return (attention_sm90_forward_selected(B, T, NH, HS) ? 90 : 80) +
           (attention_sm90_backward_selected(B, T, NH, HS) ? 9000 : 8000);
}

void attention_forward(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, int NKV, int HS,
                       cudaStream_t stream) {
    check_shapes(B, T, NH, NKV, HS);
    require(aligned16(qkv), "attention_forward: qkv must be 16-byte aligned");
    require((reinterpret_cast<uintptr_t>(out) & 3) == 0 && (reinterpret_cast<uintptr_t>(lse) & 3) == 0,
            "attention_forward: out and lse must be 4-byte aligned");
    if (attention_sm90_forward_selected(B, T, NH, HS)) {
#ifdef GPT2CU_HAVE_SM90_ATTENTION
        attention_forward_sm90(out, lse, qkv, B, T, NH, NKV, HS, stream, g_sm90_forward_variant);
        return;
#endif
    }
    const QkvLayout lay{NH, NKV, HS};
    if (HS == 64)
        launch_forward<64>(out, lse, qkv, B, T, lay, stream);
    else
        launch_forward<128>(out, lse, qkv, B, T, lay, stream);
}

void attention_backward_preprocess(float* D, const bf16* dout, const bf16* out, int B, int T, int NH, int HS,
                                   cudaStream_t stream) {
    require(B > 0 && T > 0 && NH > 0 && (HS == 64 || HS == 128),
            "attention_backward_preprocess: B, T, NH positive, head size 64 or 128");
    require(aligned16(dout) && aligned16(out) && (reinterpret_cast<uintptr_t>(D) & 3) == 0,
            "attention_backward_preprocess: dout and out 16-byte aligned, D 4-byte aligned");
    if (HS == 64)
        launch_preprocess<64>(D, dout, out, B, T, NH, stream);
    else
        launch_preprocess<128>(D, dout, out, B, T, NH, stream);
}

size_t attention_backward_scratch_floats(int B, int T, int NH, int HS) {
    size_t n = (size_t)B * NH * T;  // D = rowsum(dO * O), one float per (b, h, t)
#ifdef GPT2CU_HAVE_SM90_ATTENTION
    // then the Hopper backward's work area (its fp32 dQ accumulator, the qkv bias gradient's partial rows)
    if (attention_sm90_backward_selected(B, T, NH, HS)) return n + attention_sm90_backward_work_floats(B, T, NH, HS);
#endif
    // elsewhere bias_backward's partials for dqkv_bias, for the widest qkv row (NKV = NH)
    return n + bias_backward_scratch_floats(B * T, 3 * NH * HS);
}

void attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                        float* scratch, size_t scratch_floats, int B, int T, int NH, int NKV, int HS,
                        cudaStream_t stream, const float* dout_head_dot, bf16* dqkv_bias) {
    check_shapes(B, T, NH, NKV, HS);
    const size_t d_floats = (size_t)B * NH * T;  // D's part of the scratch, left out when the caller gives D
    require(scratch_floats + (dout_head_dot ? d_floats : 0) >= attention_backward_scratch_floats(B, T, NH, HS),
            "attention_backward: scratch too small");
    require(aligned16(qkv) && aligned16(dout) && aligned16(out),
            "attention_backward: qkv, dout and out must be 16-byte aligned");
    require((reinterpret_cast<uintptr_t>(dqkv) & 3) == 0 && (reinterpret_cast<uintptr_t>(lse) & 3) == 0 &&
                (reinterpret_cast<uintptr_t>(scratch) & 3) == 0 &&
                (reinterpret_cast<uintptr_t>(dout_head_dot) & 3) == 0 &&
                (reinterpret_cast<uintptr_t>(dqkv_bias) & 1) == 0,
            "attention_backward: dqkv, lse, scratch and dout_head_dot must be 4-byte aligned, dqkv_bias 2-byte");
    const QkvLayout lay{NH, NKV, HS};
    // the dK/dV and dQ kernels read qkv while other CTAs write dqkv: they must not overlap
    const size_t qkv_bytes = (size_t)B * T * lay.row_stride() * sizeof(bf16);
    const uintptr_t a = reinterpret_cast<uintptr_t>(dqkv), q = reinterpret_cast<uintptr_t>(qkv);
    require(a + qkv_bytes <= q || q + qkv_bytes <= a, "attention_backward: dqkv must not overlap qkv");
    const float* dvec = dout_head_dot;
    if (!dvec) {
        attention_backward_preprocess(scratch, dout, out, B, T, NH, HS, stream);
        dvec = scratch;
        scratch += d_floats;
        scratch_floats -= d_floats;
    }
    if (attention_sm90_backward_selected(B, T, NH, HS)) {
#ifdef GPT2CU_HAVE_SM90_ATTENTION
        attention_backward_sm90(dqkv, dout, qkv, lse, dvec, B, T, NH, NKV, HS, scratch, scratch_floats, stream,
                                dqkv_bias);
        return;
#endif
    }
    if (HS == 64)
        launch_backward<64>(dqkv, dout, qkv, lse, dvec, B, T, lay, stream);
    else
        launch_backward<128>(dqkv, dout, qkv, lse, dvec, B, T, lay, stream);
    // the qkv bias gradient: bias.cu's pass over the stored dqkv, its partials in the scratch after D
    if (dqkv_bias) bias_backward(dqkv_bias, dqkv, scratch, scratch_floats, B * T, lay.row_stride(), stream);
}
