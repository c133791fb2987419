// gemm_sm90.h: the Hopper (sm_90a) GEMMs with an elementwise epilogue of gemm_sm90.cu, for matmul.cu's and
// lm_head.cu's dispatch.
// Compiled only when 90 is among GPT2CU_CUDA_ARCHS (then GPT2CU_HAVE_SM90_GEMM is defined for matmul.cu);
// call them only on a device of compute capability 9.x (the header itself is included by every build: the scratch
// sizes use gemm_sm90_row_tiles). Row-major bf16 everywhere, fp32 accumulation.
#pragma once
#include <initializer_list>
#include "kernels.h"

// The CTAs that share the loads of a column tile's weight rows (a thread-block cluster, TMA multicast): 2 (the
// default; GPT2CU_SM90_CLUSTER=1 sets 1) where the row tiles pair up, else 1; -1 only asks. Returns the setting
// before.
int gemm_sm90_set_cluster(int size);

// whether the kernel handles an M x N x K product: N a multiple of 128, K of 64, every pointer 16-byte aligned
// (null ones aside); any M >= 1
bool gemm_sm90_supported(int M, int N, int K, std::initializer_list<const void*> ptrs);

// The column width of the tiles of gemm_gelu_forward_sm90, gemm_dgelu_sm90, gemm_exp_sm90 and gemm_head_dot_sm90 (head
// size 64) at N columns: 192 where it divides N (GPT-2's 768, 3072 and 50304: a k-block's loads feed 1.5x the products
// of a 128-wide tile), else 128. gemm_residual_forward_sm90's are 128 wide.
inline int gemm_sm90_tile_cols(int N) { return N % 192 == 0 ? 192 : 128; }

// pre (M, N) = a (M, K) @ w (N, K)^T + bias (N) (bias may be null), out = gelu(pre): both bf16, out from the
// fp32 value (cuBLASLt's GELU_AUX_BIAS)
void gemm_gelu_forward_sm90(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
                            cudaStream_t stream);

// out (M, N) = round((a (M, K) @ w (N, K)^T) * gelu'(pre (M, N))) from the fp32 product (cuBLASLt's DGELU); w is
// K-major: the backward's weight (K, N) transposed first (matmul.cu). colsum_partials (may be null): fp32
// (gemm_sm90_row_tiles(M), N); row i = the column sums of out's rows 128 i .. 128 i + 127, of the bf16 values
// stored, in fp32, each element written once (column_sum_add finishes the column sums of out). gelu_out (may be
// null): also gelu(pre) (bf16, the same bits as gelu_forward's): the forward's activation recomputed where pre is read
// anyway (the backward under recompute); not aliasing out or pre
void gemm_dgelu_sm90(bf16* out, float* colsum_partials, const bf16* a, const bf16* w, const bf16* pre, int M, int N,
                     int K, cudaStream_t stream, bf16* gelu_out = nullptr);
// the kernel's row tiles for M rows (of 128): the rows of gemm_dgelu_sm90's colsum_partials
inline int gemm_sm90_row_tiles(int M) { return (M + 127) / 128; }

// out (M, N) = round(a (M, K) @ w (N, K)^T + bias (N) + residual (M, N)) from the fp32 sum (bias may be null;
// residual may be out itself): a block's projection into the residual stream
void gemm_residual_forward_sm90(bf16* out, const bf16* a, const bf16* w, const bf16* bias, const bf16* residual,
                                int M, int N, int K, cudaStream_t stream);

// out (M, N) = round(a (M, K) @ w (N, K)^T) (w K-major, as gemm_dgelu_sm90's), and dot (B, N / head_size, T) fp32,
// B = M / T: dot[(b NH + h) T + t] = sum over head h's head_size columns c of out[m, c] * other[m, c], m = b T + t,
// from the rounded out (the attention backward's D = rowsum(dO * O)); head_size 64 or 128, M a multiple of T
void gemm_head_dot_sm90(bf16* out, float* dot, const bf16* a, const bf16* w, const bf16* other, int M, int N, int K,
                        int T, int head_size, cudaStream_t stream);

// The LM head's forward (lm_head.cu): out (M, N) = round(2^min(log2(e) (a (M, K) @ w (N, K)^T - row_shift[m]), 64))
// in the columns < valid_cols, 0 in the others; row_sums (N / w, M) fp32, w = gemm_sm90_tile_cols(N):
// row_sums[j * M + m] = the sum of row m's values in columns w j .. w j + w - 1 (fp32, before the rounding). Tiles in
// column-major order (w, the vocabulary, read once).
void gemm_exp_sm90(bf16* out, float* row_sums, const bf16* a, const bf16* w, const float* row_shift, int M, int N, int K,
                   int valid_cols, cudaStream_t stream);
