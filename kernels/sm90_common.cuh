// sm90_common.cuh: the Hopper (sm_90a) primitives the kernels of attention_sm90.cu and gemm_sm90.cu are built
// from: mbarriers, the tensor memory accelerator (TMA, cp.async.bulk.tensor), wgmma fences/commits/waits,
// shared-memory matrix descriptors, register reallocation (setmaxnreg), named barriers; and, on the host, the
// tensor maps (tensor_map_bf16).
//
// Shared tiles: every tile is stored as "panels" of 64 bf16 columns (128 bytes a row, the TMA box's inner
// extent), rows consecutive at 128 bytes, with the 128-byte swizzle (16-byte chunk c of row r sits at
// chunk c ^ (r & 7)); each panel starts 1024-byte aligned. That is the canonical SWIZZLE_128B layout of
// wgmma in both majors:
//   K-major operand (rows = M or N, 64 k per panel): 8-row core groups 1024 bytes apart (SBO = 1024), LBO
//     unused; the k16 step kk inside a panel is +32 bytes on the start address.
//   MN-major operand (rows = k, 64 of M/N per panel): k groups of 8 rows 1024 bytes apart (SBO = 1024),
//     the next 64 columns of M/N one panel further (LBO = panel bytes); the k16 step is +16 rows = 2048 bytes.
#pragma once
#include <cstdint>
#include <cuda.h>  // CUtensorMap and its enums (types only: the driver entry point is fetched at run time)
#include <cuda_runtime.h>
#include <cstdio>
#include "common.cuh"

namespace sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier -----------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// make the initialisations visible to the async proxy (TMA) and the other threads
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// block until the phase of parity `parity` has completed (with GPT2CU_SM90_WATCHDOG defined, a wait of more
// than about 2^32 cycles prints the barrier and traps instead of hanging: for development builds)
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
#ifdef GPT2CU_SM90_WATCHDOG
    const long long t0 = clock64();
#endif
    do {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
#ifdef GPT2CU_SM90_WATCHDOG
        if (!done && clock64() - t0 > (1ll << 32)) {
            printf("mbar_wait timeout: block %d thread %d bar %u parity %u\n", blockIdx.x, threadIdx.x,
                   smem_u32(bar), parity);
            __trap();
        }
#endif
    } while (!done);
}

// ---- TMA ----------------------------------------------------------------------------------------------
// 2-D tile load (coordinates innermost first, in elements) completing on `bar` (complete_tx::bytes)
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
            "r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
        : "memory");
}
// the same with an L2 cache policy (l2_evict_first_policy: data read once)
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%3, "
        "%4}], [%2], %5;\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "l"(policy)
        : "memory");
}
// an L2 policy that evicts the lines it touches first (streamed data: kept from pushing out what is reused;
// tma_store_2d, tma_load_2d)
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}
// 3-D tile load (coordinates innermost first, in elements) completing on `bar` (complete_tx::bytes)
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
        "[%2];\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}
// 2-D tile store shared -> global (coordinates innermost first, in elements; the box's elements past the
// tensor's dims are not written) with an L2 cache policy, in a bulk group of this thread (bulk_commit /
// bulk_wait_read / bulk_wait below). The shared-memory writes it reads must be made visible to the async proxy
// first (fence_proxy_async).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int c0, int c1,
                                             uint64_t policy) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group.L2::cache_hint [%0, {%2, %3}], [%1], %4;\n" ::
                     "l"(reinterpret_cast<uint64_t>(map)),
                 "r"(smem_u32(src)), "r"(c0), "r"(c1), "l"(policy)
                 : "memory");
}
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- thread-block clusters ------------------------------------------------------------------------------
// this CTA's rank in its cluster, and the cluster's CTAs (1 in a launch without clusters)
__device__ __forceinline__ uint32_t cluster_ctarank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ uint32_t cluster_nctarank() {
    uint32_t n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
    return n;
}
// every thread of every CTA of the cluster (all of a warp's threads together), with release / acquire ordering
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// an arrival on the mbarrier at bar's shared-memory offset in CTA `cta` of the cluster (this one's own included)
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
    asm volatile(
        "{\n.reg .b32 remote;\n"
        "mapa.shared::cluster.u32 remote, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_u32(bar)),
        "r"(cta)
        : "memory");
}
// tma_load_2d into every CTA of `cta_mask` (bit r: rank r), at dst's offset in each, completing on the mbarrier
// at bar's offset in each
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                                      int c1, uint16_t cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
        "{%3, %4}], [%2], %5;\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "h"(cta_mask)
        : "memory");
}

// ---- wgmma bookkeeping ---------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// keep the compiler from moving accumulator reads/writes across a wgmma wait (registers, not memory)
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// the same for a copy: `to` holds r's values as read here, r itself is not redefined (a redefinition of a wgmma
// accumulator while other wgmma products are in flight makes ptxas serialize them all: C7515)
template <int N>
__device__ __forceinline__ void reg_copy(float (&to)[N], const float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("mov.b32 %0, %1;" : "=f"(to[i]) : "f"(r[i]) : "memory");
}

// shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63)
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    uint64_t d = 0;
    d |= (uint64_t)((saddr & 0x3FFFF) >> 4);
    d |= (uint64_t)((lbo_bytes >> 4) & 0x3FFF) << 16;
    d |= (uint64_t)((sbo_bytes >> 4) & 0x3FFF) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

