// attention_sm90.cu: causal flash attention for Hopper (sm_90a): wgmma tensor-core products fed by TMA.
// Same contract as attention.cu (read its header for the math and the layouts): the packed qkv
// (B, T, (NH + 2 NKV) HS) = [q: NH heads | k: NKV heads | v: NKV heads], query head h reading key/value head
// h / (NH / NKV); out (B, T, NH HS), lse (B, NH, T) fp32 natural log, scale 1/sqrt(HS); head sizes 64 and
// 128; any T.
// Built only for sm_90a (CMake compiles this file with -gencode=arch=compute_90a,code=sm_90a when 90 is
// among the architectures); attention.cu dispatches here on compute capability 9.x.
//
// ---- Forward --------------------------------------------------------------------------------------------
// A persistent grid (one CTA per multiprocessor) takes work items (a 128- or 192-query block of one query head
// and batch) dynamically; each CTA has kWG + 1 warpgroups, warp-specialised:
//   warpgroup 0, the producer: gives up registers (setmaxnreg 24); one thread issues the TMA loads: the Q
//     block once, then K and V tiles of 128 keys of its key/value head from the diagonal tile down to
//     tile 0 (the query heads of a group read the same tiles, through L2), into a ring of
//     kStages shared-memory stages. Each stage has a "full" mbarrier per tensor (K, V; completed by the
//     copy engine's byte count) and an "empty" mbarrier (the consumer threads arrive when done with
//     the stage).
//   warpgroups 1 .. kWG, the consumers: each owns 64 of the query rows. Per key tile:
//     S = Q K^T by wgmma m64n128k16 from shared memory (Q and K both K-major), online softmax on the
//     accumulators in registers (exp2 with the scale folded in, row max over the 4 lanes of a quad),
//     P converted in registers to the A fragments of the second product O += P V (wgmma with A from
//     registers, V as an MN-major B operand: no transpose needed anywhere). The mask is evaluated on the
//     diagonal tile only (the first one processed); a warpgroup whose 64 rows are the first half of that tile's
//     128 computes it on its first 64 keys only (m64n64 S, half the softmax and P V). The product S_{i+1} = Q K_{i+1}^T is issued before
//     O += P_i V_i (FlashAttention-3's intra-warpgroup overlap; how much of the softmax of S_{i+1} runs under
//     P_i V_i is left to ptxas: see the wait in the loop), and the consumer warpgroups take turns to issue their
//     products (named barriers), so that one's softmax runs under the others' products.
//   Variants (attention_forward_sm90's `variant`): 0: 2 consumer warpgroups on 128-query blocks (384 threads,
//   setmaxnreg 240), the default for HS 128; 1: 3 on 192-query blocks (512 threads; FlashAttention-3's shape
//   for head size 64: K/V tiles read from shared memory once per 192 queries instead of 128, one warpgroup's
//   softmax under two others' products), consumers at setmaxnreg 160 (S, P and O of the overlapped loop are
//   128 of them); HS 64 only, its default. Work items are ordered so the blocks of about one wave's worth of
//   heads run together (cta_order).
//   Rows past T: TMA zero-fills them on load; their outputs are never stored; the causal mask removes
//   keys >= T from every real row. The query blocks are aligned to end at T (to within 64 rows): the short
//   block is the first, its warpgroups of rows before 0 idle.
#include "kernels.h"
#include "common.cuh"
#include "attention_sm90.h"
#include "sm90_common.cuh"
#include "wgmma_sm90.cuh"

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPT2CU_SM90A_DEVICE 1
#endif

namespace {

using namespace sm90;

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPanelCols = 64;     // bf16 columns per 128-byte swizzled panel
constexpr int kPanelRowBytes = 128;

// kWG consumer warpgroups of 64 query rows each: 2 (128-row blocks, 384 threads, consumers at 240 registers) or
// 3 (192-row blocks, 512 threads, consumers at 160 registers: HS 64 only, where S, P and O of the overlapped
// loop fit in 160)
template <int HS, int kWG = 2>
struct FwdCfg {
    static_assert(kWG == 2 || (kWG == 3 && HS == 64), "3 consumer warpgroups: HS 64 only");
    static constexpr int kBM = 64 * kWG;           // query rows per CTA
    static constexpr int kBN = 128;                // keys per tile
    static constexpr int kStages = kWG == 2 ? 3 : 4;  // HS 128: 32 KB Q + 3 x 64 KB K/V = 224 KB; 3 WGs: 152 KB
    static constexpr int kPanels = HS / kPanelCols;
    static constexpr int kQBytes = kBM * HS * 2;
    static constexpr int kTileBytes = kBN * HS * 2;  // one K or V tile
    static constexpr int kQPanelBytes = kBM * kPanelRowBytes;
    static constexpr int kKPanelBytes = kBN * kPanelRowBytes;
    static constexpr int kBarOffset = kQBytes + 2 * kStages * kTileBytes;
    static constexpr int kNumBars = 2 + 3 * kStages;  // q_full, k_full[], v_full[], empty[], q_empty
    // + the current work item (int), + slack to align the base to 1024
    static constexpr int kSmemBytes = kBarOffset + 8 * kNumBars + 16 + 1024;
    static constexpr int kThreads = 128 * (kWG + 1);
    static constexpr int kConsumerThreads = 128 * kWG;
    // setmaxnreg: the producer warpgroup's and the consumers' shares of the 64K-register file (multiples of 8)
    static constexpr int kProducerRegs = 24;
    static constexpr int kConsumerRegs = kWG == 2 ? 240 : 160;
    static_assert(kProducerRegs * 128 + kConsumerRegs * kConsumerThreads <= 65536, "register file");
};

// CTA order: the blocks of `group` consecutive (batch, head) pairs run together, heaviest block first within
// the group (index j = 0: the most key or query tiles). Concurrent CTAs then share their heads' K/V (or Q/dO)
// tiles through L2; with the head index fastest over all heads (the mma.sync kernels' order), each tile was
// fetched from DRAM once per block of its head, and the HS 64 forward was DRAM-bound (ncu: 53% of DRAM).
__device__ __forceinline__ void cta_order_of(int id, int num_bh, int nblk, int group, int& bh, int& j) {
    const int gi = id / (group * nblk);
    const int first = gi * group;
    const int gsize = min(group, num_bh - first);
    const int r = id - gi * group * nblk;
    j = r / gsize;
    bh = first + r % gsize;
}

// a shared-memory descriptor moved by `bytes`: the start address field (bits 0-13, address / 16) cannot carry
// into the next field (shared addresses are below 2^18), so only the low word changes
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) {
    const uint32_t lo = (uint32_t)desc + (bytes >> 4);
    return (desc & 0xffffffff00000000ull) | lo;
}

// the m64nN accumulator: float d[N/2]; d[4j + e]: row (16 warp + g + 8 (e >> 1)), column 8j + 2t + (e & 1)

// P fragments (fp32 accumulator s of an m64nN product) -> A fragments of the next product (k = the N columns;
// the first NC of them)
template <int N, int NC = N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[N / 16][4], const float (&s)[N / 2]) {
#pragma unroll
    for (int kk = 0; kk < NC / 16; ++kk) {
        a[kk][0] = pack_bf16x2(s[8 * kk + 0], s[8 * kk + 1]);
        a[kk][1] = pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
        a[kk][2] = pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
        a[kk][3] = pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// The column sums of a warp's 16 rows (the backward's qkv bias gradient). x[L]: a lane's values of L columns, the same
// L columns in the 8 lanes of one quad position t (lanes t, t + 4, .., t + 28; g = lane / 4 their rows). Three
// exchanges (lanes 16, 8 and 4 apart) each keep half of the columns, adding the partner's values of that half: x[i]
// ends as the sum over the 8 lanes of column (L / 8) g + i of the L (i < L / 8). 7L/8 shuffles (3L without halving).
template <int L, int kStep = 0>
__device__ __forceinline__ void sum_over_rows(float (&x)[L], int lane) {
    if constexpr (kStep < 3) {
        constexpr int half = (L >> kStep) / 2;
        const bool up = (lane >> (4 - kStep)) & 1;  // keeps the upper half
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = up ? x[i] : x[i + half];
            const float keep = up ? x[i + half] : x[i];
            x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16 >> kStep);
        }
        sum_over_rows<L, kStep + 1>(x, lane);
    }
}

// the column (of 0..N-1) of value i of store_acc_rows' column sums in lane (g, t): sum_over_rows' column (N / 32) g + i
// of the lane's N / 4, which are pairs 2t, 2t + 1 of each 8-column chunk
template <int N>
__device__ __forceinline__ int colsum_col(int lane, int i) {
    return 8 * ((N / 64) * (lane >> 2) + i / 2) + 2 * (lane & 3) + (i & 1);
}

