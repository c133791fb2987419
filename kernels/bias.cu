// Bias gradient: dbias[OC] += column sums of dout[N, OC], deterministic in two phases.
//
// phase 1: block (32, 8) owns a tile of BIAS_ROWS rows x 32 column vectors (256 columns of 8 bf16):
//   thread (x, y) adds rows y, y+8, ... of its 8 columns (a warp reads 512 contiguous bytes of a row),
//   the 8 row-group sums go through shared memory and are added in y order, and the block writes its
//   fp32 partial row: scratch[tile_row][OC]. N = 65536 gives 256 tiles of rows x OC/256 column tiles
//   (768 to 3072 blocks for OC = 768 ... 3072).
// phase 2: column_sum_add adds the ceil(N / BIAS_ROWS) partial rows in order into the bf16 dbias
//   (bias_backward_finish, which also finishes the column sums the Hopper DGELU GEMM writes: matmul.cu).
// OC not a multiple of 8 (or an unaligned dout) runs the same code with 1-column vectors.
#include "common.cuh"

constexpr int BIAS_TX = 32, BIAS_TY = 8;
constexpr int BIAS_ROWS = 256;  // rows per block: N / 256 partial rows in scratch

template <int V>
__global__ void __launch_bounds__(BIAS_TX * BIAS_TY)
    bias_backward_partial_kernel(float* __restrict__ partials, const bf16* __restrict__ dout, int N, int OC) {
    __shared__ float sums[BIAS_TY][BIAS_TX * V];
    const int c = (blockIdx.x * BIAS_TX + threadIdx.x) * V;
    const int row_begin = (int)blockIdx.y * BIAS_ROWS, row_end = min(N, row_begin + BIAS_ROWS);
    float acc[V] = {};
    if (c < OC) {
#pragma unroll 8
        for (int r = row_begin + (int)threadIdx.y; r < row_end; r += BIAS_TY) {
            const Vec<bf16, V> x = load_vec<V>(dout + (size_t)r * OC + c);
#pragma unroll
            for (int k = 0; k < V; k++) acc[k] += (float)x[k];
        }
    }
#pragma unroll
    for (int k = 0; k < V; k++) sums[threadIdx.y][threadIdx.x * V + k] = acc[k];
    __syncthreads();
    for (int t = threadIdx.y * BIAS_TX + threadIdx.x; t < BIAS_TX * V; t += BIAS_TX * BIAS_TY) {
        const int col = blockIdx.x * BIAS_TX * V + t;
        if (col < OC) {
            float s = 0.0f;
#pragma unroll
            for (int y = 0; y < BIAS_TY; y++) s += sums[y][t];
            partials[(size_t)blockIdx.y * OC + col] = s;
        }
    }
}

size_t bias_backward_scratch_floats(int N, int OC) {
    return (size_t)ceil_div(N, BIAS_ROWS) * OC;
}

void bias_backward(bf16* dbias, const bf16* dout, float* scratch, size_t scratch_floats, int N, int OC,
                   cudaStream_t stream) {
    require(N >= 0 && OC >= 0, "bias_backward: negative size");
    if (N == 0 || OC == 0) return;
    require(scratch_floats >= bias_backward_scratch_floats(N, OC), "bias_backward: scratch too small");
    const int row_tiles = ceil_div(N, BIAS_ROWS);
    require(row_tiles <= 65535, "bias_backward: N too large");
    const dim3 block(BIAS_TX, BIAS_TY);
    if (OC % 8 == 0 && reinterpret_cast<uintptr_t>(dout) % 16 == 0)
        bias_backward_partial_kernel<8><<<dim3(ceil_div(OC, BIAS_TX * 8), row_tiles), block, 0, stream>>>(
            scratch, dout, N, OC);
    else
        bias_backward_partial_kernel<1><<<dim3(ceil_div(OC, BIAS_TX), row_tiles), block, 0, stream>>>(
            scratch, dout, N, OC);
    CUDA_CHECK_LAUNCH();
    bias_backward_finish(dbias, scratch, row_tiles, OC, stream);
}

void bias_backward_finish(bf16* dbias, const float* partials, int rows, int OC, cudaStream_t stream) {
    column_sum_add(dbias, dbias, OC, partials, rows, OC, stream);
}