// ---- warp specialisation ----------------------------------------------------------------------------------
// threadIdx.x / 128 broadcast from lane 0: the same value, but one the compiler knows is warp-uniform. With the
// plain quotient, branches on the warpgroup (a consumer skipping a masked tile) count as divergent and ptxas
// serialises every wgmma behind its own warpgroup.arrive (warning C7520; seen in the backward kernels' SASS:
// one WARPGROUP.DEPBAR per HGMMA).
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0); }

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// barrier `id` (1..15; 0 is __syncthreads) among `count` threads
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// arrive on barrier `id` without waiting (the matching bar.sync of other threads completes with it)
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- shared-memory accesses by 32-bit address (the aligned dynamic-shared base is an integer cast, so the compiler
// would emit generic 64-bit accesses) --------------------------------------------------------------------------
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_f32x4(uint32_t addr, float a, float b, float c, float d) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_u32x4(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr)
                 : "memory");
    return v;
}
__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ float4 ld_shared_f32x4(uint32_t addr) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}

// four 8x8 bf16 matrices in the mma fragment layout (lane l: row l / 4, columns 2 (l % 4), +1 in one 32-bit
// register) into shared memory (stmatrix) or out of it (ldmatrix); lanes 8i..8i+7 give the addresses of the 8
// rows (16 bytes each) of matrix i, register i is matrix i's
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// Within a quad of lanes: lane t holds word t of four 16-byte chunks (w[k]: chunk k); returns chunk t, its words
// in order. Two exchanges of two words (lane t ^ 1, then t ^ 2), so every lane sends and receives 4 words.
__device__ __forceinline__ uint4 quad_transpose(const uint32_t (&w)[4], int t) {
    const bool odd = t & 1, high = t & 2;
    // keep the chunks of parity t & 1: a = chunk (t & 1), b = chunk (t & 1) + 2, words t & 2 and (t & 2) + 1
    const uint32_t ra = __shfl_xor_sync(0xffffffffu, odd ? w[0] : w[1], 1);
    const uint32_t rb = __shfl_xor_sync(0xffffffffu, odd ? w[2] : w[3], 1);
    const uint32_t a0 = odd ? ra : w[0], a1 = odd ? w[1] : ra;
    const uint32_t b0 = odd ? rb : w[2], b1 = odd ? w[3] : rb;
    // keep chunk t (a if t < 2, else b); the partner sends its other half
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, high ? a0 : b0, 2);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, high ? a1 : b1, 2);
    return high ? make_uint4(r0, r1, b0, b1) : make_uint4(a0, a1, r0, r1);
}

// ---- bulk copies shared <-> global (cp.async.bulk, non-tensor) and the flags that order them across CTAs ----
// `bytes` contiguous bytes (a multiple of 16, both addresses 16-byte aligned), in a bulk group of this thread
__device__ __forceinline__ void bulk_store(void* gdst, const void* ssrc, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gdst), "r"(smem_u32(ssrc)),
                 "r"(bytes)
                 : "memory");
}
// and global -> shared, completing on `bar` (complete_tx::bytes, as the TMA loads); a global source written by
// another CTA's bulk copies needs that CTA's release, this thread's acquire and fence_proxy_async_global first
__device__ __forceinline__ void bulk_load(void* sdst, const void* gsrc, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(smem_u32(sdst)), "l"(gsrc), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}
// gdst[i] += ssrc[i] (fp32), each element atomically (no order among concurrent adders)
__device__ __forceinline__ void bulk_reduce_add_f32(float* gdst, const float* ssrc, uint32_t bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gdst),
                 "r"(smem_u32(ssrc)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// all but the newest N bulk groups of this thread complete (their global writes performed)
template <int N>
__device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// all but the newest N bulk groups of this thread done reading their shared-memory source
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// order this thread's global accesses across the generic and async proxies (bulk copies)
__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_u32(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// spin until *p == v (acquire; with GPT2CU_SM90_WATCHDOG, as mbar_wait: a trap instead of a hang)
__device__ __forceinline__ void wait_count(const uint32_t* p, uint32_t v) {
#ifdef GPT2CU_SM90_WATCHDOG
    const long long t0 = clock64();
#endif
    while (ld_acquire_u32(p) != v) {
#ifdef GPT2CU_SM90_WATCHDOG
        if (clock64() - t0 > (1ll << 32)) {
            printf("wait_count timeout: block %d thread %d count %u, waiting for %u\n", blockIdx.x, threadIdx.x,
                   ld_acquire_u32(p), v);
            __trap();
        }
#endif
    }
}
__device__ __forceinline__ void red_release_add_u32(uint32_t* p, uint32_t v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// ---- host: tensor maps -------------------------------------------------------------------------------------
// cuTensorMapEncodeTiled, fetched from the driver at run time (no link against libcuda)
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled_fn() {
    static EncodeTiledFn fn = nullptr;
    if (!fn) {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult q;
        CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
        require(q == cudaDriverEntryPointSuccess && p != nullptr, "sm90: cuTensorMapEncodeTiled not found");
        fn = reinterpret_cast<EncodeTiledFn>(p);
    }
    return fn;
}

// A bf16 tensor of `rank` dimensions (dims innermost first; strides in bytes of dimensions 1..rank-1) read in
// boxes of box[] elements with the 128-byte swizzle (box[0] = 64: one panel row); elements past the dims read
// as zeros.
inline CUtensorMap tensor_map_bf16(const void* base, int rank, const cuuint64_t* dims, const cuuint64_t* strides,
                                   const cuuint32_t* box) {
    CUtensorMap map;
    const cuuint32_t estr[3] = {1, 1, 1};
    const CUresult r = encode_tiled_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, (cuuint32_t)rank,
                                         const_cast<void*>(base), dims, strides, box, estr,
                                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    require(r == CUDA_SUCCESS, "sm90: cuTensorMapEncodeTiled failed");
    return map;
}

}  // namespace sm90
