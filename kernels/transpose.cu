// out (cols, rows) = inp (rows, cols)^T, bf16 (any 16-bit elements: the bits are moved, not converted).
// Used by matmul.cu on Hopper to give gemm_sm90.cu's backward GEMM its weight K-major.
// A block moves one 64 x 64 tile through shared memory: rows read along inp's rows, written along out's. With
// rows and cols multiples of 8 and both pointers 16-byte aligned every global access is 16 bytes (8 elements),
// else 2 bytes (any size, any offset). The shared tile's rows are 66 elements (33 words) apart, so neither the
// row-wise writes nor the column-wise reads of a warp meet in a bank (the mappings below).
#include "common.cuh"

#include <cstdint>

constexpr int TR_TILE = 64, TR_PITCH = TR_TILE + 2, TR_THREADS = 256;

template <int V>
__global__ void __launch_bounds__(TR_THREADS)
    transpose_kernel(uint16_t* __restrict__ out, const uint16_t* __restrict__ inp, int rows, int cols) {
    __shared__ __align__(16) uint16_t tile[TR_TILE][TR_PITCH];
    constexpr int CH = TR_TILE / V;  // chunks of V elements per tile row
    const int r0 = blockIdx.y * TR_TILE, c0 = blockIdx.x * TR_TILE;
    // in: chunk cv of tile row r (a warp: 4 rows x 8 chunks, or 32 elements of one row)
    for (int i = threadIdx.x; i < TR_TILE * CH; i += TR_THREADS) {
        const int r = i / CH, c = V * (i % CH);
        if (r0 + r >= rows || c0 + c >= cols) continue;  // V divides cols: a chunk is all in or all out
        const Vec<uint16_t, V> x = load_vec_cs<V>(inp + (size_t)(r0 + r) * cols + c0 + c);
        if constexpr (V == 1) {
            tile[r][c] = x[0];
        } else {
#pragma unroll
            for (int k = 0; k < V / 2; ++k)  // a tile row is 4-byte aligned only
                reinterpret_cast<uint32_t*>(&tile[r][c])[k] = reinterpret_cast<const uint32_t*>(&x)[k];
        }
    }
    __syncthreads();
    // out: chunk rc (tile rows V rc .. V rc + V - 1) of tile column c, one out row; a warp covers 8 columns x 4
    // chunks (V = 8: banks 8 rc + c / 2, distinct per word) or 32 elements of one column
    constexpr int RL = V == 1 ? 32 : 4;  // a warp's lanes along one out row
    constexpr int CW = 32 / RL;          // out rows per warp
    for (int i = threadIdx.x; i < TR_TILE * CH; i += TR_THREADS) {
        const int w = i / 32, lane = i % 32;
        const int c = (w % (TR_TILE / CW)) * CW + lane / RL;
        const int r = V * ((w / (TR_TILE / CW)) * RL + lane % RL);
        if (c0 + c >= cols || r0 + r >= rows) continue;
        Vec<uint16_t, V> y;
#pragma unroll
        for (int k = 0; k < V; ++k) y[k] = tile[r + k][c];
        store_vec<V>(out + (size_t)(c0 + c) * rows + r0 + r, y);
    }
}

void bf16_transpose(bf16* out, const bf16* inp, int rows, int cols, cudaStream_t stream) {
    require(rows >= 0 && cols >= 0, "bf16_transpose: negative size");
    if (rows == 0 || cols == 0) return;
    require(out != inp, "bf16_transpose: out must not alias inp");
    require(ceil_div(rows, TR_TILE) <= 65535, "bf16_transpose: too many rows");
    const dim3 grid(ceil_div(cols, TR_TILE), ceil_div(rows, TR_TILE));
    auto o = reinterpret_cast<uint16_t*>(out);
    auto x = reinterpret_cast<const uint16_t*>(inp);
    const bool vec = rows % 8 == 0 && cols % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(inp) % 16 == 0;
    if (vec)
        transpose_kernel<8><<<grid, TR_THREADS, 0, stream>>>(o, x, rows, cols);
    else
        transpose_kernel<1><<<grid, TR_THREADS, 0, stream>>>(o, x, rows, cols);
    CUDA_CHECK_LAUNCH();
}
