// gemm_sm90.h: the Hopper (sm_90a) GEMMs with GeLU epilogues of gemm_sm90.cu, for matmul.cu's dispatch.
// Compiled only when 90 is among GPT2CU_CUDA_ARCHS (then GPT2CU_HAVE_SM90_GEMM is defined for matmul.cu);
// call them only on a device of compute capability 9.x. Row-major bf16 everywhere, fp32 accumulation.
#pragma once
#include <initializer_list>
#include "kernels.h"

// tile variants: 1 = 128 x 128 tiles per consumer warpgroup, 2 = 64 x 256 (gemm_sm90.cu's header)
constexpr int kGemmSm90Variants = 2;

// whether variant `variant` handles an M x N x K product: N a multiple of its tile width (128 or 256), K of
// 64, every pointer 16-byte aligned (null ones aside); any M >= 1
bool gemm_sm90_supported(int variant, int M, int N, int K, std::initializer_list<const void*> ptrs);

// pre (M, N) = a (M, K) @ w (N, K)^T + bias (N) (bias may be null), out = gelu(pre): both bf16, out from the
// fp32 value (cuBLASLt's GELU_AUX_BIAS)
void gemm_gelu_forward_sm90(bf16* out, bf16* pre, const bf16* a, const bf16* w, const bf16* bias, int M, int N, int K,
                            int variant, cudaStream_t stream);
// out (M, N) = (a (M, K) @ w (K, N)) * gelu'(pre (M, N))   (cuBLASLt's DGELU; w row-major K x N)
void gemm_dgelu_sm90(bf16* out, const bf16* a, const bf16* w, const bf16* pre, int M, int N, int K, int variant,
                     cudaStream_t stream);
