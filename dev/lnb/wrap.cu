// One tree's layernorm.cu + rmsnorm.cu (kernels/ of the tree given by -I) as a library for ab.py (ctypes).
#include "layernorm.cu"
#include "rmsnorm.cu"
extern "C" void ab_layernorm_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                                      const void* weight, const float* mean, const float* rstd, float* scratch,
                                      size_t scratch_floats, int N, int C, void* stream, float* dinp_sum) {
    layernorm_backward((bf16*)dinp, (bf16*)dweight, (bf16*)dbias, (const bf16*)dout, (const bf16*)inp,
                       (const bf16*)weight, mean, rstd, scratch, scratch_floats, N, C, (cudaStream_t)stream, dinp_sum);
}
extern "C" void ab_rmsnorm_backward(void* dinp, void* dweight, const void* dout, const void* inp, const void* weight,
                                    const float* rstd, float* scratch, size_t scratch_floats, int N, int C,
                                    void* stream) {
    rmsnorm_backward((bf16*)dinp, (bf16*)dweight, (const bf16*)dout, (const bf16*)inp, (const bf16*)weight, rstd,
                     scratch, scratch_floats, N, C, (cudaStream_t)stream);
}
// the two column sums that finish a layernorm backward with dinp_sum (as norm_backward launches them), alone
extern "C" void ab_layernorm_column_sums(void* dweight, void* dbias, float* dinp_sum, const float* scratch, int N,
                                         int C, void* stream) {
    const int blocks = ceil_div(N, NORM_ROWS_PER_BLOCK);
    column_sum_add((bf16*)dweight, (bf16*)dbias, C, scratch, blocks, 2 * C, (cudaStream_t)stream);
    column_sum_add(dinp_sum, dinp_sum, C, scratch + (size_t)blocks * 2 * C, blocks, C, (cudaStream_t)stream);
}
