// Rows copied by an index list, rows of C bf16:
//   gather   out[k, :] = src[index[k], :]     k < K
//   scatter  out[index[k], :] = src[k, :]
// An LM head run on listed positions only (RL's update scores the completions, a few percent of the
// positions) gathers its input rows from the final norm's output and scatters its input gradient back.
// The indices are distinct, so a scatter has no two writers of one row. One block per listed row; 16-byte
// accesses when C and both buffers allow them, else 2-byte ones.
#include "common.cuh"

constexpr int ROWS_THREADS = 128;

template <bool SCATTER, int V>
__global__ void __launch_bounds__(ROWS_THREADS)
    copy_rows_kernel(bf16* __restrict__ out, const bf16* __restrict__ src, const int* __restrict__ index, int C) {
    const size_t listed = blockIdx.x, row = index[listed];
    const size_t from = (SCATTER ? listed : row) * C, to = (SCATTER ? row : listed) * C;
    for (int c = threadIdx.x * V; c < C; c += ROWS_THREADS * V) store_vec<V>(out + to + c, load_vec<V>(src + from + c));
}

template <bool SCATTER>
static void copy_rows(bf16* out, const bf16* src, const int* index, int K, int C, cudaStream_t stream) {
    if (K == 0) return;
    const bool wide = C % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
    if (wide)
        copy_rows_kernel<SCATTER, 8><<<K, ROWS_THREADS, 0, stream>>>(out, src, index, C);
    else
        copy_rows_kernel<SCATTER, 1><<<K, ROWS_THREADS, 0, stream>>>(out, src, index, C);
    CUDA_CHECK_LAUNCH();
}

void gather_rows(bf16* out, const bf16* src, const int* index, int K, int C, cudaStream_t stream) {
    copy_rows<false>(out, src, index, K, C, stream);
}

void scatter_rows(bf16* out, const bf16* src, const int* index, int K, int C, cudaStream_t stream) {
    copy_rows<true>(out, src, index, K, C, stream);
}
