// gemm_sm90.cu: the GEMMs with an elementwise epilogue (GPT-2's GeLU and its gradient, the attention backward's D, the
// LM head's exp, the residual add), for Hopper (sm_90a): TMA loads, wgmma products, the
// epilogue of one tile overlapped with the products of another. One kernel, templated on its epilogue (Epi):
//   Gelu  (fc's forward):  pre (M, N) = round(a (M, K) @ w (N, K)^T + bias), out = round(gelu(a @ w^T + bias))
//                          from the fp32 value (cuBLASLt's GELU_AUX_BIAS; bias may be null)
//   DGelu (the backward of the projection after the GeLU): out (M, N) = round((a @ w^T) * gelu'(pre)), pre (M, N)
//                          read (cuBLASLt's DGELU); optionally also the column sums of out per 128-row tile (the
//                          bias gradient of the GEMM whose output pre was: fc's, below)
//   HeadDot (the backward of attention's output projection): out (M, N) = round(a @ w^T), and with pre (M, N) read
//                          (attention's output O) dot[(b NH + h) T + t] = sum over head h's hs columns c of
//                          out[m, c] * pre[m, c], m = b T + t, NH = N / hs: the attention backward's
//                          D = rowsum(dO * O) from the rounded dO it will read, so it skips its pass over both
//   Exp   (the LM head's forward, lm_head.cu): out (M, N) = round(exp(a @ w^T - shift[m])) in the first valid_cols
//                          columns, 0 past them, and row_sums (N / 128, M) fp32: per 128-column tile, each row's sum
//                          of the fp32 values before rounding (lm_head.cu adds them up: the softmax's denominators,
//                          to fp32 accuracy). The
//                          exponent is capped at 64 (finite sums; lm_head.cu recomputes the rows that reach it).
//                          Its tiles go in column-major order (M-inner), see Schedule
//   Residual (a block's projection into the residual stream): out (M, N) = round(a @ w^T + bias + pre), pre (M, N)
//                          read (the stream before the block's branch; it may be out itself: each tile's pre is
//                          read before its out is written). cuBLASLt's C with beta = 1 reads C in its epilogue
//                          without hiding it (attention's projection on an H200: 136 us against 106 plain);
//                          here the tile comes by TMA under the products, as DGelu's pre
// w row-major (N, K) in both, so both operands are K-major and the mainloop is one code path: the backward's weight
// (K, N) is transposed into a scratch buffer first (matmul.cu, transpose.cu). gelu and gelu' are gelu.cuh's (tanh
// form, one exp2 and one fast reciprocal). Deterministic: each output element is one warpgroup's sum over k in a
// fixed order (no split-K, no atomics).
// Shapes (gemm_sm90_supported): N a multiple of 128, K of 64, pointers 16-byte aligned; any M (TMA zero-fills the
// rows past M on loads and leaves them out on stores). matmul.cu runs this kernel on compute capability 9.x for
// those shapes and cuBLASLt for the others (and for every GEMM without a GeLU epilogue).
//
// Why: GPT-2's fc GEMM (M = B*T = 65536, N = 3072, K = 768) is short in K: a 128 x 128 tile's products take
// ~6k cycles of the tensor cores at their peak (4096 flop/cycle/SM; ~8k at torch.matmul's measured rate), and its
// epilogue (16k elements: two special-function ops each, at 16 per cycle per SM = 2k cycles, ~6 fp32 ops, 64 KB
// out) a good part of that. cuBLASLt's GELU_AUX_BIAS runs at 78% of torch.matmul's rate on this shape.
//
// Schedule: "ping-pong". A persistent grid (one CTA per multiprocessor, 384 threads) of clusters of 2 CTAs (1 where
// the row tiles do not pair up, or with GPT2CU_SM90_CLUSTER=1). A cluster takes "units": a column tile and two
// consecutive row tiles, one a CTA. Unit i of a cluster (units c, c + clusters, ..., in row-major unit order: the
// clusters of a wave share their A rows and all of B through L2) belongs to consumer warpgroup i % 2 in both CTAs.
// Exp's units are column-major instead (M-inner): the LM head's B is the (50304, 768) vocabulary, 77 MB, which a
// row-major wave (66 column tiles of two row blocks) would bring from DRAM once per row-block pair; M-inner, a wave
// covers every row block of ~2 column tiles, so A (a chunk of 8192 rows: 12.6 MB) stays in L2 and B is read once.
// Why clusters: the two CTAs of a unit need the same 128 B rows; each loads 64 of them into both (TMA multicast), so
// the L2 -> shared traffic per tile is 24 KB a k-block instead of 32. On an H200 in GPT-2's step at B = 64 the board
// sits at its 700 W limit, so energy, not issue, sets the clock: with clusters the step took 0.8 ms less (100.08
// against 100.90 ms, ABBA in one build) at a ~60 MHz higher SM clock for the same power.
//   warpgroup 0, the producer (setmaxnreg 40, 24 with 192-wide tiles): one thread loads the k-blocks of 64 of each
//     tile's A rows and its share of the B rows (all without a cluster) by TMA (128-byte swizzle) into a ring of
//     stages (5 of 32 KB with 128-wide tiles; 4 of 40 KB with 192-wide, 3 where the epilogue reads pre) (a
//     "full" mbarrier per stage completed by the byte count, the peer's B share included; an "empty" one on which
//     the consuming warpgroup of each CTA of the cluster arrives once, since the stage's B half goes to both).
//   warpgroups 1, 2, the consumers (setmaxnreg 232, 240): each runs its tile's whole k loop (two m64nNk16 wgmma per
//     k step from shared memory, fp32 accumulators in registers), then passes the turn to the other (named barriers
//     1, 2) and runs the epilogue while the other's products run.
// Tile: 128 rows x 192 columns per warpgroup where 192 divides N (gemm_sm90_tile_cols; not for Residual, nor HeadDot
// at head size 128), else 128 x 128: 192 or 128 accumulator registers a thread (two warpgroups' tiles are live at
// once, which the overlap needs: 128 x 256 is out). Why 192: a k-block's 16 KB of A feeds 1.5x the products, so a
// tile pair moves 28 KB from L2 per 3.1 MFLOP instead of 24 per 2.1 (8.9 bytes per kFLOP against 11.4); at the
// power limit fewer bytes are more clock. Measured on an H200 (sustained, dev/gemm_sm90/variants/energy.py, the
// 128-wide kernel -> 192): the Exp at the LM head's shape 1189 -> 1055 us (torch.matmul plain: 1065), the GeLU at
// fc's 620 -> 587, the DGelu 684 -> 640, the HeadDot at attproj's 174 -> 173; the Residual there 167 -> 170, so it
// stays 128-wide. Earlier, at fc's shape with the epilogue left out: 128 x 128 ran the products at 98% of
// torch.matmul's rate, 64 x 256 (one m64n256k16, 40 KB stages) at 80%.
// Epilogue: forward, each warp adds the bias (a 64-column panel's at a time) and writes out and pre, rounded to bf16,
// with stmatrix (8x8 matrices from the mma fragment layout) into 64 x 64 panels with the 128-byte swizzle (the 8
// rows of a matrix in 8 different bank groups: no conflicts); one thread then stores the panels by TMA
// (cp.async.bulk.tensor) with an L2 evict-first policy (out and pre are streamed once), which leaves the
// warpgroup free at once and takes the address math, the coalescing and the row bound off it. Backward: the
// tile's pre comes into the same panels by TMA (evict-first), requested before the k loop so its latency hides
// under the products, read with ldmatrix, and out is written in its place. A buffer: in the forward (32 KB) passes
// of 64 x 64 out + pre alternating between its halves, else the whole tile (32 or 48 KB). The epilogues that read
// pre (DGelu, HeadDot, Residual) need one per consumer warpgroup (the next tile's pre lands under the products):
// 5 x 32 KB stages + 2 x 32 KB = 224 KB, or 3 x 40 + 2 x 48 = 216 KB. Gelu and Exp fill theirs only after the
// products, and the two warpgroups' epilogues take turns, so they share one (named barriers 5, 6 hand it over once
// its stores have read it): 192 KB, or 4 x 40 + 32 (Gelu) / 48 (Exp) at 192 wide. Measured on an H100, sustained
// (dev/gemm_sm90/variants/energy.py): the Exp at the LM head's shape 1170 us against 1187 with two buffers, the GeLU
// forward at fc's the same; the 32 KB left as a sixth stage made both slower (1180, 611 us). The Exp's stores are
// 9-11% of its time (H200): they cost about in proportion to their bytes, by TMA or by st.global, evict-first or not
// (docs/perf.md, twelfth session).
// DGeluGelu (the backward under recompute 1, 2): DGelu's epilogue also writes gelu(pre), the forward's activation
// that fcproj's weight gradient reads next, from the pre it holds in registers anyway: straight to global memory, 16
// bytes a lane (quad_transpose), not through the buffer, whose second pass measured 870 against 606 us a call in
// the step (H200; docs/perf.md, fourteenth session).
// Column sums (DGelu with colsum): fc's bias gradient is colsum(out) over all M rows, which bias.cu's pass would
// read back from DRAM (M x N bf16: ~100 us at GPT-2's shape). Once a tile's out is in the panels (after the
// epilogue's last barrier, while its TMA store reads them), each warp of the warpgroup sums a quarter of its columns
// (32 or 48) over the 128 rows from shared memory, 4 chunks of 8 columns a round: lane (c, rg) reads chunk c of the
// round's of rows 16 rg .. 16 rg + 15 (16 ld.shared.v4, the rows of the two rg of a quarter-warp 4 apart in the
// swizzle: conflict-free), adds them in fp32, and the 8 row groups are folded by shuffles (7, each lane left with
// one column). The warpgroup writes one fp32 row of partial sums a tile, deterministically (each element once, no
// atomics); column_sum_add finishes. Why from the panels and not from the accumulators: those hold one column pair
// in 4 rows per thread and 32 rows per warp, so the warps' sums would have to meet in shared memory, which is full
// (the stages, 2 epilogue buffers and barriers leave under 11 KB); the panels already hold the rounded values (what bias.cu would
// sum), with all 128 rows of a column in one warpgroup and no registers added to the epilogue. Cost per tile and
// thread: ~16 loads, ~130 unpacks, ~130 adds, one barrier more (the next tile's pre may not overwrite the panels
// before every warp has read them); rows past M are zeros (TMA zero-fills a's rows past M: acc = 0, out = 0).
// HeadDot: the backward's, with out = round(acc) and the dot products of the rounded values with pre (fp32 fma over
// the lane's 16 columns of a 64-column panel, a second panel's added for hs 128, then the quad's 4 lanes summed by
// shuffles: a fixed order, as the attention preprocess's, whose sum of the same products it matches to fp32
// rounding).
// History (H200, M=65536 N=3072 K=768, dev/gemm_sm90/bench.py, one process; torch.matmul plain ~425 us,
// cuBLASLt GELU_AUX_BIAS ~545 us):
//   - the epilogue straight from the fragments (4-byte stores, bias loaded where used): 1383 us;
//   - through fp32 shared-memory staging and 16-byte st.global: 680 us (the epilogue's ~3.8k cycles a tile added
//     to the products rather than hidden under them);
//   - this version (bf16 panels by stmatrix, TMA stores, gelu.cuh's folded constants: ~1.35k instructions,
//     ~3.1k cycles of epilogue a tile, most of it the special-function ops): 466.8 us against cuBLASLt's
//     544.8 us, 14% faster, at 91% of torch.matmul plain's rate (425.6 us).
// The backward (DGELU epilogue), first with the weight as an MN-major B operand (a transposed shared-memory
// descriptor, branch gemm-sm90): 633.8 us against cuBLASLt's DGELU 545.4 us; its schedule trace (CTA 0, SM
// cycles a tile, medians) showed the products slower than the forward's (7887 against 7106; epilogue 6210 against
// 5787). Hence the K-major weight, transposed first (the forward's mainloop; the transpose of fc's 768 x 3072
// weight is 4.7 MB read and written).
#include "kernels.h"
#include "common.cuh"
#include "gelu.cuh"
#include "env_switch.h"
#include "gemm_sm90.h"
#include "sm90_common.cuh"
#include "wgmma_sm90.cuh"

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPT2CU_SM90A_DEVICE 1
#endif