// rows r0 (and r0 + 8) of an m64nN accumulator, times mult -> bf16 columns 0..N-1 at base (row stride row_stride
// elements, 16-byte aligned), rows < T only. The accumulator gives lane t of a quad 4 bytes of each 16-byte chunk
// of its rows; quad_transpose gives it whole chunks, so each store is 16 bytes and a warp's store covers 64
// contiguous bytes of each of 8 rows (not 16): a quarter of the store instructions, whole 32-byte sectors (ncu:
// the backward's 4-byte stores here held 12-16% of its warp samples, stalled on the memory instruction queue). The
// shuffles run in all lanes; a quad's lanes share their rows, so the guard is the same within each exchange.
// colsum (the backward's qkv bias gradient): the warp's column sums of the values as stored (bf16, rows < T), summed
// in fp32: value i for column colsum_col<N>(lane, i), from the packed words (unpacked by byte permutes that also
// zero rows >= T: 2 instructions a word, N / 4 adds for the two rows, then sum_over_rows).
template <int N, bool kColsum>
__device__ __forceinline__ void store_acc_rows_impl(bf16* base, size_t row_stride, const float (&acc)[N / 2], int r0,
                                                    int T, int t, float mult, float (&colsum)[N / 32]) {
    float x[N / 4];  // colsum: column 8j + 2t + e of the lane's rows in x[2j + e]
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + 8 * hr;
        bf16* p = base + (size_t)r * row_stride + 8 * t;
        // __byte_perm selectors: the low (high) bf16 of a word into the high half of a float, or 0 past T
        const uint32_t sel_lo = r < T ? 0x1044u : 0x4444u, sel_hi = r < T ? 0x3244u : 0x4444u;
#pragma unroll
        for (int m = 0; m < N / 32; ++m) {  // chunks 4m .. 4m + 3 (columns 32m ..)
            uint32_t w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k)
                w[k] = pack_bf16x2(acc[4 * (4 * m + k) + 2 * hr] * mult, acc[4 * (4 * m + k) + 2 * hr + 1] * mult);
            if constexpr (kColsum) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int j = 4 * m + k;
                    const float lo = __uint_as_float(__byte_perm(w[k], 0u, sel_lo));
                    const float hi = __uint_as_float(__byte_perm(w[k], 0u, sel_hi));
                    x[2 * j] = hr ? x[2 * j] + lo : lo;
                    x[2 * j + 1] = hr ? x[2 * j + 1] + hi : hi;
                }
            }
            const uint4 v = quad_transpose(w, t);
            if (r < T) *reinterpret_cast<uint4*>(p + 32 * m) = v;
        }
    }
    if constexpr (kColsum) {
        sum_over_rows<N / 4>(x, threadIdx.x & 31);
#pragma unroll
        for (int i = 0; i < N / 32; ++i) colsum[i] = x[i];
    }
}
template <int N>
__device__ __forceinline__ void store_acc_rows(bf16* base, size_t row_stride, const float (&acc)[N / 2], int r0,
                                               int T, int t, float mult) {
    float none[N / 32];
    store_acc_rows_impl<N, false>(base, row_stride, acc, r0, T, t, mult, none);
}
template <int N>
__device__ __forceinline__ void store_acc_rows(bf16* base, size_t row_stride, const float (&acc)[N / 2], int r0,
                                               int T, int t, float mult, float (&colsum)[N / 32]) {
    store_acc_rows_impl<N, true>(base, row_stride, acc, r0, T, t, mult, colsum);
}

// Work counters of a persistent kernel (one pair per kernel): [0] items taken from it, [1] CTAs that have taken
// their last. take_work returns base + the next count (items below base are taken without the counter: the
// forward's first round, blockIdx.x); a CTA takes until it gets an item >= num_work, so each takes exactly one such
// item, and the last CTA to do so zeroes both counters for the next launch (launches of one kernel on one stream
// run in order; two streams must not run the same kernel at once).
__device__ __forceinline__ int take_work(int* counter, int base, int num_work) {
    const int next = base + atomicAdd(&counter[0], 1);
    if (next >= num_work) {
        __threadfence();  // this CTA's last take comes before its count
        // the grid size read here (asm volatile): hoisted out of the caller's loop, it was spilled
        uint32_t ctas;
        asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(ctas));
        if (atomicAdd(&counter[1], 1) == (int)ctas - 1) {
            counter[0] = 0;
            counter[1] = 0;
        }
    }
    return next;
}

// Work items (query block, query head, batch) in cta_order's order (heaviest block first within a group of heads),
// on a persistent grid (one CTA per multiprocessor): CTA c takes item c first, then the next untaken one (a global
// counter), so no CTA idles while another has two left. The producer thread takes the item and passes it to the
// consumers in shared memory, written before its arrival on q_full (the consumers read it after their wait; it is
// rewritten only after q_empty); an item >= num_work ends the CTA. The K/V ring and its barrier phases run on
// across items, and Q has an "empty" barrier (each consumer warpgroup releases it once its last Q K^T product is
// done), so the producer loads the next item's Q and first K/V tiles while the consumers still finish the current
// one and store it: the pipeline fill and the epilogue of one item hide under the other's work.
// Consumer loop: S_{i+1} = Q K_{i+1}^T is issued before O += P_i V_i (intra-warpgroup overlap); the consumer
// warpgroups also take turns to issue their products ("ping-pong": warpgroup cw waits on named barrier 1 + cw and
// passes the turn to the next one, round robin), so one warpgroup's softmax runs while the others' products occupy
// the tensor cores.
// Causal extent: the block's key tiles are 0 .. n_tiles - 1 (through its last row before T); a consumer
// warpgroup's own are 0 .. n_own - 1 (through its own last row). Its 64 rows lie in one 128-key tile, so each
// warpgroup masks only its first tile and no row is ever fully masked. With 192-row blocks a warpgroup's rows
// can end one or two tiles before the block's (and rows wholly past T have none): it skips those tiles,
// releasing their stages in its turns, instead of computing them fully masked (1 in 9 of the 192-row blocks'
// products at T = 1024).
// tm_q: boxes of 64 rows (a warpgroup's part of the Q block), tm_kv: of kBN rows (one K or V tile).
template <int HS, int kWG>
__device__ int g_fwd_work_counter[2];

