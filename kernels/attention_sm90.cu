// attention_sm90.cu: causal flash attention for Hopper (sm_90a): wgmma tensor-core products fed by TMA.
// Same contract as attention.cu (read its header for the math and the layouts): qkv (B, T, 3C) = [q|k|v],
// out (B, T, C), lse (B, NH, T) fp32 natural log, scale 1/sqrt(HS); head sizes 64 and 128; any T.
// Built only for sm_90a (CMake compiles this file with -gencode=arch=compute_90a,code=sm_90a when 90 is
// among the architectures); attention.cu dispatches here on compute capability 9.x.
//
// ---- Forward --------------------------------------------------------------------------------------------
// One CTA per (128-query block, head, batch), 3 warpgroups (384 threads), warp-specialised:
//   warpgroup 0, the producer: gives up registers (setmaxnreg 24); one thread issues the TMA loads: the Q
//     block once, then K and V tiles of 128 keys from the diagonal tile down to tile 0, into a ring of
//     kStages shared-memory stages. Each stage has a "full" mbarrier per tensor (K, V; completed by the
//     copy engine's byte count) and an "empty" mbarrier (the 256 consumer threads arrive when done with
//     the stage).
//   warpgroups 1, 2, the consumers (setmaxnreg 240): each owns 64 of the 128 query rows. Per key tile:
//     S = Q K^T by wgmma m64n128k16 from shared memory (Q and K both K-major), online softmax on the
//     accumulators in registers (exp2 with the scale folded in, row max over the 4 lanes of a quad),
//     P converted in registers to the A fragments of the second product O += P V (wgmma with A from
//     registers, V as an MN-major B operand: no transpose needed anywhere). The mask is evaluated on the
//     diagonal tile only (the first one processed). In the overlapped variant (kOverlap) the product
//     S_{i+1} = Q K_{i+1}^T is issued before O += P_i V_i, and the softmax of S_{i+1} runs while the tensor
//     cores do P_i V_i (FlashAttention-3's intra-warpgroup overlap); the two consumer warpgroups also
//     interleave with each other.
//   Rows past T: TMA zero-fills them on load; their outputs are never stored; the causal mask removes
//   keys >= T from every real row.
#include "kernels.h"
#include "common.cuh"
#include "attention_sm90.h"
#include "sm90_common.cuh"
#include "wgmma_sm90.cuh"

#include <cmath>
#include <cstdint>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPT2CU_SM90A_DEVICE 1
#endif