namespace {

using namespace sm90;

enum class Epi { Gelu, DGelu, HeadDot, Exp, Residual, DGeluGelu };  // the forward's GeLU epilogue; the backward's, with
                                                         // gelu'(pre); with the per-head dot products with pre; the
                                                         // LM head's exp; bias and pre added; DGelu's, also
                                                         // writing gelu(pre) (the backward's recompute)
constexpr int kThreads = 384;
constexpr int kBM = 128, kBK = 64;  // a warpgroup's tile rows; k per stage (one 128-byte swizzled panel)
constexpr int kABytes = kBM * 128;  // 128 rows of 64 k
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kExpCap = 64.f;  // Exp's largest exponent (base 2): a row's sum of 50304 values stays finite
constexpr int kPanelBytes = 64 * 128;  // the epilogue's TMA box: 64 rows x 64 bf16 columns, swizzled
// The epilogues that read pre (its tile comes by TMA before the products, under them) need a buffer per consumer
// warpgroup; the others (Gelu, Exp) fill theirs only after the products, and the two warpgroups' epilogues take
// turns, so they share one, handed over by named barriers (measured: the Exp 1.4% faster than with two buffers).
__host__ __device__ constexpr bool is_dgelu(Epi e) { return e == Epi::DGelu || e == Epi::DGeluGelu; }
__host__ __device__ constexpr bool loads_pre(Epi e) { return is_dgelu(e) || e == Epi::HeadDot || e == Epi::Residual; }
// The shared memory of a tile kBN columns wide (gemm_sm90_tile_cols): the stages' ring, then the epilogue buffers
// (Gelu: two passes of a 64 x 64 out + pre; the others: the whole tile), then the barriers.
template <Epi kEpi, int kBN>
struct Layout {
    static_assert(kBN == 128 || kBN == 192, "tile widths: 128, 192");
    static constexpr int kPanels = kBN / 64;  // a tile row's panels of 64 columns
    static constexpr int kStageBytes = kABytes + kBN * 128;
    static constexpr int kStages = kBN == 128 ? 5 : loads_pre(kEpi) ? 3 : 4;  // 227 KB
    static constexpr int kEpiOffset = kStages * kStageBytes;
    static constexpr int kEpiBytes = (kEpi == Epi::Gelu ? 4 : 2 * kPanels) * kPanelBytes;
    static constexpr int kBuffers = loads_pre(kEpi) ? 2 : 1;
    static constexpr int kBarOffset = kEpiOffset + kBuffers * kEpiBytes;
    static constexpr int kSmemBytes = kBarOffset + 8 * (2 * kStages + 2) + 1024;  // + barriers, + alignment slack
    static_assert(kSmemBytes <= 227 * 1024, "shared memory");
    // registers a thread (setmaxnreg): a 192-wide tile's 192 accumulators take the producer's down to 24 (at 40 / 232
    // the Gelu epilogue spills 12 bytes, and measured on an H200 the GeLU took 600 us against 587, the DGelu 644
    // against 639); the producer of a 128-wide tile's Exp spills at 24
    static constexpr int kProducerRegs = kBN == 128 ? 40 : 24, kConsumerRegs = kBN == 128 ? 232 : 240;
    static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "register file");
};
static_assert(kBM == 128, "gemm_sm90_row_tiles (gemm_sm90.h) counts row tiles of 128");