template <int HS, int kWG>
__global__ void __launch_bounds__(FwdCfg<HS, kWG>::kThreads, 1)
    attention_forward_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_kv,
                                  bf16* __restrict__ out, float* __restrict__ lse, int T, QkvLayout lay, int num_bh,
                                  int num_qblocks, int group, float scale_log2) {
#ifdef GPT2CU_SM90A_DEVICE
    using Cfg = FwdCfg<HS, kWG>;
    constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kStages = Cfg::kStages, kPanels = Cfg::kPanels;
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint8_t* sQ = smem;
    uint8_t* sK = smem + Cfg::kQBytes;
    uint8_t* sV = sK + kStages * Cfg::kTileBytes;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Cfg::kBarOffset);
    uint64_t* q_full = bars;
    uint64_t* k_full = bars + 1;
    uint64_t* v_full = bars + 1 + kStages;
    uint64_t* empty = bars + 1 + 2 * kStages;
    uint64_t* q_empty = bars + 1 + 3 * kStages;
    volatile int* work_slot = reinterpret_cast<int*>(bars + Cfg::kNumBars);

    const int tid = threadIdx.x;
    const int wg = warpgroup_index();
    const int C = lay.NH * HS;
    // The query blocks end at T (to within 64 rows), so the one of fewer than kBM real rows is the first (the
    // lightest: with 192-row blocks at T = 1024 the last one would have had 64 real rows and the most key tiles,
    // one warpgroup busy). Block 0 starts at -q_off, a multiple of 64: the warpgroups of rows before 0 are idle,
    // and each warpgroup's 64 rows stay within one 128-key tile (no row of it fully masked).
    // Work item w -> (b, h, q0 = the block's first row, n_tiles).
    auto item = [&](int w, int& b, int& h, int& q0, int& n_tiles) {
        const int q_off = (num_qblocks * kBM - T) / 64 * 64;  // here: live across setmaxnreg, it spilled
        int bh, j;
        cta_order_of(w, num_bh, num_qblocks, group, bh, j);
        q0 = (num_qblocks - 1 - j) * kBM - q_off;  // heaviest (last) query blocks first
        b = bh / lay.NH;
        h = bh % lay.NH;
        n_tiles = min(q0 + kBM - 1, T - 1) / kBN + 1;  // key tiles 0 .. n_tiles-1
    };

    if (tid == 0) {
        tma_prefetch_desc(&tm_q);
        tma_prefetch_desc(&tm_kv);
        mbar_init(q_full, 1);
        mbar_init(q_empty, Cfg::kConsumerThreads);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&k_full[s], 1);
            mbar_init(&v_full[s], 1);
            mbar_init(&empty[s], Cfg::kConsumerThreads);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---------------- producer ----------------
        setmaxnreg_dec<Cfg::kProducerRegs>();
        if (tid == 0) {
            // the counts are computed in each branch: live across setmaxnreg, they spilled
            const int num_work = num_bh * num_qblocks;
            // the work item after w (>= num_work: none)
            auto next_work = [&](int w) {
                return w >= num_work ? w : take_work(g_fwd_work_counter<HS, kWG>, (int)gridDim.x, num_work);
            };
            int kv = 0;  // K/V tiles loaded so far (ring position across work items)
            for (int it = 0, w = blockIdx.x;; w = next_work(w), ++it) {
                if (it > 0) mbar_wait(q_empty, (it - 1) & 1);
                *work_slot = w;
                if (w >= num_work) {  // the end: the consumers see it after q_full
                    mbar_arrive(q_full);
                    break;
                }
                int b, h, q0, n_tiles;
                item(w, b, h, q0, n_tiles);
                const int kh = lay.kv_head(h);
                // Q in 64-row boxes, those of rows before 0 left out (their warpgroups compute nothing)
                const int j0 = max(0, -q0) / 64;
                mbar_arrive_expect_tx(q_full, (kWG - j0) * (Cfg::kQBytes / kWG));
                for (int j = j0; j < kWG; ++j)
#pragma unroll
                    for (int p = 0; p < kPanels; ++p)
                        tma_load_3d(sQ + p * Cfg::kQPanelBytes + j * 64 * kPanelRowBytes, &tm_q, q_full,
                                    lay.q(h) + p * kPanelCols, q0 + 64 * j, b);
                for (int i = 0; i < n_tiles; ++i, ++kv) {
                    const int n = n_tiles - 1 - i;
                    const int st = kv % kStages;
                    if (kv >= kStages) mbar_wait(&empty[st], ((kv / kStages) - 1) & 1);
                    mbar_arrive_expect_tx(&k_full[st], Cfg::kTileBytes);
#pragma unroll
                    for (int p = 0; p < kPanels; ++p)
                        tma_load_3d(sK + st * Cfg::kTileBytes + p * Cfg::kKPanelBytes, &tm_kv, &k_full[st],
                                    lay.k(kh) + p * kPanelCols, n * kBN, b);
                    mbar_arrive_expect_tx(&v_full[st], Cfg::kTileBytes);
#pragma unroll
                    for (int p = 0; p < kPanels; ++p)
                        tma_load_3d(sV + st * Cfg::kTileBytes + p * Cfg::kKPanelBytes, &tm_kv, &v_full[st],
                                    lay.v(kh) + p * kPanelCols, n * kBN, b);
                }
            }
        }
        return;
    }

    // ---------------- consumers ----------------
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int cw = wg - 1;                    // consumer warpgroup 0 .. kWG-1: query rows 64 cw .. 64 cw + 63
    const int ctid = tid - 128 * wg;
    const int warp = ctid / 32, lane = ctid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int lrow0 = 64 * cw + 16 * warp + g;  // local rows lrow0 and lrow0 + 8 of the block

    // descriptors: built once per operand, then moved by byte offsets (desc_at: one add per product instead of
    // the fields rebuilt, ~40 instructions a tile)
    const uint64_t dq0 = make_desc(smem_u32(sQ) + cw * 64 * kPanelRowBytes, 16, 1024);
    const uint64_t dk0 = make_desc(smem_u32(sK), 16, 1024);
    const uint64_t dv0 = make_desc(smem_u32(sV), Cfg::kKPanelBytes, 1024);
    auto desc_q = [&](int kk) {  // A: rows 64cw.., k 16kk..
        return desc_at(dq0, (kk / 4) * Cfg::kQPanelBytes + (kk % 4) * 32);
    };
    auto desc_k = [&](int st, int kk) {  // B (K-major): keys 0..127, k 16kk..
        return desc_at(dk0, st * Cfg::kTileBytes + (kk / 4) * Cfg::kKPanelBytes + (kk % 4) * 32);
    };
    auto desc_v = [&](int st, int kk) {  // B (MN-major): keys 16kk.., all HS columns (panels LBO apart)
        return desc_at(dv0, st * Cfg::kTileBytes + kk * 16 * kPanelRowBytes);
    };

    float o[HS / 2];
    float s[kBN / 2];
    uint32_t pa[kBN / 16][4];
    float m0, m1;  // running row maxima (of S * scale * log2 e)
    float l0, l1;  // per-thread partial row sums
    int b = 0, h = 0, q0 = 0, n_tiles = 0;
    int n_own = 0;  // this warpgroup's key tiles of the item: 0 .. n_own-1

    // S = Q K^T (half: keys 0..63 of the tile only, into s's first kBN / 4 values, columns 0..63)
    auto issue_s = [&](int st, auto half_c) {
        wgmma_fence();
        if constexpr (decltype(half_c)::value) {
            float(&sh)[kBN / 4] = *reinterpret_cast<float(*)[kBN / 4]>(&s[0]);
#pragma unroll
            for (int kk = 0; kk < HS / 16; ++kk) wgmma_ss_n64<0, 0>(sh, desc_q(kk), desc_k(st, kk), kk > 0);
        } else {
#pragma unroll
            for (int kk = 0; kk < HS / 16; ++kk) wgmma_ss_n128<0, 0>(s, desc_q(kk), desc_k(st, kk), kk > 0);
        }
        wgmma_commit();
    };
    // O += P V (half: keys 0..63 of the tile, the rest of P being 0)
    auto issue_pv = [&](int st, bool accumulate, auto half_c) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < (decltype(half_c)::value ? kBN / 32 : kBN / 16); ++kk) {
            if constexpr (HS == 64)
                wgmma_rs_n64<1>(o, pa[kk], desc_v(st, kk), accumulate || kk > 0);
            else
                wgmma_rs_n128<1>(o, pa[kk], desc_v(st, kk), accumulate || kk > 0);
        }
        wgmma_commit();
    };
    // softmax of s's first N columns in place (they become P in fp32); returns the rescale factors of the old
    // accumulators
    auto softmax = [&](auto ncols, bool diag, int key0, float& c0, float& c1) {
        constexpr int N = decltype(ncols)::value;
        if (diag) {
            const int r0 = q0 + lrow0;
#pragma unroll
            for (int j = 0; j < N / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = key0 + 8 * j + 2 * t + (e & 1);
                    const int row = r0 + 8 * (e >> 1);
                    if (key > row) s[4 * j + e] = -INFINITY;
                }
        }
        const float mx0 = m0, mx1 = m1;
        float r0max = -INFINITY, r1max = -INFINITY;
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
            r0max = fmaxf(r0max, fmaxf(s[4 * j], s[4 * j + 1]));
            r1max = fmaxf(r1max, fmaxf(s[4 * j + 2], s[4 * j + 3]));
        }
        r0max = fmaxf(r0max, __shfl_xor_sync(0xffffffff, r0max, 1));
        r0max = fmaxf(r0max, __shfl_xor_sync(0xffffffff, r0max, 2));
        r1max = fmaxf(r1max, __shfl_xor_sync(0xffffffff, r1max, 1));
        r1max = fmaxf(r1max, __shfl_xor_sync(0xffffffff, r1max, 2));
        // A row's running maximum moves only when the tile's exceeds it by more than 8 (so P <= 2^8: exact in
        // bf16's exponent range, and fp32 sums), so after the first tiles it rarely moves and whole warps skip
        // the O rescale (rescale_o). out and lse are exact either way: both use the same maximum.
        float n0 = r0max * scale_log2, n1 = r1max * scale_log2;
        n0 = n0 > mx0 + 8.f ? n0 : mx0;  // the first tile: mx0 = -inf, so n0 (no row is fully masked)
        n1 = n1 > mx1 + 8.f ? n1 : mx1;
        c0 = n0 == mx0 ? 1.f : fast_exp2(mx0 - n0);  // 2^-inf = 0 on the first tile
        c1 = n1 == mx1 ? 1.f : fast_exp2(mx1 - n1);
        m0 = n0;
        m1 = n1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
            s[4 * j + 0] = fast_exp2(fmaf(s[4 * j + 0], scale_log2, -n0));
            s[4 * j + 1] = fast_exp2(fmaf(s[4 * j + 1], scale_log2, -n0));
            s[4 * j + 2] = fast_exp2(fmaf(s[4 * j + 2], scale_log2, -n1));
            s[4 * j + 3] = fast_exp2(fmaf(s[4 * j + 3], scale_log2, -n1));
            sum0 += s[4 * j] + s[4 * j + 1];
            sum1 += s[4 * j + 2] + s[4 * j + 3];
        }
        l0 = l0 * c0 + sum0;
        l1 = l1 * c1 + sum1;
    };
    auto rescale_o = [&](float c0, float c1) {
        if (!__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) return;
#pragma unroll
        for (int j = 0; j < HS / 8; ++j) {
            o[4 * j + 0] *= c0;
            o[4 * j + 1] *= c0;
            o[4 * j + 2] *= c1;
            o[4 * j + 3] *= c1;
        }
    };

#pragma unroll
    for (int i = 0; i < HS / 2; ++i) o[i] = 0.f;

    // ping-pong turns: warpgroup cw waits on barrier 1 + cw, passes on the next one's (round robin); warpgroup 0
    // goes first; every warpgroup takes n_tiles + 1 turns an item; warpgroup 0 takes the last one's final pass
    // after the last item, so every arrival is matched
    // (each barrier joins two warpgroups: the waiter and the one passing)
    auto turn_wait = [&]() { named_barrier_sync(1 + cw, 256); };
    auto turn_pass = [&]() { named_barrier_arrive(1 + (cw + 1) % kWG, 256); };
    if (cw == kWG - 1) named_barrier_arrive(1, 256);

    const int num_work = num_bh * num_qblocks;
    int kv = 0;  // K/V tiles consumed so far
    // S_i, O += P_{i-1} V_{i-1} (pv_half: P_{i-1} on keys 0..63 only)
    auto step = [&](int i, auto pv_half) {
        const int n = n_own - 1 - i;
        const int st = (kv + i) % kStages, pst = (kv + i - 1) % kStages;
        const uint32_t ph = ((kv + i) / kStages) & 1, pph = ((kv + i - 1) / kStages) & 1;
        turn_wait();
        mbar_wait(&k_full[st], ph);
        issue_s(st, std::false_type{});  // S_i = Q K_i^T
        mbar_wait(&v_full[pst], pph);
        issue_pv(pst, i > 1, pv_half);   // O += P_{i-1} V_{i-1}
        turn_pass();
        wgmma_wait<1>();                 // S_i done (P V may still run)
        reg_fence(s);
        if (i == n_own - 1) mbar_arrive(q_empty);
        float c0, c1;
        softmax(std::integral_constant<int, kBN>{}, false, n * kBN, c0, c1);
        // a plain wait: ptxas moves it up into the softmax, so little of it runs under this warpgroup's own
        // P V. Forcing the wait below every exp2 (a first wait predicated on the row sums) measured 4-6 us
        // slower on an H200 in both variants, HS 64 and 128 (dev/attn_sm90/results/run4_ab.log): the other
        // warpgroups' products cover the softmax anyway
        wgmma_wait<0>();
        reg_fence(o);
        mbar_arrive(&empty[pst]);
        acc_to_a<kBN>(pa, s);
        rescale_o(c0, c1);
    };
    auto last_pv = [&](auto pv_half) {
        const int pst = (kv + n_own - 1) % kStages;
        const uint32_t pph = ((kv + n_own - 1) / kStages) & 1;
        turn_wait();
        mbar_wait(&v_full[pst], pph);
        issue_pv(pst, n_own > 1, pv_half);
        turn_pass();
        wgmma_wait<0>();
        reg_fence(o);
        mbar_arrive(&empty[pst]);
    };
    // tile 0 (the diagonal; S, softmax, P) and the P V of it. half_c: this warpgroup's rows are the first 64 of the
    // diagonal tile's range (row_first a multiple of kBN), so keys 64..127 of that tile are all masked: its S,
    // softmax and P V run on keys 0..63 only (at T = 1024 1/18 of the products' work saved; the same bits: those P
    // are 0). Each branch on half_c waits for its own products (a wgmma accumulator in flight across the join of two
    // paths makes ptxas serialise the products: C7520), and the tiles after the first step run in one loop outside
    // (two copies of the loop measured 6% slower at T = 2048: instruction cache).
    auto first_tiles = [&](auto half_c) {
        constexpr int kDiagCols = decltype(half_c)::value ? kBN / 2 : kBN;
        turn_wait();
        mbar_wait(&k_full[kv % kStages], (kv / kStages) & 1);
        issue_s(kv % kStages, half_c);
        turn_pass();
        m0 = m1 = -INFINITY;
        l0 = l1 = 0.f;
        wgmma_wait<0>();
        reg_fence(s);
        if (n_own == 1) mbar_arrive(q_empty);
        float c0, c1;
        softmax(std::integral_constant<int, kDiagCols>{}, true, (n_own - 1) * kBN, c0, c1);
        acc_to_a<kBN, kDiagCols>(pa, s);
        if (n_own == 1)
            last_pv(half_c);
        else
            step(1, half_c);
    };

    for (int it = 0;; ++it) {
        mbar_wait(q_full, it & 1);
        const int w = *work_slot;
        if (w >= num_work) break;
        item(w, b, h, q0, n_tiles);
        const int row_first = q0 + 64 * cw;  // this warpgroup's tiles: 0 .. n_own-1 (none if its rows are not real)
        n_own = row_first >= 0 && row_first < T ? min(row_first + 63, T - 1) / kBN + 1 : 0;
        // warp-uniform by a shuffle (a branch around wgmma on a value ptxas thinks divergent serialises them)
        const bool half = __shfl_sync(0xffffffffu, row_first % kBN == 0, 0);
        // q_empty: this warpgroup's last Q K^T product is done (at once if it has none), so the producer loads the
        // next item's Q under this one's last softmax, P V and epilogue
        if (n_own == 0) mbar_arrive(q_empty);
        // the block's tiles past this warpgroup's rows come first (diagonal down): release them in turn. Once
        // the stage is loaded the producer is past its wait for the previous use, so the arrival counts for
        // this one.
        for (int i = n_own; i < n_tiles; ++i, ++kv) {
            turn_wait();
            turn_pass();
            mbar_wait(&k_full[kv % kStages], (kv / kStages) & 1);
            mbar_arrive(&empty[kv % kStages]);
        }
        if (n_own == 0) {  // no real rows (before 0 or past T): the turn of the last product
            turn_wait();
            turn_pass();
            continue;
        }
        if (half)
            first_tiles(std::true_type{});
        else
            first_tiles(std::false_type{});
        for (int i = 2; i < n_own; ++i) step(i, std::false_type{});
        if (n_own > 1) last_pv(std::false_type{});
        kv += n_own;

        // ---------------- epilogue: O / l, lse ----------------
        l0 += __shfl_xor_sync(0xffffffff, l0, 1);
        l0 += __shfl_xor_sync(0xffffffff, l0, 2);
        l1 += __shfl_xor_sync(0xffffffff, l1, 1);
        l1 += __shfl_xor_sync(0xffffffff, l1, 2);
        const float inv0 = 1.f / l0, inv1 = 1.f / l1;
        const int row0 = q0 + lrow0, row1 = row0 + 8;
        rescale_o(inv0, inv1);  // o is rewritten by the next item's first P V
        store_acc_rows<HS>(out + (size_t)b * T * C + h * HS, C, o, row0, T, t, 1.f);
        if (t == 0) {
            float* lse_bh = lse + ((size_t)b * lay.NH + h) * T;
            if (row0 < T) lse_bh[row0] = m0 * kLn2 + logf(l0);
            if (row1 < T) lse_bh[row1] = m1 * kLn2 + logf(l1);
        }
    }  // work items
    if (cw == 0) turn_wait();  // the last warpgroup's final pass
