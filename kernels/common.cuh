// Header-only helpers shared by every kernels/*.cu: error checks, 16-byte vector access, warp/block
// reductions, the row-per-warp helpers of the norms, the elementwise grid driver, and the deterministic
// column-sum finisher.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include "kernels.h"

// ---- host-side checks ---------------------------------------------------------------------------

inline void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": CUDA error: " +
                                 cudaGetErrorString(err));
}
#define CUDA_CHECK(call) cuda_check((call), __FILE__, __LINE__)
// after every <<<...>>>: reports a bad launch configuration (or an earlier asynchronous error)
#define CUDA_CHECK_LAUNCH() cuda_check(cudaGetLastError(), __FILE__, __LINE__)

// bad sizes, too-small scratch, unsupported shapes
inline void require(bool cond, const char* msg) {
    if (!cond) throw std::runtime_error(std::string("gpt2cu kernels: ") + msg);
}

template <class T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

inline int device_sm_count() {
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

// ---- vectors ------------------------------------------------------------------------------------
// Vec<T, N>: N consecutive elements moved as one access; 16-byte alignment at most (8 floats = two
// 128-bit accesses). x128 is the 16-byte vector of 8 bf16 every bf16 kernel streams with.

template <class T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
    T v[N];
    __device__ __forceinline__ T& operator[](int i) { return v[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};
using x128 = Vec<bf16, 8>;

template <int N, class T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, class T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
    *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// register type of one streaming access of `Bytes` (a Vec of more than 16 bytes takes several)
template <int Bytes> struct Chunk;
template <> struct Chunk<2> { using type = unsigned short; };
template <> struct Chunk<4> { using type = unsigned int; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<16> { using type = uint4; };

// streaming ("cache-streaming", evict-first) variants for data touched once
template <int N, class T>
__device__ __forceinline__ Vec<T, N> load_vec_cs(const T* p) {
    constexpr int bytes = sizeof(Vec<T, N>), step = bytes < 16 ? bytes : 16;
    using C = typename Chunk<step>::type;
    Vec<T, N> x;
#pragma unroll
    for (int k = 0; k < bytes / step; k++) reinterpret_cast<C*>(&x)[k] = __ldcs(reinterpret_cast<const C*>(p) + k);
    return x;
}
template <int N, class T>
__device__ __forceinline__ void store_vec_cs(T* p, const Vec<T, N>& x) {
    constexpr int bytes = sizeof(Vec<T, N>), step = bytes < 16 ? bytes : 16;
    using C = typename Chunk<step>::type;
#pragma unroll
    for (int k = 0; k < bytes / step; k++) __stcs(reinterpret_cast<C*>(p) + k, reinterpret_cast<const C*>(&x)[k]);
}

__device__ __forceinline__ x128 load128(const bf16* p) { return load_vec<8>(p); }
__device__ __forceinline__ x128 load128cs(const bf16* p) { return load_vec_cs<8>(p); }
__device__ __forceinline__ void store128(bf16* p, const x128& x) { store_vec<8>(p, x); }
__device__ __forceinline__ void store128cs(bf16* p, const x128& x) { store_vec_cs<8>(p, x); }

// ---- asynchronous copies global -> shared (sm_80+) ---------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared, bypassing L1; valid == false writes 16 zero bytes (src-size 0
// reads nothing).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid = true) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// waits until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- scalar helpers of the attention kernels (attention.cu, attention_sm90.cu) ---------------------
// 2^x on the special-function unit; 2^-inf = +0, which the causal masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// two floats rounded to bf16, lo in the low 16 bits (the lower column / k index, as mma, wgmma and
// ldmatrix fragments hold them)
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The packed qkv row of the attention kernels: [q: NH heads | k: NKV heads | v: NKV heads], HS elements a
// head; query head h reads key/value head h / (NH / NKV). Element offsets within a row:
struct QkvLayout {
    int NH, NKV, HS;
    __host__ __device__ int row_stride() const { return (NH + 2 * NKV) * HS; }
    __host__ __device__ int q(int h) const { return h * HS; }
    __host__ __device__ int k(int kh) const { return (NH + kh) * HS; }
    __host__ __device__ int v(int kh) const { return (NH + NKV + kh) * HS; }
    __host__ __device__ int kv_head(int h) const { return h / (NH / NKV); }
};

// ---- reductions ---------------------------------------------------------------------------------
// xor butterflies: every lane ends with the same, bitwise identical value (fp add is commutative).

constexpr unsigned FULL_MASK = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum (or max) over the block (blockDim.x a multiple of 32); every thread gets the result. Fixed order.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v) {
    __shared__ float partials[32];
    __shared__ float result;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const float r = lane < warps ? partials[lane] : (MAX ? -INFINITY : 0.0f);
        const float total = MAX ? warp_max(r) : warp_sum(r);
        if (lane == 0) result = total;
    }
    __syncthreads();
    return result;
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// ---- one warp per row --------------------------------------------------------------------------
// The normalization kernels (layernorm.cu, rmsnorm.cu) give each row of C channels to one warp and keep it
// in registers: lane l holds the 8-channel vectors l, l+32, ..., VPL = ceil(C/256) of them, a template
// parameter. C must be a multiple of 8 and at most 8 * 32 * ROW_MAX_VPL = 2048.

constexpr int ROW_MAX_VPL = 8;

// A row launcher's checks, the error naming the kernel family: N >= 0, a C the row kernels take, and
// 16-byte aligned tensors (null ones, absent options, skipped). Returns VPL for C.
inline int check_rows(int N, int C, const char* family, std::initializer_list<const void*> tensors) {
    auto fail = [family](const std::string& what) {
        throw std::runtime_error(std::string("gpt2cu kernels: ") + family + ": " + what);
    };
    if (N < 0) fail("negative N");
    if (C <= 0 || C % 8 != 0 || C > 8 * 32 * ROW_MAX_VPL)
        fail("C must be a positive multiple of 8 and at most 2048, got " + std::to_string(C));
    for (const void* p : tensors)
        if (reinterpret_cast<uintptr_t>(p) % 16) fail("bf16 tensors must be 16-byte aligned");
    return ceil_div(C / 8, 32);
}

// f(std::integral_constant<int, vpl>()) for a vpl from check_rows
template <int VPL = 1, class F>
inline void dispatch_row_vectors(int vpl, F&& f) {
    if constexpr (VPL < ROW_MAX_VPL) {
        if (vpl != VPL) return dispatch_row_vectors<VPL + 1>(vpl, f);
    }
    f(std::integral_constant<int, VPL>());
}

// This lane's vectors of the row at element offset `off` into x.
template <int VPL>
__device__ __forceinline__ void load_row(x128 (&x)[VPL], const bf16* __restrict__ inp, size_t off, int lane,
                                         int vecs) {
#pragma unroll
    for (int j = 0; j < VPL; j++)
        if (lane + 32 * j < vecs) x[j] = load128cs(inp + off + (lane + 32 * j) * 8);
}

// sum over the row of f(x) for the lane's vectors x from load_row; every lane gets the same value
template <int VPL, class F>
__device__ __forceinline__ float row_sum(const x128 (&x)[VPL], int lane, int vecs, F&& f) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < VPL; j++)
        if (lane + 32 * j < vecs) {
#pragma unroll
            for (int k = 0; k < 8; k++) s += f((float)x[j][k]);
        }
    return warp_sum(s);
}