// a shared-memory descriptor moved by `bytes` (the address field cannot carry: shared addresses are < 2^18)
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) {
    return (desc & 0xffffffff00000000ull) | ((uint32_t)desc + (bytes >> 4));
}

// the first row and column of tile `tile`: row-major tile order, or column-major (m_inner)
template <bool kMInner, int kBN>
__device__ __forceinline__ int2 tile_origin(int tile, int tiles_m, int tiles_n) {
    return kMInner ? make_int2((tile % tiles_m) * kBM, (tile / tiles_m) * kBN)
                   : make_int2((tile / tiles_n) * kBM, (tile % tiles_n) * kBN);
}

// the sums over the 4 lanes of each quad (the 4 column pairs t of a row) of two values, in a fixed order
__device__ __forceinline__ void quad_sum(float (&v)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        v[h] += __shfl_xor_sync(0xffffffffu, v[h], 1);
        v[h] += __shfl_xor_sync(0xffffffffu, v[h], 2);
    }
}

__device__ __forceinline__ float2 bf16x2_to_float2(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// one m64 x kBN x k16 product, both operands K-major in shared memory: d = A B + (accumulate ? d : 0), or
// (kOverwrite) d = A B with d's old value no input, so that a finished tile's accumulators are dead until the next
// tile's first product (the accumulating form keeps them live through the epilogue's last work: DGelu's column sums
// spilled at 192 wide)
template <int kBN, bool kOverwrite>
__device__ __forceinline__ void wgmma_tile(float (&d)[kBN / 2], uint64_t da, uint64_t db, bool accumulate) {
    if constexpr (kOverwrite && kBN == 128)
        wgmma_ss_n128_overwrite<0, 0>(d, da, db);
    else if constexpr (kOverwrite)
        wgmma_ss_n192_overwrite<0, 0>(d, da, db);
    else if constexpr (kBN == 128)
        wgmma_ss_n128<0, 0>(d, da, db, accumulate);
    else
        wgmma_ss_n192<0, 0>(d, da, db, accumulate);
}

// The accumulator of m64 sub-tile mi: acc[mi][4j + 2h + e] is row 64 mi + 16 warp + g + 8h, column 8j + 2t + e of
// the tile (g = lane / 4, t = lane % 4): "pair" 2j + h of the sub-tile, two consecutive columns, one bf16x2 once
// rounded. Pairs 4jp .. 4jp + 3 are the four 8x8 matrices (rows 0-7 / 8-15 of the warp's 16, column chunks 2jp,
// 2jp + 1) of one stmatrix / ldmatrix x4, in the mma fragment layout.
// tm_pre: the forward's second output, the backward's input; bias: the forward's (may be null); gelu_out: DGeluGelu's
// gelu(pre), (M, N) bf16; colsum: DGelu's column sums per row tile, (ceil(M / kBM), N) fp32 (may be null); dot, T, hs:
// HeadDot's; row_shift, row_sums, valid_cols: Exp's.
template <Epi kEpi, int kBN>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b,
                     const __grid_constant__ CUtensorMap tm_out, const __grid_constant__ CUtensorMap tm_pre,
                     const bf16* __restrict__ bias, bf16* __restrict__ gelu_out, float* __restrict__ colsum,
                     float* __restrict__ dot, int M, int N, int K, int T, int hs, const float* __restrict__ row_shift,
                     float* __restrict__ row_sums, int valid_cols) {
#ifdef GPT2CU_SM90A_DEVICE
    constexpr int MI = kBM / 64;
    using L = Layout<kEpi, kBN>;
    constexpr int kStages = L::kStages, kStageBytes = L::kStageBytes, kPanels = L::kPanels;
    extern __shared__ uint8_t smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarOffset);
    uint64_t* empty = full + kStages;
    uint64_t* pre_full = empty + kStages;  // per consumer warpgroup: its tile's pre arrived (backward)
    constexpr bool kLoadsPre = loads_pre(kEpi);
    constexpr bool kSharedBuffer = L::kBuffers == 1;
    constexpr bool kMInner = kEpi == Epi::Exp;

    const int tid = threadIdx.x;
    const int wg = warpgroup_index();
    const int tiles_m = ceil_div(M, kBM), tiles_n = N / kBN;
    const int num_kb = K / kBK;
    // a cluster of `cluster` CTAs (1 or 2, launch) runs the row tiles of a "unit" (units_m x tiles_n of them) at
    // once, the CTA of rank r the unit's r-th: one column tile, so the CTAs' k-block sequences match and each
    // loads 1 / cluster of the B rows into all of them (multicast)
    const int cluster = (int)cluster_nctarank(), rank = (int)cluster_ctarank();
    const int units_m = tiles_m / cluster, num_units = units_m * tiles_n;  // the launch makes tiles_m divisible
    const int cluster_id = (int)blockIdx.x / cluster, clusters = (int)gridDim.x / cluster;
    auto origin = [&](int unit) {
        const int2 o = tile_origin<kMInner, kBN>(unit, units_m, tiles_n);
        return make_int2(o.x * cluster + rank * kBM, o.y);
    };

    if (tid == 0) {
        tma_prefetch_desc(&tm_a);
        tma_prefetch_desc(&tm_b);
        tma_prefetch_desc(&tm_out);
        tma_prefetch_desc(&tm_pre);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], cluster);  // the consuming warpgroup of each CTA of the cluster
        }
        if constexpr (kLoadsPre) {
            mbar_init(&pre_full[0], 1);
            mbar_init(&pre_full[1], 1);
        }
        mbar_init_fence();
    }
    __syncthreads();
    if (cluster > 1) cluster_sync();  // the peer's barriers set up before its loads land here

    if (wg == 0) {
        // ---------------- producer ----------------
        setmaxnreg_dec<L::kProducerRegs>();
        if (tid == 0) {
            int pos = 0;  // k-blocks loaded so far: ring position
            const int b_rows = kBN / cluster;  // this CTA's share of the B rows (tm_b's box)
            for (int unit = cluster_id; unit < num_units; unit += clusters) {
                const int2 o = origin(unit);
                const int m0 = o.x, n0 = o.y;
                for (int kb = 0; kb < num_kb; ++kb, ++pos) {
                    const int st = pos % kStages;
                    uint8_t* sa = smem + st * kStageBytes;
                    // the stage free in every CTA of the cluster (this one's B share goes to all of them)
                    if (pos >= kStages) mbar_wait(&empty[st], ((pos / kStages) - 1) & 1);
                    mbar_arrive_expect_tx(&full[st], kStageBytes);
                    tma_load_2d(sa, &tm_a, &full[st], kb * kBK, m0);
                    uint8_t* sb = sa + kABytes + rank * b_rows * 128;
                    if (cluster == 1)
                        tma_load_2d(sb, &tm_b, &full[st], kb * kBK, n0);
                    else
                        tma_load_2d_multicast(sb, &tm_b, &full[st], kb * kBK, n0 + rank * b_rows,
                                              (uint16_t)((1u << cluster) - 1));
                }
            }
        }
        __syncwarp();
        if (cluster > 1) cluster_sync();  // the end's: no CTA leaves while the peer may still signal it
        return;
    }

    // ---------------- consumers ----------------
    setmaxnreg_inc<L::kConsumerRegs>();
    const int cw = wg - 1;  // tiles cw, cw + 2, ... of this CTA
    const int ctid = tid - 128 * wg;
    const int warp = ctid / 32, lane = ctid % 32;
    const int t = lane & 3;
    // the epilogue's buffer: panels of 64 rows x 64 columns, 128-byte swizzle
    uint8_t* ebuf = smem + L::kEpiOffset + (kSharedBuffer ? 0 : cw * L::kEpiBytes);
    const uint64_t stream_policy = l2_evict_first_policy();  // out, pre: written or read once (A, B stay in L2)
    // the lane's row address for stmatrix / ldmatrix x4 number jp in a panel: matrix q = lane / 8, its row
    // 8 (q & 1) + lane % 8 of the warp's 16, column chunk 2 jp + q / 2 (of 8 columns), which the swizzle puts at
    // chunk (2 jp + q / 2) % 8 ^ row % 8 of the row (row % 8 = lane % 8): 8 rows in 8 different bank groups
    const int q = lane >> 3, r8 = lane & 7;
    const uint32_t lane_addr = smem_u32(ebuf) + (16 * warp + 8 * (q & 1) + r8) * 128 + (((q >> 1) ^ r8) << 4);
    auto mat_addr = [&](int panel, int jp) {
        return (lane_addr + panel * kPanelBytes) ^ (uint32_t)(((2 * jp) & 7) << 4);
    };

    // A and B K-major: A's m64 sub-tile mi 64 rows (8 KB) further, a k16 step +32 bytes
    const uint64_t da0 = make_desc(smem_u32(smem), 16, 1024);
    const uint64_t db0 = make_desc(smem_u32(smem + kABytes), 16, 1024);

    // turns: warpgroup cw waits on barrier 1 + cw and passes to the other's; warpgroup 0 goes first. The
    // epilogue's own barrier (its 128 threads): 3 + cw.
    auto turn_wait = [&]() { named_barrier_sync(1 + cw, 256); };
    auto turn_pass = [&]() { named_barrier_arrive(2 - cw, 256); };
    auto epi_sync = [&]() { named_barrier_sync(3 + cw, 128); };
    // the whole tile's panels (panel p: rows 64 (p / kPanels), columns 64 (p % kPanels)), once every warp's
    // stmatrix is done, to out by TMA (one thread issues them)
    auto store_tile = [&](int m0, int n0) {
        fence_proxy_async();
        epi_sync();
        if (ctid == 0) {
#pragma unroll
            for (int p = 0; p < MI * kPanels; ++p)
                tma_store_2d(&tm_out, ebuf + p * kPanelBytes, n0 + 64 * (p % kPanels), m0 + 64 * (p / kPanels),
                             stream_policy);
            bulk_commit();
        }
    };
    if (cw == 1) named_barrier_arrive(1, 256);
    // the shared epilogue buffer (Gelu, Exp): warpgroup cw waits on barrier 5 + cw before writing into it, and hands
    // it to the other (6 - cw) once its stores have read it; warpgroup 0 first, as with the turns
    auto buffer_wait = [&]() {
        if constexpr (kSharedBuffer) named_barrier_sync(5 + cw, 256);
    };
    auto buffer_pass = [&]() {
        if constexpr (kSharedBuffer) {
            if (ctid == 0) bulk_wait_read<0>();
            __syncwarp();
            named_barrier_arrive(6 - cw, 256);
        }
    };
    if (kSharedBuffer && cw == 1) named_barrier_arrive(5, 256);

    // a stage's release: one arrival on its empty barrier in each CTA of the cluster, after the products read it
    auto release = [&](int pos) {
        if (ctid < cluster) mbar_arrive_cluster(&empty[pos % kStages], ctid);
    };

    // Gelu, Residual: the bias of the lane's column pairs among the 64 columns from n (j: columns n + 8 j + 2t, + 1),
    // loaded a panel at a time in the epilogue (192-wide accumulators leave no registers to hold a tile's through the
    // k loop)
    auto panel_bias = [&](int n, uint32_t (&b)[8]) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            b[j] = bias ? __ldg(reinterpret_cast<const unsigned int*>(bias + n + 8 * j + 2 * t)) : 0u;
    };

    float acc[MI][kBN / 2];
    int i = cw;  // this CTA's tile index
    for (int unit = cluster_id + cw * clusters, it = 0; unit < num_units; unit += 2 * clusters, i += 2, ++it) {
        const int2 o = origin(unit);
        const int m0 = o.x, n0 = o.y;
        // DGelu, HeadDot, Residual: the tile's pre by TMA into the warpgroup's buffer (its latency under the
        // products), once the previous tile's stores have read the buffer
        if (kLoadsPre && ctid == 0) {
            bulk_wait_read<0>();
            mbar_arrive_expect_tx(&pre_full[cw], L::kEpiBytes);
#pragma unroll
            for (int p = 0; p < MI * kPanels; ++p)
                tma_load_2d(ebuf + p * kPanelBytes, &tm_pre, &pre_full[cw], n0 + 64 * (p % kPanels),
                            m0 + 64 * (p / kPanels), stream_policy);
        }

        const int pos0 = i * num_kb;
        // k-block kb's products. DGelu's first k-block's first ones overwrite the accumulators (peeled, so that the
        // loop's accumulating form does not make them live before it: its column sums, after their last use, spilled
        // at 192 wide). Only there: measured on an H200, the Exp at the LM head's shape took 1108 us with it against
        // 1055 without (the GeLU, HeadDot the same either way; peeled, Gelu spills 12-24 bytes).
        constexpr bool kOverwrite = is_dgelu(kEpi);
        auto k_block = [&](int kb, auto first_block) {
            const int pos = pos0 + kb, st = pos % kStages;
            mbar_wait(&full[st], (pos / kStages) & 1);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const uint64_t da = desc_at(da0, st * kStageBytes + mi * 64 * 128 + kk * 32),
                                   db = desc_at(db0, st * kStageBytes + kk * 32);
                    constexpr bool kFirstBlock = decltype(first_block)::value;
                    if (kOverwrite && kFirstBlock && kk == 0)
                        wgmma_tile<kBN, true>(acc[mi], da, db, false);
                    else
                        wgmma_tile<kBN, false>(acc[mi], da, db, kb > 0 || kk > 0);
                }
            wgmma_commit();
            if (kb > 0) {  // the previous k-block's products are done: release its stage
                wgmma_wait<1>();
                release(pos - 1);
            }
        };
        turn_wait();
        if constexpr (kOverwrite) k_block(0, std::true_type{});
        for (int kb = kOverwrite ? 1 : 0; kb < num_kb; ++kb) k_block(kb, std::false_type{});
        turn_pass();  // the other warpgroup's products queue behind this one's last
        // Exp: the shift of the lane's rows (64 mi + 16 warp + g + 8 h) in log2 units, loaded under the last products
        // (not before the k loop: 4 more registers live through it spill)
        float shift2[kEpi == Epi::Exp ? MI : 1][2];
        if constexpr (kEpi == Epi::Exp) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = m0 + 64 * mi + 16 * warp + (lane >> 2) + 8 * h;
                    shift2[mi][h] = m < M ? __ldg(row_shift + m) * kLog2e : 0.f;
                }
        }
        wgmma_wait<0>();
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) reg_fence(acc[mi]);
        release(pos0 + num_kb - 1);

        // ---------------- epilogue: registers -> swizzled shared panels (stmatrix) -> TMA stores ----------------
        // (the stores clip the rows past M; one thread issues them and waits for their reads of the buffer)
        if constexpr (kEpi == Epi::Gelu) {
            // a pass per 64 x 64 panel (mi, pc): its out and pre (two panels) into one of the buffer's halves, in
            // turn, so a pass waits only for the stores of the one before the last
            buffer_wait();
#pragma unroll
            for (int pass = 0; pass < MI * kPanels; ++pass) {
                const int mi = pass / kPanels, pc = pass % kPanels, half = pass & 1;
                uint32_t bias_pass[8];  // its latency under the wait for the buffer's half
                panel_bias(n0 + 64 * pc, bias_pass);
                if (ctid == 0) bulk_wait_read<1>();
                epi_sync();
#pragma unroll
                for (int jq = 0; jq < 4; ++jq) {
                    const int jp = 4 * pc + jq;
                    uint32_t o[4], pr[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {  // pair 4jp + e: columns 16jp + 8(e >> 1) + 2t, +1
                        const float2 b = bf16x2_to_float2(bias_pass[2 * jq + (e >> 1)]);
                        const float x0 = acc[mi][8 * jp + 2 * e] + b.x, x1 = acc[mi][8 * jp + 2 * e + 1] + b.y;
                        o[e] = pack_bf16x2(x0 * gelu_sigmoid(x0), x1 * gelu_sigmoid(x1));
                        pr[e] = pack_bf16x2(x0, x1);
                    }
                    stmatrix_x4(mat_addr(2 * half, jp), o[0], o[1], o[2], o[3]);
                    stmatrix_x4(mat_addr(2 * half + 1, jp), pr[0], pr[1], pr[2], pr[3]);
                }
                fence_proxy_async();
                epi_sync();
                if (ctid == 0) {
                    tma_store_2d(&tm_out, ebuf + 2 * half * kPanelBytes, n0 + 64 * pc, m0 + 64 * mi, stream_policy);
                    tma_store_2d(&tm_pre, ebuf + (2 * half + 1) * kPanelBytes, n0 + 64 * pc, m0 + 64 * mi,
                                 stream_policy);
                    bulk_commit();
                }
            }
            buffer_pass();
        } else if constexpr (kEpi == Epi::Exp) {
            // the whole tile, panel by panel (64 x 64), once the buffer is this warpgroup's (every store from it
            // done reading); the row sums of the fp32 values: the lane's kBN / 4 columns of each of its 4 rows,
            // then the quad's
            buffer_wait();
            const bool edge = n0 + kBN > valid_cols;  // the columns past valid_cols are 0
            float rowsum[2] = {};  // rows g, g + 8 of the warp's 16 in sub-tile mi = p / 2
#pragma unroll
            for (int p = 0; p < MI * kPanels; ++p) {
                const int mi = p / kPanels, pc = p % kPanels;
#pragma unroll
                for (int jq = 0; jq < 4; ++jq) {
                    const int jp = 4 * pc + jq;
                    uint32_t v[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {  // row g + 8 (e & 1), columns 16 jp + 8 (e >> 1) + 2t, + 1
                        const int h = e & 1, col = n0 + 16 * jp + 8 * (e >> 1) + 2 * t;
                        float x0 = fast_exp2(fminf(fmaf(acc[mi][8 * jp + 2 * e], kLog2e, -shift2[mi][h]), kExpCap));
                        float x1 = fast_exp2(fminf(fmaf(acc[mi][8 * jp + 2 * e + 1], kLog2e, -shift2[mi][h]), kExpCap));
                        if (edge) {
                            if (col >= valid_cols) x0 = 0.f;
                            if (col + 1 >= valid_cols) x1 = 0.f;
                        }
                        v[e] = pack_bf16x2(x0, x1);
                        rowsum[h] += x0 + x1;
                    }
                    stmatrix_x4(mat_addr(p, jp), v[0], v[1], v[2], v[3]);
                }
                if (pc == kPanels - 1) {  // the sub-tile's columns done: the quad's sums; lanes t = 0, 1 write
                                          // rows g, g + 8
                    quad_sum(rowsum);
                    const int m = m0 + 64 * mi + 16 * warp + (lane >> 2) + 8 * t;
                    if (t < 2 && m < M) row_sums[(size_t)(n0 / kBN) * M + m] = t ? rowsum[1] : rowsum[0];
                    rowsum[0] = rowsum[1] = 0.f;
                }
            }
            store_tile(m0, n0);
            buffer_pass();
        } else {
            // the whole tile, panel by panel (64 x 64): its pre read (4 ldmatrix x4 issued together: one latency,
            // and registers left for the math to interleave), out = acc * gelu'(pre) (DGelu), acc (HeadDot) or
            // acc + bias + pre (Residual) written in its place. DGeluGelu (the backward recomputing the forward's
            // activation): also gelu(pre), stored from registers to gelu_out, 16 bytes a lane (quad_transpose
            // gathers a row's 8 columns: whole 32-byte sectors), with no second pass over the buffer
            constexpr bool kWithGelu = kEpi == Epi::DGeluGelu;
            mbar_wait(&pre_full[cw], it & 1);
            float rowdot[2] = {0.f, 0.f};  // HeadDot: rows g, g + 8 of the warp's 16, over the head's columns so far
#pragma unroll
            for (int p = 0; p < MI * kPanels; ++p) {
                const int mi = p / kPanels, pc = p % kPanels;
                uint32_t bias_pass[8];
                if constexpr (kEpi == Epi::Residual) panel_bias(n0 + 64 * pc, bias_pass);
                // the panel's pre in groups of kGroup ldmatrix x4 issued together (one latency, and registers left
                // for the math to interleave; 192-wide accumulators leave room for two)
                constexpr int kGroup = kBN == 128 ? 4 : 2;
#pragma unroll
                for (int j0 = 0; j0 < 4; j0 += kGroup) {
                    uint32_t v[kGroup][4], gw[kWithGelu ? kGroup : 1][4];
#pragma unroll
                    for (int g = 0; g < kGroup; ++g) ldmatrix_x4(mat_addr(p, 4 * pc + j0 + g), v[g]);
#pragma unroll
                    for (int g = 0; g < kGroup; ++g) {
                        const int jq = j0 + g, jp = 4 * pc + jq;
#pragma unroll
                        for (int e = 0; e < 4; ++e) {  // row g + 8 (e & 1)
                            const float2 x = bf16x2_to_float2(v[g][e]);
                            const float a0 = acc[mi][8 * jp + 2 * e], a1 = acc[mi][8 * jp + 2 * e + 1];
                            if constexpr (is_dgelu(kEpi)) {
                                const float x20 = x.x * x.x, x21 = x.y * x.y;
                                const float s0 = gelu_sigmoid(x.x, x20), s1 = gelu_sigmoid(x.y, x21);
                                const float d0 = a0 * gelu_grad(x.x, x20, s0), d1 = a1 * gelu_grad(x.y, x21, s1);
                                if constexpr (kWithGelu) gw[g][e] = pack_bf16x2(x.x * s0, x.y * s1);
                                v[g][e] = pack_bf16x2(d0, d1);
                            } else if constexpr (kEpi == Epi::Residual) {
                                const float2 b = bf16x2_to_float2(bias_pass[2 * jq + (e >> 1)]);
                                v[g][e] = pack_bf16x2(a0 + b.x + x.x, a1 + b.y + x.y);
                            } else {
                                v[g][e] = pack_bf16x2(a0, a1);
                                const float2 r = bf16x2_to_float2(v[g][e]);
                                rowdot[e & 1] = fmaf(r.y, x.y, fmaf(r.x, x.x, rowdot[e & 1]));
                            }
                        }
                        stmatrix_x4(mat_addr(p, jp), v[g][0], v[g][1], v[g][2], v[g][3]);
                    }
                    if constexpr (kWithGelu) {
                        // two consecutive jp's hold 4 consecutive 8-column chunks of the lane's rows g, g + 8: word
                        // (chunk 2 jp + (e >> 1), row half e & 1) = gw[jp - first][e]
#pragma unroll
                        for (int g2 = 0; g2 < kGroup / 2; ++g2)
#pragma unroll
                            for (int h = 0; h < 2; ++h) {
                                const uint32_t w[4] = {gw[2 * g2][h], gw[2 * g2][2 + h], gw[2 * g2 + 1][h],
                                                       gw[2 * g2 + 1][2 + h]};
                                const uint4 chunk = quad_transpose(w, t);
                                const int m = m0 + 64 * mi + 16 * warp + (lane >> 2) + 8 * h;
                                const int col = n0 + 16 * (4 * pc + j0 + 2 * g2) + 8 * t;
                                if (m < M) __stcs(reinterpret_cast<uint4*>(gelu_out + (size_t)m * N + col), chunk);
                            }
                    }
                }
                if constexpr (kEpi == Epi::HeadDot) {
                    if (hs == 64 || (pc & 1)) {  // the head's last panel: the quad's sums, lane t writes row t % 2
                        quad_sum(rowdot);
                        const int m = m0 + 64 * mi + 16 * warp + (lane >> 2) + 8 * (t & 1);
                        if (t < 2 && m < M) {
                            const int head = (n0 + 64 * pc) / hs, b = m / T;
                            dot[((size_t)b * (N / hs) + head) * T + (m - b * T)] = t ? rowdot[1] : rowdot[0];
                        }
                        rowdot[0] = rowdot[1] = 0.f;
                    }
                }
            }
            store_tile(m0, n0);
            if (is_dgelu(kEpi) && colsum) {
                // the warp's kBN / 4 columns: 8-column chunks kBN / 32 * warp + 0, 1, ... of the tile, four a round
                // r; lane (c, rg) = (lane % 4, lane / 4): chunk gc = kBN / 32 * warp + 4 r + c of rows 16 rg + i',
                // i' = i ^ 4 (rg & 1), stored at (gc % 8) ^ (i' & 7) of panel column gc / 8: within the lane's 16
                // rows, offset i' * 128 + 16 ((gc % 8) ^ (i' & 7)) is the lane's offset at i = 0 xor a constant. A
                // quarter-warp's 8 lanes (4 consecutive chunks, x4 = 0 and 4) read 8 different 16-byte bank groups.
                constexpr int kWarpChunks = kBN / 32;
                const int c = lane & 3, rg = lane >> 2, x4 = 4 * (rg & 1);
#pragma unroll 1  // (unrolled, the two rounds' 32 loads would be hoisted together: 128 registers)
                for (int r = 0; r < kWarpChunks; r += 4) {
                    const bool valid = r + c < kWarpChunks;  // 192: the second round's lanes c >= 2 repeat c - 2's
                    const int gc = kWarpChunks * warp + r + (valid ? c : c - 2);
                    const uint32_t rows_addr = smem_u32(ebuf) + (kPanels * (rg >> 2) + gc / 8) * kPanelBytes +
                                               16 * (rg & 3) * 128;
                    const uint32_t off0 = (x4 << 7) | (((gc % 8) ^ x4) << 4);
                    float s[8] = {};
#pragma unroll
                    for (int i = 0; i < 16; ++i) {
                        const uint4 v = ld_shared_u32x4(rows_addr + (off0 ^ (uint32_t)((i << 7) | ((i & 7) << 4))));
                        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                        for (int e = 0; e < 4; ++e) {  // bf16 pair e: columns 2e (low half), 2e + 1 of the chunk
                            s[2 * e] += __uint_as_float(w[e] << 16);
                            s[2 * e + 1] += __uint_as_float(w[e] & 0xffff0000u);
                        }
                    }
                    // the 8 row groups (lane bits 2-4): each step keeps the half of the columns that its lane bit
                    // selects and adds the partner's; lane (c, rg) ends with column rg of the chunk
#pragma unroll
                    for (int h = 4; h >= 1; h /= 2) {  // row-group bit h: lane bit 4, 3, 2
                        const bool up = (rg & h) != 0;
#pragma unroll
                        for (int k = 0; k < h; ++k) {
                            const float keep = up ? s[k + h] : s[k], give = up ? s[k] : s[k + h];
                            s[k] = keep + __shfl_xor_sync(FULL_MASK, give, 4 * h);
                        }
                    }
                    if (valid) colsum[(size_t)(m0 / kBM) * N + n0 + 8 * gc + rg] = s[0];
                }
                epi_sync();  // every warp's reads done before the next tile's pre lands in the panels
            }
        }
    }
    if (ctid == 0) bulk_wait<0>();  // the stores done before the CTA (and its shared memory) goes
    // the turn passed after this CTA's last tile goes to warpgroup (tile count) % 2: it takes it, so every
    // arrival is matched
    const int my_tiles = (num_units - cluster_id + clusters - 1) / clusters;
    if (cw == my_tiles % 2) {
        turn_wait();
        buffer_wait();  // likewise the last hand-over of the shared buffer
    }
    __syncwarp();
    if (cluster > 1) cluster_sync();  // the peer's last arrivals on this CTA's barriers are in
#endif
}