#endif
}

// ---- Backward -------------------------------------------------------------------------------------------
// After attention.cu's preprocess (D = rowsum(dO * O)), one kernel recomputes P from lse and writes dK, dV and dQ.
// Work items: (128-key block, key/value head, batch), on a persistent grid (one CTA of 3 warpgroups, 384 threads, per
// multiprocessor, fewer if fewer items) taking them in cta_order's order from a global counter (take_work).
//   Warpgroup 0 (setmaxnreg 24): warp 0, one thread, takes the items and publishes each (its coordinates) in a
//     ring of kItemSlots shared-memory slots (item_full; item_empty: every other role is done with it, so none can
//     find its slot rewritten); per item it streams query tiles of kBM rows (HS 64: 128, HS 128: 64) of Q and dO by
//     TMA into a ring of kStages, from the diagonal tile up, for each query head of the group in turn, and loads the
//     block's K and V once (dK/dV summed over the group in registers in that fixed order): after the item's first
//     Q/dO tile, once the consumers are done with the previous item's K and V (kv_empty, arrived after their last dQ
//     product), so that the loads run under the previous item's epilogue (its dK/dV stores, the last dQ adds). The
//     Q/dO/lse/D ring and the dQ staging ring run on across items (running counters, so phases never restart).
//     Warp 2 copies each tile's lse (times log2 e; +inf past T, so those queries get P = 0) and D into shared
//     memory; one thread of warp 1 adds the block's dQ parts into global memory, its last adds of an item completing
//     under the next item's first tiles (key block 0: copies the other blocks' sums into shared memory for the
//     consumers; below).
//   Warpgroups 1, 2, the consumers (setmaxnreg 240): warpgroup cw owns keys 64cw..64cw+63. Per tile, in sub-tiles
//     of 64 queries (their accumulators and dK, dV fit the 240 registers): S^T = K Q^T and dP^T = V dO^T (wgmma,
//     A = this warpgroup's 64 keys, both K-major), P^T while dP^T runs, dV += P^T dO issued (A = P^T from
//     registers, dO as an MN-major B: no transpose anywhere), dS^T = P^T (dP^T - D) while it runs, dK += dS^T Q
//     issued, the next sub-tile's S^T and dP^T issued behind it, and dS^T stored to shared memory (bf16, 128 keys
//     x kBM queries, swizzled panels of 64 queries) while they run. After a barrier of the two warpgroups,
//     dQ_tile = dS K from shared memory (dS as an MN-major A, K as an MN-major B): warpgroup cw computes queries
//     64cw.. (HS 64) or head columns 64cw.. (HS 128), an m64n64 product over the 128 keys. 5 products a tile (a
//     dK/dV kernel and a separate dQ kernel need 7: S and dP twice).
// The dQ sums: a consumer warpgroup's fp32 dQ part goes to a shared staging buffer (double-buffered), in fragment
// order (float4 j of thread ctid at index 128 j + ctid: conflict-free stores, and one contiguous 16 KB half per
// warpgroup), and warp 1's thread adds the whole tile (32 KB) into the fp32 dQ accumulator in global memory with
// one bulk reduce (cp.reduce.async.bulk .add.f32): the copy engine does the adds, the consumers wait only when
// both staging buffers are still being read.
// The qkv bias gradient (kBias; attention_backward's dqkv_bias): the column sums of dqkv as stored (bf16 values, rows
// < T, summed in fp32), taken where store_acc_rows has the values in registers, so dqkv is not read again (bias.cu's
// pass: 0.3 GB at d12 B=64 T=1024). Each consumer warp sums its 16 rows (sum_over_rows: butterflies that keep half
// the columns per exchange). dK, dV: per item, the 8 warps' sums go to a shared buffer (two, by item parity) and warp
// 3 of warpgroup 0, otherwise idle, adds them in warp order into the item's partial row (batch, key block) at the
// key/value head's columns, off the consumers' path. dQ (key block 0's items, which store the final dQ): each warp
// adds its sums over the head's query tiles in two registers and writes them, after the head's last tile, as its
// partial row (batch, the warp's slot) at the head's columns. Every partial is written once, in a fixed order of
// adds; column_sum_add adds the rows into dqkv_bias after the kernel (bias_backward's semantics). Added per item (HS
// 64): ~100 instructions a consumer thread for each of dK and dV, and as many per key block 0 tile for dQ.
// B MN-major (transposed)
template <int N>
__device__ __forceinline__ void wgmma_rs_t(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
    if constexpr (N == 64)
        wgmma_rs_n64<1>(d, a, db, scale_d);
    else
        wgmma_rs_n128<1>(d, a, db, scale_d);
}

// Determinism: the adds into one dQ tile must happen in a fixed order: from its diagonal key block
// (the tile's last keys) down to key block 0. A counter per (batch, query head, query tile) in global memory
// counts the key blocks that have added; key block kb waits (acquire) until it reads the number of key blocks
// after it that reach the tile (qt kBM / kBN - kb), adds (the first one stores, so the accumulator needs no
// zeroing, only the counters do), frees the staging buffer once the copy engine has read it, waits for the write
// to complete, then increments the count (release). Key block 0, the last, adds nothing: its consumers add the
// sum to their dQ parts and store dQ in bf16 (no conversion kernel, no trip of the fp32 tile to DRAM and back).
// They do not wait for the count: warp 1's thread, idle otherwise in key block 0, walks the tiles with a sum up to
// two ahead of them, waits for the count (acquire), and bulk-copies the sum (L2) into the staging buffer (the ring
// runs the other way round: filled by the thread, read by the consumers), so the poll and the L2 latency leave the
// consumers' chain (where they sat between the dQ product and the next tile's S^T, the tensor pipe idle). The
// copy is bit for bit and each element still gets one fp32 add (dQ part + sum): the results do not change. Each
// direction has its own barrier pair per buffer (parts: dq_full/dq_empty; sums: sum_full/sum_empty); the buffer is
// n % 2 for a running count n of the uses of both kinds, across items. One pair for both would break where the
// kinds alternate in a CTA: the consumers wait on its "thread done" barrier for use n - 2 before writing parts but
// for use n itself before reading a sum, so after two uses for parts they would skip a phase, and a parity wait
// cannot tell the phase before the awaited one from it (warp 1's thread likewise after two sums). With a pair per
// direction each role waits every phase of the barriers it waits on, in order (a parity bit per barrier and
// buffer, flipped per wait), and a buffer changes direction safely: parts are written there by the threads that
// read the sum before (program order), a sum is copied in by the thread whose bulk add read the parts before. The
// order matches the one the key blocks reach the tile in: each walks its query tiles from its diagonal up, so
// block kb reaches tile qt a step (HS 128: two) after block kb + 1, whose add is then done: no chain of waits
// (walking down from the last tile, all blocks would reach a tile together and wait for each other's adds in
// turn, a CTA sitting idle for up to all of them at its end). Deadlock: block kb only waits on blocks kb + 1.. of
// the same head, items of lower indices (cta_order: the last key block of a head first); items are taken in
// increasing order, every one from the counter (none by blockIdx), so all of them were taken before, by CTAs that
// are running; inside a CTA each role walks the items in order and waits only on its own item's earlier stages or
// on older items (the slot ring: the item two back), so the lowest unfinished item can always proceed. Unordered
// adds (fp32 sums differing in their last bits between runs) need the accumulator zeroed first and measured slower
// on an H200 (2026-12-02): 866.5 against 819.5 us at B=64 T=1024 NH=6 HS 128, 1135.9 against 1103.1 at NH=12
// HS 64 (on a loop order since dropped); the order costs nothing measurable.
// dQ accumulator: per (batch, query head, query tile) kBM * HS floats, two halves (consumer warpgroup) of 8
// float4 x 128 threads; element (half, j, ctid, e) is query row 16 warp + g + 8 (e >> 1) and head column
// 8 j + 2 t + (e & 1) of the warpgroup's 64 x 64 part (warp = ctid / 32, g = ctid % 32 / 4, t = ctid % 4), the
// part being rows 64 half.. (HS 64) or columns 64 half.. (HS 128).
// a work item of the backward (key block, key/value head, batch) as the producer thread publishes it in shared
// memory; n_tiles 0: the end
struct BwdItem {
    int b, kh, kb, h0, num_qt, q_first, n_q, n_tiles;
};