namespace {

using namespace sm90;

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPanelCols = 64;     // bf16 columns per 128-byte swizzled panel
constexpr int kPanelRowBytes = 128;

template <int HS>
struct FwdCfg {
    static constexpr int kBM = 128;                // query rows per CTA (2 consumer warpgroups x 64)
    static constexpr int kBN = 128;                // keys per tile
    static constexpr int kStages = HS == 64 ? 3 : 2;
    static constexpr int kPanels = HS / kPanelCols;
    static constexpr int kQBytes = kBM * HS * 2;
    static constexpr int kTileBytes = kBN * HS * 2;  // one K or V tile
    static constexpr int kQPanelBytes = kBM * kPanelRowBytes;
    static constexpr int kKPanelBytes = kBN * kPanelRowBytes;
    static constexpr int kBarOffset = kQBytes + 2 * kStages * kTileBytes;
    static constexpr int kNumBars = 1 + 3 * kStages;
    static constexpr int kSmemBytes = kBarOffset + 8 * kNumBars + 1024;  // + slack to align the base to 1024
    static constexpr int kThreads = 384;
};

// the m64nN accumulator: float d[N/2]; d[4j + e]: row (16 warp + g + 8 (e >> 1)), column 8j + 2t + (e & 1)

template <int HS, bool kOverlap>
__global__ void __launch_bounds__(384, 1)
    attention_forward_sm90_kernel(const __grid_constant__ CUtensorMap tm_qkv, bf16* __restrict__ out,
                                  float* __restrict__ lse, int T, int NH, int num_bh, int num_qblocks,
                                  float scale_log2) {
#ifdef GPT2CU_SM90A_DEVICE
    using Cfg = FwdCfg<HS>;
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

    const int tid = threadIdx.x;
    const int wg = tid / 128;
    const int bh = blockIdx.x % num_bh;
    const int qb = num_qblocks - 1 - (int)(blockIdx.x / num_bh);  // heaviest (last) query blocks first
    const int b = bh / NH, h = bh % NH;
    const int C = NH * HS;
    const int n_tiles = (qb * kBM + kBM - 1) / kBN + 1;  // key tiles 0 .. n_tiles-1 (kBM == kBN: qb + 1)

    if (tid == 0) {
        tma_prefetch_desc(&tm_qkv);
        mbar_init(q_full, 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&k_full[s], 1);
            mbar_init(&v_full[s], 1);
            mbar_init(&empty[s], 256);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---------------- producer ----------------
        setmaxnreg_dec<24>();
        if (tid == 0) {
            mbar_arrive_expect_tx(q_full, Cfg::kQBytes);
#pragma unroll
            for (int p = 0; p < kPanels; ++p)
                tma_load_3d(sQ + p * Cfg::kQPanelBytes, &tm_qkv, q_full, h * HS + p * kPanelCols, qb * kBM, b);
            for (int i = 0; i < n_tiles; ++i) {
                const int n = n_tiles - 1 - i;
                const int st = i % kStages;
                if (i >= kStages) mbar_wait(&empty[st], ((i / kStages) - 1) & 1);
                mbar_arrive_expect_tx(&k_full[st], Cfg::kTileBytes);
#pragma unroll
                for (int p = 0; p < kPanels; ++p)
                    tma_load_3d(sK + st * Cfg::kTileBytes + p * Cfg::kKPanelBytes, &tm_qkv, &k_full[st],
                                C + h * HS + p * kPanelCols, n * kBN, b);
                mbar_arrive_expect_tx(&v_full[st], Cfg::kTileBytes);
#pragma unroll
                for (int p = 0; p < kPanels; ++p)
                    tma_load_3d(sV + st * Cfg::kTileBytes + p * Cfg::kKPanelBytes, &tm_qkv, &v_full[st],
                                2 * C + h * HS + p * kPanelCols, n * kBN, b);
            }
        }
        return;
    }

    // ---------------- consumers ----------------
    setmaxnreg_inc<240>();
    const int cw = wg - 1;                    // consumer warpgroup 0/1: query rows 64 cw .. 64 cw + 63
    const int ctid = tid - 128 * wg;
    const int warp = ctid / 32, lane = ctid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int lrow0 = 64 * cw + 16 * warp + g;  // local rows lrow0 and lrow0 + 8 of the 128-row block

    // descriptors (addresses change per stage / k-step; the constant fields are folded in once)
    const uint32_t q_addr = smem_u32(sQ) + cw * 64 * kPanelRowBytes;
    const uint32_t k_addr = smem_u32(sK);
    const uint32_t v_addr = smem_u32(sV);
    auto desc_q = [&](int kk) {  // A: rows 64cw.., k 16kk..
        return make_desc(q_addr + (kk / 4) * Cfg::kQPanelBytes + (kk % 4) * 32, 16, 1024);
    };
    auto desc_k = [&](int st, int kk) {  // B (K-major): keys 0..127, k 16kk..
        return make_desc(k_addr + st * Cfg::kTileBytes + (kk / 4) * Cfg::kKPanelBytes + (kk % 4) * 32, 16, 1024);
    };
    auto desc_v = [&](int st, int kk) {  // B (MN-major): keys 16kk.., all HS columns (panels LBO apart)
        return make_desc(v_addr + st * Cfg::kTileBytes + kk * 16 * kPanelRowBytes, Cfg::kKPanelBytes, 1024);
    };

    float o[HS / 2];
    float s[kBN / 2];
    uint32_t pa[kBN / 16][4];
    float m0 = -INFINITY, m1 = -INFINITY;  // running row maxima (of S * scale * log2 e)
    float l0 = 0.f, l1 = 0.f;              // per-thread partial row sums

    auto issue_s = [&](int st) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HS / 16; ++kk) wgmma_ss_n128<0, 0>(s, desc_q(kk), desc_k(st, kk), kk > 0);
        wgmma_commit();
    };
    auto issue_pv = [&](int st, bool accumulate) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            if constexpr (HS == 64)
                wgmma_rs_n64<1>(o, pa[kk], desc_v(st, kk), accumulate || kk > 0);
            else
                wgmma_rs_n128<1>(o, pa[kk], desc_v(st, kk), accumulate || kk > 0);
        }
        wgmma_commit();
    };
    // softmax of s in place (s becomes P in fp32); returns the rescale factors of the old accumulators
    auto softmax = [&](bool diag, int key0, float& c0, float& c1) {
        if (diag) {
            const int r0 = qb * kBM + lrow0;
#pragma unroll
            for (int j = 0; j < kBN / 8; ++j)
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
        for (int j = 0; j < kBN / 8; ++j) {
            r0max = fmaxf(r0max, fmaxf(s[4 * j], s[4 * j + 1]));
            r1max = fmaxf(r1max, fmaxf(s[4 * j + 2], s[4 * j + 3]));
        }
        r0max = fmaxf(r0max, __shfl_xor_sync(0xffffffff, r0max, 1));
        r0max = fmaxf(r0max, __shfl_xor_sync(0xffffffff, r0max, 2));
        r1max = fmaxf(r1max, __shfl_xor_sync(0xffffffff, r1max, 1));
        r1max = fmaxf(r1max, __shfl_xor_sync(0xffffffff, r1max, 2));
        const float n0 = fmaxf(mx0, r0max * scale_log2), n1 = fmaxf(mx1, r1max * scale_log2);
        c0 = ex2(mx0 - n0);  // 2^-inf = 0 on the first tile
        c1 = ex2(mx1 - n1);
        m0 = n0;
        m1 = n1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
            s[4 * j + 0] = ex2(fmaf(s[4 * j + 0], scale_log2, -n0));
            s[4 * j + 1] = ex2(fmaf(s[4 * j + 1], scale_log2, -n0));
            s[4 * j + 2] = ex2(fmaf(s[4 * j + 2], scale_log2, -n1));
            s[4 * j + 3] = ex2(fmaf(s[4 * j + 3], scale_log2, -n1));
            sum0 += s[4 * j] + s[4 * j + 1];
            sum1 += s[4 * j + 2] + s[4 * j + 3];
        }
        l0 = l0 * c0 + sum0;
        l1 = l1 * c1 + sum1;
    };
    auto to_p = [&]() {
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            pa[kk][0] = pack_bf16x2(s[8 * kk + 0], s[8 * kk + 1]);
            pa[kk][1] = pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    auto rescale_o = [&](float c0, float c1) {
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

    mbar_wait(q_full, 0);

    if constexpr (!kOverlap) {
        for (int i = 0; i < n_tiles; ++i) {
            const int n = n_tiles - 1 - i;
            const int st = i % kStages;
            const uint32_t ph = (i / kStages) & 1;
            mbar_wait(&k_full[st], ph);
            issue_s(st);
            wgmma_wait<0>();
            reg_fence(s);
            float c0, c1;
            softmax(i == 0, n * kBN, c0, c1);
            to_p();
            if (i > 0) rescale_o(c0, c1);
            mbar_wait(&v_full[st], ph);
            issue_pv(st, i > 0);
            wgmma_wait<0>();
            reg_fence(o);
            mbar_arrive(&empty[st]);
        }
    } else {
        // tile 0 (the diagonal): S, softmax, P
        {
            mbar_wait(&k_full[0], 0);
            issue_s(0);
            wgmma_wait<0>();
            reg_fence(s);
            float c0, c1;
            softmax(true, (n_tiles - 1) * kBN, c0, c1);
            to_p();
        }
        for (int i = 1; i < n_tiles; ++i) {
            const int n = n_tiles - 1 - i;
            const int st = i % kStages, pst = (i - 1) % kStages;
            const uint32_t ph = (i / kStages) & 1, pph = ((i - 1) / kStages) & 1;
            mbar_wait(&k_full[st], ph);
            issue_s(st);                   // S_i = Q K_i^T
            mbar_wait(&v_full[pst], pph);
            issue_pv(pst, i > 1);          // O += P_{i-1} V_{i-1}
            wgmma_wait<1>();               // S_i done (P V may still run)
            reg_fence(s);
            float c0, c1;
            softmax(false, n * kBN, c0, c1);  // overlaps the P V product
            wgmma_wait<0>();
            reg_fence(o);
            mbar_arrive(&empty[pst]);
            to_p();
            rescale_o(c0, c1);
        }
        {
            const int pst = (n_tiles - 1) % kStages;
            const uint32_t pph = ((n_tiles - 1) / kStages) & 1;
            mbar_wait(&v_full[pst], pph);
            issue_pv(pst, n_tiles > 1);
            wgmma_wait<0>();
            reg_fence(o);
            mbar_arrive(&empty[pst]);
        }
    }

    // ---------------- epilogue: O / l, lse ----------------
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    const int row0 = qb * kBM + lrow0, row1 = row0 + 8;
    bf16* out0 = out + ((size_t)b * T + row0) * C + h * HS;
    bf16* out1 = out0 + (size_t)8 * C;
#pragma unroll
    for (int j = 0; j < HS / 8; ++j) {
        const int col = 8 * j + 2 * t;
        if (row0 < T)
            *reinterpret_cast<uint32_t*>(out0 + col) = pack_bf16x2(o[4 * j] * inv0, o[4 * j + 1] * inv0);
        if (row1 < T)
            *reinterpret_cast<uint32_t*>(out1 + col) = pack_bf16x2(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
    }
    if (t == 0) {
        float* lse_bh = lse + (size_t)bh * T;
        if (row0 < T) lse_bh[row0] = m0 * kLn2 + logf(l0);
        if (row1 < T) lse_bh[row1] = m1 * kLn2 + logf(l1);
    }
#endif
}

// ---- host side ----------------------------------------------------------------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn get_encode_fn() {
    static EncodeTiledFn fn = nullptr;
    if (!fn) {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult q;
        CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
        require(q == cudaDriverEntryPointSuccess && p != nullptr, "attention_sm90: cuTensorMapEncodeTiled not found");
        fn = reinterpret_cast<EncodeTiledFn>(p);
    }
    return fn;
}

// A (B, T, cols) bf16 tensor (row stride cols) seen as 3-D {cols, T, B}; box {64, box_rows, 1}, 128-byte
// swizzle; rows past T read as zeros.
CUtensorMap make_map_3d(const bf16* base, int cols, int T, int B, int box_rows) {
    CUtensorMap map;
    const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)T, (cuuint64_t)B};
    const cuuint64_t strides[2] = {(cuuint64_t)cols * 2, (cuuint64_t)cols * 2 * (cuuint64_t)T};
    const cuuint32_t box[3] = {(cuuint32_t)kPanelCols, (cuuint32_t)box_rows, 1};
    const cuuint32_t estr[3] = {1, 1, 1};
    const CUresult r = get_encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(base), dims,
                                       strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                       CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    require(r == CUDA_SUCCESS, "attention_sm90: cuTensorMapEncodeTiled failed");
    return map;
}