// (M, N) row-major bf16 in boxes of 64 columns x 64 rows: the epilogue's stores, and the backward's pre loads
CUtensorMap tile_map(const bf16* p, int M, int N) {
    const cuuint64_t dims[2] = {(cuuint64_t)N, (cuuint64_t)M};
    const cuuint64_t strides[1] = {(cuuint64_t)N * 2};
    const cuuint32_t box[2] = {64, 64};
    return tensor_map_bf16(p, 2, dims, strides, box);
}

// (rows, K) row-major bf16 (a, w) in boxes of 64 k x `box_rows` rows: the k-blocks of the producer's loads
CUtensorMap operand_map(const bf16* p, int rows, int K, int box_rows) {
    const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)K * 2};
    const cuuint32_t box[2] = {kBK, (cuuint32_t)box_rows};
    return tensor_map_bf16(p, 2, dims, strides, box);
}

EnvSwitch g_cluster("GPT2CU_SM90_CLUSTER", 2, 1);  // gemm_sm90_set_cluster: the CTAs of a cluster, 2 or 1

template <Epi kEpi, int kBN = 128>
void launch(bf16* out, const bf16* a, const bf16* w, bf16* pre, const bf16* bias, int M, int N, int K,
            cudaStream_t stream, float* colsum = nullptr, float* dot = nullptr, int T = 0, int hs = 0,
            const float* row_shift = nullptr, float* row_sums = nullptr, int valid_cols = 0, bf16* gelu_out = nullptr) {
    const auto kernel = gemm_sm90_kernel<kEpi, kBN>;
    constexpr int smem_bytes = Layout<kEpi, kBN>::kSmemBytes;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    const int tiles_m = ceil_div(M, kBM);
    const int cluster = g_cluster.get() == 2 && tiles_m % 2 == 0 ? 2 : 1;  // a unit's row tiles (kernel)
    const CUtensorMap tm_a = operand_map(a, M, K, kBM), tm_b = operand_map(w, N, K, kBN / cluster);
    const CUtensorMap tm_out = tile_map(out, M, N), tm_pre = tile_map(pre, M, N);
    const long long units = (long long)(tiles_m / cluster) * (N / kBN);
    require(units <= 0x7fffffffLL, "gemm_sm90: too many tiles");
    cudaLaunchConfig_t config = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    // the clusters that fit at once (every multiprocessor for 1; for 2, pairs within a GPC): one CTA each a
    // multiprocessor, persistent
    static int resident[3] = {};
    if (resident[cluster] == 0) {
        config.gridDim = dim3(cluster);
        CUDA_CHECK(cudaOccupancyMaxActiveClusters(&resident[cluster], kernel, &config));
        require(resident[cluster] > 0, "gemm_sm90: no cluster fits a multiprocessor");
    }
    config.gridDim = dim3((unsigned)(units < resident[cluster] ? units : resident[cluster]) * cluster);
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, tm_a, tm_b, tm_out, tm_pre, bias, gelu_out, colsum, dot, M, N, K,
                                  T, hs, row_shift, row_sums, valid_cols));
    CUDA_CHECK_LAUNCH();
}