// kBias: the kernel also sums the qkv bias gradient (the column sums of dqkv as stored; see the kernel)
template <int HS, bool kBias = false>
struct FusedBwdCfg {
    static constexpr int kBN = 128;                  // keys per CTA
    static constexpr int kBM = HS == 64 ? 128 : 64;  // queries per streamed tile
    static constexpr int kStages = 2;
    static constexpr int kKVBytes = kBN * HS * 2;
    static constexpr int kKVPanelBytes = kBN * kPanelRowBytes;
    static constexpr int kTileBytes = kBM * HS * 2;
    static constexpr int kTilePanelBytes = kBM * kPanelRowBytes;
    static constexpr int kDsPanelBytes = kBN * kPanelRowBytes;  // dS^T: kBN key rows, panels of 64 queries
    static constexpr int kDsBytes = kBN * kBM * 2;
    static constexpr int kDqFloats = kBM * HS;  // one dQ tile
    static constexpr int kDqBufs = 2;
    static constexpr int kAuxBytes = 2 * kBM * 4;  // lse2[kBM], D[kBM]
    static constexpr int kDsOffset = 2 * kKVBytes + 2 * kStages * kTileBytes;
    static constexpr int kDqOffset = kDsOffset + kDsBytes;
    static constexpr int kAuxOffset = kDqOffset + kDqBufs * kDqFloats * 4;
    // kBias: per item, the 8 consumer warps' column sums of dK, then of dV (8 rows of HS floats each), double-buffered
    // (item parity)
    static constexpr int kSumBufs = kBias ? 2 : 0;
    static constexpr int kSumFloats = 2 * 8 * HS;
    static constexpr int kSumOffset = kAuxOffset + kStages * kAuxBytes;
    static constexpr int kItemSlots = 2;  // work items published by the producer thread, read by the other roles
    static constexpr int kItemReaders = 1 + 32 + 256 + (kBias ? 32 : 0);  // the dQ writer, warp 2, the consumers, warp 3
    static constexpr int kBarOffset = kSumOffset + kSumBufs * kSumFloats * 4;
    static constexpr int kNumBars = 2 + 4 * kStages + 4 * kDqBufs + 2 * kItemSlots + 2 * kSumBufs;
    // + the item slots, + slack to align the base to 1024
    static constexpr int kSmemBytes = kBarOffset + 8 * kNumBars + (int)sizeof(BwdItem) * kItemSlots + 1024;
    static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// the qkv bias gradient's partial rows of the query columns per batch (the kBias kernel): one per consumer warp holding
// the same dQ columns (HS 64: all 8 hold all HS; HS 128: each warpgroup's 4 hold 64)
template <int HS>
constexpr int kQSlots = HS == 64 ? 8 : 4;

// rows of the qkv bias gradient's partials: per batch, kQSlots for the query columns, one per key block for the key
// and value columns; the larger count
template <int HS>
int bias_partial_rows(int B, int T) {
    const int kblocks = (T + FusedBwdCfg<HS>::kBN - 1) / FusedBwdCfg<HS>::kBN;
    return B * (kblocks > kQSlots<HS> ? kblocks : kQSlots<HS>);
}

// floats of the fused backward's work area: the dQ accumulator, the qkv bias gradient's partials (their rows x the
// widest qkv row, 3 NH HS), then one uint32 counter per dQ tile (+ 4 floats to align the start to 16 bytes)
template <int HS>
size_t fused_work_floats(int B, int T, int NH) {
    using Cfg = FusedBwdCfg<HS>;
    const size_t tiles = (size_t)B * NH * ((T + Cfg::kBM - 1) / Cfg::kBM);
    return tiles * Cfg::kDqFloats + (size_t)bias_partial_rows<HS>(B, T) * 3 * NH * HS + tiles + 4;
}

template <int HS, bool kBias>
__device__ int g_bwd_work_counter[2];

template <int HS, bool kBias>
__global__ void __launch_bounds__(384, 1)
    attention_backward_fused_sm90_kernel(const __grid_constant__ CUtensorMap tm_kv,
                                         const __grid_constant__ CUtensorMap tm_q,
                                         const __grid_constant__ CUtensorMap tm_do, bf16* __restrict__ dqkv,
                                         const float* __restrict__ lse, const float* __restrict__ dvec,
                                         float* __restrict__ dq_acc, uint32_t* __restrict__ dq_count,
                                         float* __restrict__ bias_part, int T, QkvLayout lay, int num_bkv,
                                         int num_kblocks, int num_work, int group, float scale, float scale_log2) {
#ifdef GPT2CU_SM90A_DEVICE
    using Cfg = FusedBwdCfg<HS, kBias>;
    constexpr int kBN = Cfg::kBN, kBM = Cfg::kBM, kStages = Cfg::kStages, kPanels = HS / kPanelCols;
    constexpr int kDqBufs = Cfg::kDqBufs;
    constexpr float kLog2e = 1.4426950408889634f;
    extern __shared__ uint8_t smem_raw[];
    // aligned by an offset on smem_raw (not an integer cast): the compiler then knows every pointer below is shared
    // and accesses it with 32-bit shared addresses (generic 64-bit pointers were live in the 24-register roles)
    uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    uint8_t* sK = smem;
    uint8_t* sV = smem + Cfg::kKVBytes;
    uint8_t* sQ = smem + 2 * Cfg::kKVBytes;
    uint8_t* sdO = sQ + kStages * Cfg::kTileBytes;
    uint8_t* sdS = smem + Cfg::kDsOffset;
    float* sdQ = reinterpret_cast<float*>(smem + Cfg::kDqOffset);
    float* sAux = reinterpret_cast<float*>(smem + Cfg::kAuxOffset);
    float* sSum = reinterpret_cast<float*>(smem + Cfg::kSumOffset);
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Cfg::kBarOffset);
    uint64_t* kv_full = bars;
    uint64_t* q_full = bars + 1;
    uint64_t* do_full = q_full + kStages;
    uint64_t* aux_full = do_full + kStages;
    uint64_t* empty = aux_full + kStages;
    // the dQ staging ring, two pairs per buffer, one per direction (a tile of key block 0 fills a buffer the other
    // way round: see the determinism note): dq_full, the 256 consumers wrote their parts, dq_empty, warp 1's
    // thread's bulk add has read them; sum_full, the other blocks' sum has landed (bulk copy), sum_empty, the
    // consumers have read it
    uint64_t* dq_full = empty + kStages;
    uint64_t* dq_empty = dq_full + kDqBufs;
    uint64_t* sum_full = dq_empty + kDqBufs;
    uint64_t* sum_empty = sum_full + kDqBufs;
    uint64_t* kv_empty = sum_empty + kDqBufs;  // the consumers' last products of an item that read K and V are done
    uint64_t* item_full = kv_empty + 1;
    uint64_t* item_empty = item_full + Cfg::kItemSlots;
    // kBias: the column sum buffers: sum_rows_full, the 256 consumers wrote an item's; sum_rows_empty, warp 3 read them
    uint64_t* sum_rows_full = item_empty + Cfg::kItemSlots;
    uint64_t* sum_rows_empty = sum_rows_full + Cfg::kSumBufs;
    BwdItem* items = reinterpret_cast<BwdItem*>(bars + Cfg::kNumBars);

    const int tid = threadIdx.x, wg = warpgroup_index();
    // work item w's coordinates. Within a group of heads, the LAST key block (the fewest tiles) first: a key block
    // waits on the dQ adds of the key blocks after it (see the ordering above), items of lower indices.
    auto coords = [&](int w) {
        BwdItem c;
        int bkv, j;
        cta_order_of(w, num_bkv, num_kblocks, group, bkv, j);
        c.kb = num_kblocks - 1 - j;
        c.b = bkv / lay.NKV;
        c.kh = bkv % lay.NKV;
        c.h0 = c.kh * (lay.NH / lay.NKV);  // the group's first query head
        c.num_qt = (T + kBM - 1) / kBM;
        c.q_first = c.kb * kBN / kBM;  // the diagonal query tile
        c.n_q = c.num_qt - c.q_first;  // query tiles per query head
        c.n_tiles = (lay.NH / lay.NKV) * c.n_q;
        return c;
    };
    // tile i: query head h0 + i / n_q, query tile q_first + i % n_q (from the diagonal up)
    auto tile_of = [](const BwdItem& c, int i, int& h, int& qt) {
        const int j = i / c.n_q;
        h = c.h0 + j;
        qt = c.q_first + (i - j * c.n_q);
    };
    // the it-th work item of this CTA, as the producer thread published it: read in place (the roles reread its
    // fields after their waits rather than keeping them in registers: the producer warpgroup's 24 did not hold
    // them), until the role is done with the item (done_item)
    auto wait_item = [&](int it) -> const BwdItem& {
        const int slot = it % Cfg::kItemSlots;
        mbar_wait(&item_full[slot], (it / Cfg::kItemSlots) & 1);
        return items[slot];
    };
    auto done_item = [&](int it) { mbar_arrive(&item_empty[it % Cfg::kItemSlots]); };
    // a wait on one of the dQ ring's barriers whose next phase has parity bit `bit` of ph, which then flips: each
    // role waits every phase of the barriers it waits on, in order, so parities never skip one
    auto wait_flip = [](uint64_t* bar, uint32_t& ph, int bit) {
        mbar_wait(bar, (ph >> bit) & 1);
        ph ^= 1u << bit;
    };