template <int HS, bool kOverlap>
void launch_forward_sm90(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, cudaStream_t stream) {
    using Cfg = FwdCfg<HS>;
    auto kernel = attention_forward_sm90_kernel<HS, kOverlap>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    const CUtensorMap map = make_map_3d(qkv, 3 * NH * HS, T, B, Cfg::kBN);
    const int num_bh = B * NH;
    const int num_qblocks = ceil_div(T, Cfg::kBM);
    const long long grid = (long long)num_bh * num_qblocks;
    require(grid <= 0x7fffffffLL, "attention_sm90: grid too large");
    const float scale_log2 = (float)(1.0 / std::sqrt((double)HS) * 1.4426950408889634);
    kernel<<<(unsigned)grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(map, out, lse, T, NH, num_bh, num_qblocks,
                                                                      scale_log2);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

bool attention_sm90_supported(int B, int T, int NH, int HS) {
    (void)B;
    (void)T;
    (void)NH;
    return HS == 64 || HS == 128;
}

void attention_forward_sm90(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, int HS,
                            cudaStream_t stream, int variant) {
    require(HS == 64 || HS == 128, "attention_forward_sm90: head size must be 64 or 128");
    const bool overlap = variant != 1;
    if (HS == 64) {
        if (overlap)
            launch_forward_sm90<64, true>(out, lse, qkv, B, T, NH, stream);
        else
            launch_forward_sm90<64, false>(out, lse, qkv, B, T, NH, stream);
    } else {
        if (overlap)
            launch_forward_sm90<128, true>(out, lse, qkv, B, T, NH, stream);
        else
            launch_forward_sm90<128, false>(out, lse, qkv, B, T, NH, stream);
    }
}