// launch with tiles 192 columns wide where `wide` (gemm_sm90_tile_cols), else 128
template <Epi kEpi, typename... Args>
void launch_tiles(bool wide, Args... args) {
    if (wide)
        launch<kEpi, 192>(args...);
    else
        launch<kEpi, 128>(args...);
}

}  // namespace

int gemm_sm90_set_cluster(int size) {
    require(size == -1 || size == 1 || size == 2, "gemm_sm90_set_cluster: 1, 2, or -1 to ask");
    return g_cluster.set(size);
}

bool gemm_sm90_supported(int M, int N, int K, std::initializer_list<const void*> ptrs) {
    if (M < 1 || N < 1 || K < 1 || N % 128 != 0 || K % kBK != 0) return false;
    for (const void* p : ptrs)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    return true;
}

void gemm_gelu_forward_sm90(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
                            cudaStream_t stream) {
    require(gemm_sm90_supported(M, N, K, {out, pre, a, w, bias}), "gemm_gelu_forward_sm90: unsupported shape");
    launch_tiles<Epi::Gelu>(gemm_sm90_tile_cols(N) == 192, out, a, w, pre, bias, M, N, K, stream);
}

void gemm_dgelu_sm90(bf16* out, float* colsum_partials, const bf16* a, const bf16* w, const bf16* pre, int M, int N,
                     int K, cudaStream_t stream, bf16* gelu_out) {
    require(gemm_sm90_supported(M, N, K, {out, a, w, pre, gelu_out}) && gelu_out != out && gelu_out != pre,
            "gemm_dgelu_sm90: unsupported shape, or gelu_out aliasing out or pre");
    const bool wide = gemm_sm90_tile_cols(N) == 192;
    if (gelu_out)
        launch_tiles<Epi::DGeluGelu>(wide, out, a, w, const_cast<bf16*>(pre), nullptr, M, N, K, stream, colsum_partials,
                                     nullptr, 0, 0, nullptr, nullptr, 0, gelu_out);
    else
        launch_tiles<Epi::DGelu>(wide, out, a, w, const_cast<bf16*>(pre), nullptr, M, N, K, stream, colsum_partials);
}