    if (tid == 0) {
        tma_prefetch_desc(&tm_kv);
        tma_prefetch_desc(&tm_q);
        tma_prefetch_desc(&tm_do);
        mbar_init(kv_full, 1);
        mbar_init(kv_empty, 256);
        for (int s = 0; s < Cfg::kItemSlots; ++s) {
            mbar_init(&item_full[s], 1);
            mbar_init(&item_empty[s], Cfg::kItemReaders);
        }
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&q_full[s], 1);
            mbar_init(&do_full[s], 1);
            mbar_init(&aux_full[s], 32);
            mbar_init(&empty[s], 256);
        }
        for (int s = 0; s < kDqBufs; ++s) {
            mbar_init(&dq_full[s], 256);
            mbar_init(&dq_empty[s], 1);
            mbar_init(&sum_full[s], 1);
            mbar_init(&sum_empty[s], 256);
        }
        for (int s = 0; s < Cfg::kSumBufs; ++s) {
            mbar_init(&sum_rows_full[s], 256);
            mbar_init(&sum_rows_empty[s], 32);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (tid == 0) {
            int r = 0;  // Q/dO tiles loaded so far (ring position across items)
            for (int it = 0;; ++it) {
                // every item from the counter (none by blockIdx): an item is only ever taken by a running CTA
                const int w = take_work(g_bwd_work_counter<HS, kBias>, 0, num_work);
                const int slot = it % Cfg::kItemSlots;
                // the slot's previous item (it - 2): every role is done with it
                if (it >= Cfg::kItemSlots) mbar_wait(&item_empty[slot], ((it / Cfg::kItemSlots) - 1) & 1);
                BwdItem& c = items[slot];
                if (w < num_work)
                    c = coords(w);
                else
                    c.n_tiles = 0;
                mbar_arrive(&item_full[slot]);  // a release: the slot's contents, before the readers' waits
                if (w >= num_work) break;
                for (int i = 0; i < c.n_tiles; ++i, ++r) {
                    const int st = r % kStages;
                    int h, qt;
                    tile_of(c, i, h, qt);
                    if (r >= kStages) mbar_wait(&empty[st], ((r / kStages) - 1) & 1);
                    mbar_arrive_expect_tx(&q_full[st], Cfg::kTileBytes);
#pragma unroll
                    for (int p = 0; p < kPanels; ++p)
                        tma_load_3d(sQ + st * Cfg::kTileBytes + p * Cfg::kTilePanelBytes, &tm_q, &q_full[st],
                                    lay.q(h) + p * kPanelCols, qt * kBM, c.b);
                    mbar_arrive_expect_tx(&do_full[st], Cfg::kTileBytes);
#pragma unroll
                    for (int p = 0; p < kPanels; ++p)
                        tma_load_3d(sdO + st * Cfg::kTileBytes + p * Cfg::kTilePanelBytes, &tm_do, &do_full[st],
                                    h * HS + p * kPanelCols, qt * kBM, c.b);
                    if (i == 0) {
                        // K and V, after the first Q/dO tile (its stage frees during the previous item's last
                        // tile), once the previous item's last products have read them
                        if (it > 0) mbar_wait(kv_empty, (it - 1) & 1);
                        mbar_arrive_expect_tx(kv_full, 2 * Cfg::kKVBytes);
#pragma unroll
                        for (int p = 0; p < kPanels; ++p) {
                            tma_load_3d(sK + p * Cfg::kKVPanelBytes, &tm_kv, kv_full, lay.k(c.kh) + p * kPanelCols,
                                        c.kb * kBN, c.b);
                            tma_load_3d(sV + p * Cfg::kKVPanelBytes, &tm_kv, kv_full, lay.v(c.kh) + p * kPanelCols,
                                        c.kb * kBN, c.b);
                        }
                    }
                }
            }
        } else if (tid == 32) {
            // warp 1, one thread: the dQ adds; in key block 0, the sums' copies into shared memory instead
            int n = 0;          // uses of the dQ staging ring so far (across items): buffer n % 2
            uint32_t ph = 0xc;  // dq_full's, sum_empty's next parities (bits buf, 2 + buf; 1: the first passes)
            for (int it = 0;; ++it) {
                const BwdItem& c = wait_item(it);
                if (c.n_tiles == 0) break;
                for (int i = 0; i < c.n_tiles; ++i) {
                    int h, qt;
                    tile_of(c, i, h, qt);
                    // the key blocks after this one (up to the tile's diagonal block) that add into the tile
                    const uint32_t before = (uint32_t)(qt * kBM / kBN - c.kb);
                    if (c.kb == 0 && before == 0) continue;  // key block 0's diagonal tile: no sum to copy
                    const int buf = n % kDqBufs;
                    const size_t tile = ((size_t)c.b * lay.NH + h) * c.num_qt + qt;
                    float* acc = dq_acc + tile * Cfg::kDqFloats;
                    float* stage = sdQ + buf * Cfg::kDqFloats;
                    if (c.kb == 0) {
                        // the buffer's previous sum read by the consumers, all adds complete, then the 32 KB sum
                        // into the buffer, landing on sum_full
                        wait_flip(&sum_empty[buf], ph, 2 + buf);
                        wait_count(dq_count + tile, before);
                        fence_proxy_async_global();  // the acquire, ordered before the bulk copy (async proxy)
                        mbar_arrive_expect_tx(&sum_full[buf], Cfg::kDqFloats * 4);
                        bulk_load(stage, acc, Cfg::kDqFloats * 4, &sum_full[buf]);
                    } else {
                        wait_flip(&dq_full[buf], ph, buf);
                        if (before > 0) {  // the others have added; the first one stores
                            wait_count(dq_count + tile, before);
                            fence_proxy_async_global();  // the acquire, ordered before the bulk add (async proxy)
                            bulk_reduce_add_f32(acc, stage, Cfg::kDqFloats * 4);
                        } else {
                            bulk_store(acc, stage, Cfg::kDqFloats * 4);
                        }
                        bulk_commit();
                        bulk_wait_read<0>();
                        mbar_arrive(&dq_empty[buf]);  // the buffer is free once read, before the add completes
                        bulk_wait<0>();
                        fence_proxy_async_global();
                        red_release_add_u32(dq_count + tile, 1);  // one more add complete (key block 0 waits for all)
                    }
                    ++n;
                }
                done_item(it);
            }
        } else if (tid >= 64 && tid < 96) {
            // warp 2: lse (times log2 e; +inf past T, so those queries get P = 0) and D of each tile
            const int lane = tid - 64;
            int n = 0;  // tiles so far (the Q/dO ring's position)
            for (int it = 0;; ++it) {
                const BwdItem& c = wait_item(it);
                if (c.n_tiles == 0) break;
                for (int i = 0; i < c.n_tiles; ++i, ++n) {
                    const int st = n % kStages;
                    int h, qt;
                    tile_of(c, i, h, qt);
                    // (unsigned: no sign extensions kept in this warp's 24 registers)
                    const size_t bh = (unsigned)(c.b * lay.NH + h);
                    const float* lse_bh = lse + bh * (unsigned)T;
                    const float* d_bh = dvec + bh * (unsigned)T;
                    if (n >= kStages) mbar_wait(&empty[st], ((n / kStages) - 1) & 1);
                    float* aux = sAux + st * (2 * kBM);
#pragma unroll
                    for (int k = 0; k < kBM / 32; ++k) {
                        const int r = qt * kBM + lane + 32 * k;
                        aux[lane + 32 * k] = r < T ? lse_bh[r] * kLog2e : INFINITY;
                        aux[kBM + lane + 32 * k] = r < T ? d_bh[r] : 0.f;
                    }
                    mbar_arrive(&aux_full[st]);
                }
                done_item(it);
            }
        } else if (kBias && tid >= 96) {
            // warp 3 (kBias): each item's dK and dV column sums, the 8 consumer warps' rows added in warp order, into
            // the item's partial row (batch b, key block kb), at the key/value head's columns of the qkv row
            const int lane = tid - 96;
            for (int it = 0;; ++it) {
                const BwdItem& c = wait_item(it);
                if (c.n_tiles == 0) break;
                float* row = bias_part + ((size_t)c.b * num_kblocks + c.kb) * lay.row_stride();
                const int k0 = lay.k(c.kh), v0 = lay.v(c.kh);
                done_item(it);  // (the item's fields are read)
                const int buf = it % 2;
                mbar_wait(&sum_rows_full[buf], (it / 2) & 1);
                const float* part = sSum + buf * Cfg::kSumFloats;
#pragma unroll 1
                for (int j = lane; j < 2 * HS; j += 32) {  // dK's columns, then dV's
                    float sum = 0.f;
#pragma unroll
                    for (int w = 0; w < 8; ++w) sum += part[((j / HS) * 8 + w) * HS + j % HS];
                    row[(j < HS ? k0 : v0 - HS) + j] = sum;
                }
                mbar_arrive(&sum_rows_empty[buf]);
            }
        }
        return;
    }

    setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int ctid = tid - 128 * wg;
    const int warp = ctid / 32, lane = ctid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int klocal = 64 * cw + 16 * warp + g;  // this thread's keys klocal, klocal + 8 of the block

    const uint32_t k_addr = smem_u32(sK) + cw * 64 * kPanelRowBytes;
    const uint32_t v_addr = smem_u32(sV) + cw * 64 * kPanelRowBytes;
    const uint32_t q_addr = smem_u32(sQ), do_addr = smem_u32(sdO);
    // dQ product: A = dS (queries x keys) MN-major, B = K (keys x head columns) MN-major; warpgroup cw's part
    const uint32_t ds_addr = smem_u32(sdS) + (kBM == 128 ? cw : 0) * Cfg::kDsPanelBytes;
    const uint32_t kq_addr = smem_u32(sK) + (kBM == 128 ? 0 : cw) * Cfg::kKVPanelBytes;
    auto desc_kmaj_kv = [&](uint32_t base, int kk) {  // A: 64 keys x HS, K-major
        return make_desc(base + (kk / 4) * Cfg::kKVPanelBytes + (kk % 4) * 32, 16, 1024);
    };
    auto desc_kmaj_tile = [&](uint32_t base, int st, int kk) {  // B: kBM queries x HS, K-major
        return make_desc(base + st * Cfg::kTileBytes + (kk / 4) * Cfg::kTilePanelBytes + (kk % 4) * 32, 16, 1024);
    };
    auto desc_mn_tile = [&](uint32_t base, int st, int kk) {  // B: k = queries 16kk.., n = HS, MN-major
        return make_desc(base + st * Cfg::kTileBytes + kk * 16 * kPanelRowBytes, Cfg::kTilePanelBytes, 1024);
    };

    // dK, dV: the first tile's first products overwrite them (scale_d 0 instead of zeroing)
    float dk[HS / 2], dv[HS / 2];

    // S^T and dP^T of sub-tile hh (queries 64 hh..) of the tile in stage st: two commit groups
    auto issue_s_dp = [&](float(&s)[32], float(&dp)[32], int st, int hh) {
        const uint32_t qo = hh * 64 * kPanelRowBytes;  // rows 64 hh.. of the Q and dO tiles
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk)
            wgmma_ss_n64<0, 0>(s, desc_kmaj_kv(k_addr, kk), desc_kmaj_tile(q_addr + qo, st, kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk)
            wgmma_ss_n64<0, 0>(dp, desc_kmaj_kv(v_addr, kk), desc_kmaj_tile(do_addr + qo, st, kk), kk > 0);
        wgmma_commit();
    };

    int r = 0;             // tiles so far (the Q/dO ring's position)
    int n_dq = 0;          // uses of the dQ staging ring so far (as warp 1's thread counts them): buffer n_dq % 2
    uint32_t dq_ph = 0x3;  // dq_empty's, sum_full's next parities (bits buf, 2 + buf; 1: the first passes)
    float qsum[2] = {0.f, 0.f};  // kBias: this warp's dQ column sums over the query tiles of a head so far (key block 0)
    for (int it = 0;; ++it) {
        const BwdItem& c = wait_item(it);
        if (c.n_tiles == 0) break;
        const int kb = c.kb, n_tiles = c.n_tiles;
        const int key0 = kb * kBN + 64 * cw;  // first key of this warpgroup
        const int krow = kb * kBN + klocal;
        mbar_wait(kv_full, it & 1);
        for (int i = 0; i < n_tiles; ++i, ++r) {
            const int st = r % kStages;
            const uint32_t ph = (r / kStages) & 1;
            int h, qt;
            tile_of(c, i, h, qt);
            const int row0 = qt * kBM;
            const bool need_mask = row0 < key0 + 63;  // some query of the tile precedes some key of this warpgroup
            mbar_wait(&q_full[st], ph);
            mbar_wait(&do_full[st], ph);
            mbar_wait(&aux_full[st], ph);
            // Sub-tiles of 64 queries (HS 64: two): at most 64 + 64 accumulators of S^T, dP^T live besides dK, dV (the
            // consumers' 240 registers), one pair per sub-tile (the next pair is issued before the last is stored);
            // the A fragments of P^T and dS^T stay untouched until their products complete (the next sub-tile's
            // wait, or the one after dQ).
            uint32_t pa[kBM / 16][4], da[kBM / 16][4];
            float s_[kBM / 64][32], dp_[kBM / 64][32];
            issue_s_dp(s_[0], dp_[0], st, 0);
#pragma unroll
            for (int hh = 0; hh < kBM / 64; ++hh) {
                const uint32_t aux = smem_u32(sAux + st * (2 * kBM) + 64 * hh);
                const int q0 = row0 + 64 * hh;
                float(&s)[32] = s_[hh];
                float(&dp)[32] = dp_[hh];
                wgmma_wait<1>();  // S^T (and the previous sub-tile's dV, dK products)
                reg_fence(s);
                // P^T[key, query] = 2^(S^T scale log2e - lse2[query]); zero where query < key. (P^T and dS^T in arrays
                // of their own, not over S^T and dP^T: ptxas serialized every product when a wgmma's accumulators were
                // redefined with another product in flight, C7515.)
                float pt[32], dst[32];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float2 l2 = ld_shared_f32x2(aux + 4 * (8 * j + 2 * t));
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int q = q0 + 8 * j + 2 * t + (e & 1);
                        const int k = krow + 8 * (e >> 1);
                        float p = fast_exp2(fmaf(s[4 * j + e], scale_log2, -((e & 1) ? l2.y : l2.x)));
                        if (need_mask && q < k) p = 0.f;
                        pt[4 * j + e] = p;
                    }
                }
                uint32_t(&pah)[4][4] = *reinterpret_cast<uint32_t(*)[4][4]>(&pa[4 * hh]);
                uint32_t(&dah)[4][4] = *reinterpret_cast<uint32_t(*)[4][4]>(&da[4 * hh]);
                acc_to_a<64>(pah, pt);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
                    wgmma_rs_t<HS>(dv, pah[kk], desc_mn_tile(do_addr, st, 4 * hh + kk), i > 0 || hh > 0 || kk > 0);
                wgmma_commit();
                wgmma_wait<1>();  // dP^T (dV may still run)
                reg_fence(dp);
                // dS^T = P^T (dP^T - D[query])
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float2 dd = ld_shared_f32x2(aux + 4 * (kBM + 8 * j + 2 * t));
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dst[4 * j + e] = pt[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? dd.y : dd.x));
                }
                acc_to_a<64>(dah, dst);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < 4; ++kk)
                    wgmma_rs_t<HS>(dk, dah[kk], desc_mn_tile(q_addr, st, 4 * hh + kk), i > 0 || hh > 0 || kk > 0);
                wgmma_commit();
                // the next sub-tile's S^T, dP^T queue behind dK; then, before the first store of dS^T, both
                // warpgroups' dQ products of the previous tile are done reading it (each waited for its own)
                if (hh + 1 < kBM / 64) issue_s_dp(s_[hh + 1], dp_[hh + 1], st, hh + 1);
                if (hh == 0) named_barrier_sync(1, 256);
                // dS^T rows klocal, klocal + 8 (1024 bytes on; both swizzle with g = klocal & 7), query columns
                // 64 hh + 8c + 2t in 16-byte chunk c ^ g (conflict-free: a warp's 8 rows hit 8 different chunks)
                const uint32_t rowp = smem_u32(sdS) + hh * Cfg::kDsPanelBytes + klocal * kPanelRowBytes + 4 * t;