// ---- elementwise driver -------------------------------------------------------------------------
// [0, n) = a scalar head of `head` elements (until every pointer reaches a 16-byte boundary), V-wide
// vectors, and a scalar tail. op(i, Width<W>()) handles elements i..i+W-1; the grid strides.

template <int W> struct Width { static constexpr int value = W; };

template <int V, class Op>
__device__ __forceinline__ void for_each_vector(size_t n, size_t head, Op&& op) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const size_t nvec = (n - head) / V;
#pragma unroll 4
    for (size_t k = tid; k < nvec; k += stride) op(head + k * V, Width<V>());
    if (V > 1) {
        const size_t rest = n - nvec * V;  // head + tail, fewer than 2V
        for (size_t k = tid; k < rest; k += stride) op(k < head ? k : k + nvec * V, Width<1>());
    }
}

// Host: the scalar head that aligns every (non-null) pointer to 16 bytes at once, or -1 when no head
// does (then the caller uses V = 1). All pointers index the same element range.
template <class... P>
inline long long vector_head(size_t n, const P*... ptrs) {
    long long head = -1;
    bool ok = true;
    auto visit = [&](const void* p, size_t elem) {
        if (!p) return;
        const uintptr_t a = reinterpret_cast<uintptr_t>(p);
        if (head < 0) {
            if (a % elem) { ok = false; return; }
            head = (long long)(((16 - a % 16) % 16) / elem);
        }
        if ((a + head * elem) % 16) ok = false;
    };
    (visit(ptrs, sizeof(P)), ...);
    if (!ok || head < 0) return -1;
    return head < (long long)n ? head : (long long)n;
}

// blocks for an elementwise kernel over n elements, V per thread (the kernels grid-stride past this)
inline unsigned elementwise_blocks(size_t n, int V, int threads) {
    const size_t blocks = ceil_div(ceil_div(n, (size_t)V), (size_t)threads);
    return (unsigned)(blocks < 1 ? 1 : blocks > (1u << 20) ? (1u << 20) : blocks);
}

// ---- deterministic column sums ------------------------------------------------------------------
// out[j] += sum over p < rows of partials[p * width + j] (fp32, fixed order), columns j < split go to
// out0[j], the rest to out1[j - split] (summing rows_hi partial rows instead, where given: >= 0). Block (32, 32):
// 32 columns, 32 strided row sets, then the 32 per-set sums are added in order. Used to finish
// layernorm_backward, bias_backward and the attention backward's qkv bias gradient.

constexpr int COLSUM_TILE = 32;

template <class T>
__global__ void __launch_bounds__(COLSUM_TILE * COLSUM_TILE)
    column_sum_add_kernel(T* out0, T* out1, int split, const float* __restrict__ partials, int rows, int width,
                          int rows_hi) {
    __shared__ float sums[COLSUM_TILE][COLSUM_TILE + 1];
    const int j = blockIdx.x * COLSUM_TILE + threadIdx.x;
    if (j >= split && rows_hi >= 0) rows = rows_hi;
    float s = 0.0f;
    if (j < width) {
#pragma unroll 8
        for (int p = threadIdx.y; p < rows; p += COLSUM_TILE) s += partials[(size_t)p * width + j];
    }
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < width) {
        float total = 0.0f;
#pragma unroll
        for (int k = 0; k < COLSUM_TILE; k++) total += sums[k][threadIdx.x];
        T* out = j < split ? out0 + j : out1 + (j - split);
        *out = (T)((float)*out + total);
    }
}

template <class T>
inline void column_sum_add(T* out0, T* out1, int split, const float* partials, int rows, int width,
                           cudaStream_t stream, int rows_hi = -1) {
    column_sum_add_kernel<T><<<ceil_div(width, COLSUM_TILE), dim3(COLSUM_TILE, COLSUM_TILE), 0, stream>>>(
        out0, out1, split, partials, rows, width, rows_hi);
    CUDA_CHECK_LAUNCH();
}
