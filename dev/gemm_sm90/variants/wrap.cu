// ctypes entry points to gemm_sm90.cu's launchers for ab.py (dev/gemm_sm90/variants)
#include "gemm_sm90.h"
extern "C" {
void ab_exp(void* out, float* rs, const void* a, const void* w, const float* shift, int M, int N, int K, int valid,
            void* stream) {
    gemm_exp_sm90((bf16*)out, rs, (const bf16*)a, (const bf16*)w, shift, M, N, K, valid, (cudaStream_t)stream);
}
void ab_gelu(void* out, void* pre, const void* a, const void* w, const void* bias, int M, int N, int K, void* stream) {
    gemm_gelu_forward_sm90((bf16*)out, (bf16*)pre, (const bf16*)a, (const bf16*)w, (const bf16*)bias, M, N, K,
                           (cudaStream_t)stream);
}
void ab_dgelu(void* out, float* colsum, const void* a, const void* w, const void* pre, int M, int N, int K, void* stream) {
    gemm_dgelu_sm90((bf16*)out, colsum, (const bf16*)a, (const bf16*)w, (const bf16*)pre, M, N, K, (cudaStream_t)stream);
}
void ab_residual(void* out, const void* a, const void* w, const void* bias, const void* residual, int M, int N, int K,
                 void* stream) {
    gemm_residual_forward_sm90((bf16*)out, (const bf16*)a, (const bf16*)w, (const bf16*)bias, (const bf16*)residual, M,
                               N, K, (cudaStream_t)stream);
}
void ab_head_dot(void* out, float* dot, const void* a, const void* w, const void* other, int M, int N, int K, int T,
                 int hs, void* stream) {
    gemm_head_dot_sm90((bf16*)out, dot, (const bf16*)a, (const bf16*)w, (const bf16*)other, M, N, K, T, hs,
                       (cudaStream_t)stream);
}
int ab_set_cluster(int size) { return gemm_sm90_set_cluster(size); }  // 1 or 2; -1 asks
}