#pragma unroll
                for (int ch = 0; ch < 8; ++ch) {
                    const uint32_t p = rowp + ((ch ^ g) << 4);
                    st_shared_u32(p, dah[ch / 2][2 * (ch & 1)]);
                    st_shared_u32(p + 8 * kPanelRowBytes, dah[ch / 2][2 * (ch & 1) + 1]);
                }
            }
            fence_proxy_async();         // the generic stores of dS^T, visible to wgmma's reads
            named_barrier_sync(2, 256);  // the whole dS^T tile is in shared memory
            float dq[32];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBN / 16; ++kk)
                wgmma_ss_n64<1, 1>(dq, make_desc(ds_addr + kk * 16 * kPanelRowBytes, Cfg::kDsPanelBytes, 1024),
                                   make_desc(kq_addr + kk * 16 * kPanelRowBytes, Cfg::kKVPanelBytes, 1024), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            float dqv[32];  // dQ's values after the wait
            reg_copy(dqv, dq);
            mbar_arrive(&empty[st]);
            if (i == n_tiles - 1) mbar_arrive(kv_empty);  // the producer loads the next item's K and V
            if (kb == 0) {
                // the tile's last contributor: the others' sum (this warpgroup's half, copied into the staging
                // buffer by warp 1's thread, normally already there) plus this part, scaled, in bf16 straight into dqkv
                if (qt * kBM / kBN > 0) {
                    const int buf = n_dq % kDqBufs;
                    wait_flip(&sum_full[buf], dq_ph, 2 + buf);
                    const uint32_t stage = smem_u32(sdQ + buf * Cfg::kDqFloats + cw * (Cfg::kDqFloats / 2)) + 16 * ctid;
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const float4 v = ld_shared_f32x4(stage + 16 * 128 * j);
                        dqv[4 * j] += v.x;
                        dqv[4 * j + 1] += v.y;
                        dqv[4 * j + 2] += v.z;
                        dqv[4 * j + 3] += v.w;
                    }
                    mbar_arrive(&sum_empty[buf]);  // read: warp 1's thread may fill the buffer again
                    ++n_dq;
                }
                const size_t row_stride = lay.row_stride();
                bf16* q0 = dqkv + (size_t)c.b * T * row_stride + lay.q(h) + (HS == 64 ? 0 : 64 * cw);
                const int qrow = row0 + (HS == 64 ? 64 * cw : 0) + 16 * warp + g;
                if constexpr (kBias) {
                    // the column sums of the stored dQ, added over the head's query tiles; after its last one, the
                    // warp's partial row (batch, slot = the warps holding these columns) at the head's columns
                    float qs[2];
                    store_acc_rows<64>(q0, row_stride, dqv, qrow, T, t, scale, qs);
                    qsum[0] += qs[0];
                    qsum[1] += qs[1];
                    if (qt == c.num_qt - 1) {
                        const int slot = HS == 64 ? 4 * cw + warp : warp;
                        float* prow = bias_part + ((size_t)c.b * kQSlots<HS> + slot) * row_stride + lay.q(h);
                        *reinterpret_cast<float2*>(prow + (HS == 64 ? 0 : 64 * cw) + colsum_col<64>(lane, 0)) =
                            make_float2(qsum[0], qsum[1]);
                        qsum[0] = qsum[1] = 0.f;
                    }
                } else {
                    store_acc_rows<64>(q0, row_stride, dqv, qrow, T, t, scale);
                }
            } else {
                // the tile's dQ part to its staging buffer, once the buffer's previous parts are read; warp 1 of the
                // producer warpgroup adds it to the accumulator
                const int buf = n_dq % kDqBufs;
                wait_flip(&dq_empty[buf], dq_ph, buf);
                const uint32_t stage = smem_u32(sdQ + buf * Cfg::kDqFloats + cw * (Cfg::kDqFloats / 2)) + 16 * ctid;
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    st_shared_f32x4(stage + 16 * 128 * j, dqv[4 * j], dqv[4 * j + 1], dqv[4 * j + 2], dqv[4 * j + 3]);
                fence_proxy_async();  // visible to the bulk copy
                mbar_arrive(&dq_full[buf]);
                ++n_dq;
            }
        }

        // dK, dV after the last wait, stored in place (copies would be live beside them: the next item's first
        // products read dk, dv with a run-time scale_d)
        reg_fence(dk);
        reg_fence(dv);
        // the item's coordinates reread from its slot (keeping them live through the loop spilled them)
        const int krow_e = c.kb * kBN + 64 * cw + 16 * warp + g;
        const size_t row_stride = lay.row_stride();
        bf16* base = dqkv + (size_t)c.b * T * row_stride;
        if constexpr (kBias) {
            // and the warp's column sums of both, to warp 3 (sum_rows_full) through the item's buffer (that of item
            // it - 2 read: sum_rows_empty)
            float ks[HS / 32], vs[HS / 32];
            store_acc_rows<HS>(base + lay.k(c.kh), row_stride, dk, krow_e, T, t, scale, ks);
            store_acc_rows<HS>(base + lay.v(c.kh), row_stride, dv, krow_e, T, t, 1.f, vs);
            const int buf = it % 2;
            if (it >= 2) mbar_wait(&sum_rows_empty[buf], ((it / 2) - 1) & 1);
            float* part = sSum + buf * Cfg::kSumFloats + (4 * cw + warp) * HS;
#pragma unroll
            for (int i = 0; i < HS / 32; i += 2) {
                *reinterpret_cast<float2*>(part + colsum_col<HS>(lane, i)) = make_float2(ks[i], ks[i + 1]);
                *reinterpret_cast<float2*>(part + 8 * HS + colsum_col<HS>(lane, i)) = make_float2(vs[i], vs[i + 1]);
            }
            mbar_arrive(&sum_rows_full[buf]);
        } else {
            store_acc_rows<HS>(base + lay.k(c.kh), row_stride, dk, krow_e, T, t, scale);
            store_acc_rows<HS>(base + lay.v(c.kh), row_stride, dv, krow_e, T, t, 1.f);
        }
        done_item(it);
    }  // work items