void gemm_residual_forward_sm90(bf16* out, const bf16* a, const bf16* w, const bf16* bias, const bf16* residual,
                                int M, int N, int K, cudaStream_t stream) {
    require(gemm_sm90_supported(M, N, K, {out, a, w, bias, residual}), "gemm_residual_forward_sm90: unsupported shape");
    // 128-wide: at attproj's shape (N = 768) 192-wide tiles measured 2% slower (170.4 against 166.8 us, H200)
    launch<Epi::Residual>(out, a, w, const_cast<bf16*>(residual), bias, M, N, K, stream);
}

void gemm_head_dot_sm90(bf16* out, float* dot, const bf16* a, const bf16* w, const bf16* other, int M, int N, int K,
                        int T, int head_size, cudaStream_t stream) {
    require(gemm_sm90_supported(M, N, K, {out, a, w, other}) && (head_size == 64 || head_size == 128) &&
                T > 0 && M % T == 0 && dot != nullptr && reinterpret_cast<uintptr_t>(dot) % 4 == 0,
            "gemm_head_dot_sm90: unsupported shape");
    // (a 192-wide tile would split a head of 128)
    launch_tiles<Epi::HeadDot>(head_size == 64 && gemm_sm90_tile_cols(N) == 192, out, a, w, const_cast<bf16*>(other),
                               nullptr, M, N, K, stream, nullptr, dot, T, head_size);
}

void gemm_exp_sm90(bf16* out, float* row_sums, const bf16* a, const bf16* w, const float* row_shift, int M, int N, int K,
                   int valid_cols, cudaStream_t stream) {
    require(gemm_sm90_supported(M, N, K, {out, a, w}) && valid_cols >= 1 && valid_cols <= N && row_sums && row_shift,
            "gemm_exp_sm90: unsupported shape");
    launch_tiles<Epi::Exp>(gemm_sm90_tile_cols(N) == 192, out, a, w, out, nullptr, M, N, K, stream, nullptr, nullptr, 0,
                           0, row_shift, row_sums, valid_cols);
}