#endif
}

// ---- host side ----------------------------------------------------------------------------------------
// heads per CTA group (cta_order): about one wave of CTAs (one CTA per multiprocessor) per group
int head_group(int nblk, int num_bh) {
    static int sms = 0;
    if (sms == 0) sms = device_sm_count();
    int g = sms / nblk;
    if (g < 1) g = 1;
    if (g > num_bh) g = num_bh;
    return g;
}

// A (B, T, cols) bf16 tensor (row stride cols) seen as 3-D {cols, T, B}; box {64, box_rows, 1}, 128-byte
// swizzle; rows past T read as zeros.
CUtensorMap make_map_3d(const bf16* base, int cols, int T, int B, int box_rows) {
    const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)T, (cuuint64_t)B};
    const cuuint64_t strides[2] = {(cuuint64_t)cols * 2, (cuuint64_t)cols * 2 * (cuuint64_t)T};
    const cuuint32_t box[3] = {(cuuint32_t)kPanelCols, (cuuint32_t)box_rows, 1};
    return tensor_map_bf16(base, 3, dims, strides, box);
}

// the kernel of kWG consumer warpgroups on the persistent grid (one CTA per multiprocessor, fewer if fewer items)
template <int HS, int kWG>
void launch_forward_sm90(bf16* out, float* lse, const bf16* qkv, int B, int T, QkvLayout lay, cudaStream_t stream) {
    using Cfg = FwdCfg<HS, kWG>;
    auto kernel = attention_forward_sm90_kernel<HS, kWG>;
    constexpr int smem = Cfg::kSmemBytes;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const CUtensorMap map_kv = make_map_3d(qkv, lay.row_stride(), T, B, Cfg::kBN);
    const CUtensorMap map_q = make_map_3d(qkv, lay.row_stride(), T, B, 64);
    const int num_bh = B * lay.NH;
    const int num_qblocks = ceil_div(T, Cfg::kBM);
    const long long work = (long long)num_bh * num_qblocks;
    require(work <= 0x7fffffffLL, "attention_sm90: too many work items");
    static int sms = 0;
    if (sms == 0) sms = device_sm_count();
    const int grid = (int)(work > sms ? sms : work);
    const float scale_log2 = (float)(1.0 / std::sqrt((double)HS) * 1.4426950408889634);
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(map_q, map_kv, out, lse, T, lay, num_bh, num_qblocks,
                                                  head_group(num_qblocks, num_bh), scale_log2);
    CUDA_CHECK_LAUNCH();
}

// forward variants: 0 = 2 consumer warpgroups on 128-query blocks, 1 = 3 on 192-query blocks (HS 64 only; HS 128
// runs 0); both persistent, ping-pong, dynamic order. The defaults are the fastest on an H200 (harness, one
// process, 2026-12-02, branch attn-fwd3, best of 3 rounds): HS 64 (B=64 T=1024 NH=12): 1, 303.3 us (0: 334.0,
// cuDNN 295.9); HS 128 (NH=6): 0, 249.1 us (cuDNN 230.1); B=16 T=2048 NH=32 HS 64: 1, 679.2 us (cuDNN 671.7)
constexpr int kDefaultVariantHs64 = 1;
constexpr int kDefaultVariantHs128 = 0;

template <int HS>
void forward_variant(bf16* out, float* lse, const bf16* qkv, int B, int T, QkvLayout lay, int variant,
                     cudaStream_t stream) {
    if constexpr (HS == 64) {
        if (variant == 1) {
            launch_forward_sm90<HS, 3>(out, lse, qkv, B, T, lay, stream);
            return;
        }
    }
    launch_forward_sm90<HS, 2>(out, lse, qkv, B, T, lay, stream);
}

// the backward; work: fused_work_floats<HS> floats, 16-byte aligned; dqkv_bias (if not null) += the column sums of
// dqkv: the kBias kernel's partial rows, then column_sum_add
template <int HS, bool kBias>
void launch_backward_fused_sm90(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dvec,
                                float* work, int B, int T, QkvLayout lay, bf16* dqkv_bias, cudaStream_t stream) {
    using Cfg = FusedBwdCfg<HS, kBias>;
    const int C = lay.NH * HS, W = lay.row_stride();
    const double scale_d = 1.0 / std::sqrt((double)HS);
    const float scale = (float)scale_d, scale_log2 = (float)(scale_d * 1.4426950408889634);
    const int num_qt = ceil_div(T, Cfg::kBM);
    const long long num_tiles = (long long)B * lay.NH * num_qt;
    float* dq_acc = work;
    float* bias_part = work + (size_t)num_tiles * Cfg::kDqFloats;
    const int bias_rows = bias_partial_rows<HS>(B, T);
    uint32_t* dq_count = reinterpret_cast<uint32_t*>(bias_part + (size_t)bias_rows * 3 * lay.NH * HS);
    CUDA_CHECK(cudaMemsetAsync(dq_count, 0, (size_t)num_tiles * sizeof(uint32_t), stream));
    auto kernel = attention_backward_fused_sm90_kernel<HS, kBias>;
    constexpr int smem = Cfg::kSmemBytes;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const CUtensorMap tm_kv = make_map_3d(qkv, W, T, B, Cfg::kBN);
    const CUtensorMap tm_q = make_map_3d(qkv, W, T, B, Cfg::kBM);
    const CUtensorMap tm_do = make_map_3d(dout, C, T, B, Cfg::kBM);
    const int num_bkv = B * lay.NKV;
    const int num_kblocks = ceil_div(T, Cfg::kBN);
    const long long items = (long long)num_bkv * num_kblocks;
    require(items <= 0x7fffffffLL, "attention_sm90: too many work items");
    static int sms = 0;
    if (sms == 0) sms = device_sm_count();
    const int grid = (int)(items > sms ? sms : items);
    kernel<<<grid, 384, smem, stream>>>(tm_kv, tm_q, tm_do, dqkv, lse, dvec, dq_acc, dq_count, bias_part, T, lay,
                                        num_bkv, num_kblocks, (int)items, head_group(num_kblocks, num_bkv), scale,
                                        scale_log2);
    CUDA_CHECK_LAUNCH();
    // the query columns' partial rows (B x kQSlots), then the key and value columns' (B x key blocks), in order
    if constexpr (kBias)
        column_sum_add(dqkv_bias, dqkv_bias + C, C, bias_part, B * kQSlots<HS>, W, stream, B * num_kblocks);
}

template <int HS>
void backward_fused_sm90(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dvec,
                         float* work, int B, int T, QkvLayout lay, bf16* dqkv_bias, cudaStream_t stream) {
    if (dqkv_bias)
        launch_backward_fused_sm90<HS, true>(dqkv, dout, qkv, lse, dvec, work, B, T, lay, dqkv_bias, stream);
    else
        launch_backward_fused_sm90<HS, false>(dqkv, dout, qkv, lse, dvec, work, B, T, lay, nullptr, stream);
}

}  // namespace

size_t attention_sm90_backward_work_floats(int B, int T, int NH, int HS) {
    return HS == 64 ? fused_work_floats<64>(B, T, NH) : fused_work_floats<128>(B, T, NH);
}

void attention_backward_sm90(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dvec,
                             int B, int T, int NH, int NKV, int HS, float* work, size_t work_floats,
                             cudaStream_t stream, bf16* dqkv_bias) {
    require(HS == 64 || HS == 128, "attention_backward_sm90: head size must be 64 or 128");
    require(NKV > 0 && NH % NKV == 0, "attention_backward_sm90: NKV must divide NH");
    // the bulk copies need 16-byte alignment: skip to it (fused_work_floats counts 4 floats of slack)
    const uintptr_t a = reinterpret_cast<uintptr_t>(work);
    require(work != nullptr && (a & 3) == 0, "attention_backward_sm90: the work area is missing or unaligned");
    require(work_floats >= attention_sm90_backward_work_floats(B, T, NH, HS),
            "attention_backward_sm90: work area too small");
    work += ((16 - (a & 15)) & 15) / 4;
    const QkvLayout lay{NH, NKV, HS};
    if (HS == 64)
        backward_fused_sm90<64>(dqkv, dout, qkv, lse, dvec, work, B, T, lay, dqkv_bias, stream);
    else
        backward_fused_sm90<128>(dqkv, dout, qkv, lse, dvec, work, B, T, lay, dqkv_bias, stream);
}

bool attention_sm90_supported(int B, int T, int NH, int HS) {
    (void)B;
    (void)T;
    (void)NH;
    return HS == 64 || HS == 128;
}

void attention_forward_sm90(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, int NKV, int HS,
                            cudaStream_t stream, int variant) {
    require(HS == 64 || HS == 128, "attention_forward_sm90: head size must be 64 or 128");
    require(NKV > 0 && NH % NKV == 0, "attention_forward_sm90: NKV must divide NH");
    // the default variant per head size: the fastest one measured on an H200 (docs/perf.md)
    if (variant < 0) variant = HS == 64 ? kDefaultVariantHs64 : kDefaultVariantHs128;
    require(variant == 0 || variant == 1, "attention_forward_sm90: variant 0 or 1");
    const QkvLayout lay{NH, NKV, HS};
    if (HS == 64)
        forward_variant<64>(out, lse, qkv, B, T, lay, variant, stream);
    else
        forward_variant<128>(out, lse, qkv, B, T, lay, variant, stream);
}
