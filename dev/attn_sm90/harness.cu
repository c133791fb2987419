// harness.cu: a C interface over the attention launchers for dev/attn_sm90/check.py (ctypes), so the
// sm_90 kernels can be built, checked and timed on a GPU without building the whole extension.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include "kernels.h"
#include "attention_sm90.h"

extern "C" {
int h_set_backend(int backend) {
    try { attention_set_backend(backend); return 0; } catch (const std::exception& e) { fprintf(stderr, "%s\n", e.what()); return -1; }
}
int h_fwd(void* out, void* lse, const void* qkv, int B, int T, int NH, int NKV, int HS, void* stream) {
    try {
        attention_forward((bf16*)out, (float*)lse, (const bf16*)qkv, B, T, NH, NKV, HS, (cudaStream_t)stream);
        return 0;
    } catch (const std::exception& e) { fprintf(stderr, "%s\n", e.what()); return -1; }
}
int h_fwd_sm90(void* out, void* lse, const void* qkv, int B, int T, int NH, int NKV, int HS, int variant,
               void* stream) {
    try {
        attention_forward_sm90((bf16*)out, (float*)lse, (const bf16*)qkv, B, T, NH, NKV, HS, (cudaStream_t)stream,
                               variant);
        return 0;
    } catch (const std::exception& e) { fprintf(stderr, "%s\n", e.what()); return -1; }
}
// dqkv_bias: null, or the qkv bias gradient ((NH + 2 NKV) HS bf16) the backward adds dqkv's column sums to
int h_bwd_bias(void* dqkv, const void* dout, const void* qkv, const void* out, const void* lse, void* scratch,
               size_t scratch_floats, int B, int T, int NH, int NKV, int HS, void* dqkv_bias, void* stream) {
    try {
        attention_backward((bf16*)dqkv, (const bf16*)dout, (const bf16*)qkv, (const bf16*)out, (const float*)lse,
                           (float*)scratch, scratch_floats, B, T, NH, NKV, HS, (cudaStream_t)stream, nullptr,
                           (bf16*)dqkv_bias);
        return 0;
    } catch (const std::exception& e) { fprintf(stderr, "%s\n", e.what()); return -1; }
}
// without the bias gradient; with GPT2CU_HARNESS_QKV_BIAS=1 in the environment (read once), with it into a buffer of
// the harness (so scripts that call h_bwd, as .gpu's A/B of builds, time the backward that sums it)
int h_bwd(void* dqkv, const void* dout, const void* qkv, const void* out, const void* lse, void* scratch,
          size_t scratch_floats, int B, int T, int NH, int NKV, int HS, void* stream) {
    static const int with_bias = getenv("GPT2CU_HARNESS_QKV_BIAS") && atoi(getenv("GPT2CU_HARNESS_QKV_BIAS")) == 1;
    static void* bias = nullptr;
    static size_t bias_cols = 0;
    const size_t cols = (size_t)(NH + 2 * NKV) * HS;
    if (with_bias && cols > bias_cols) {
        if (bias) cudaFree(bias);
        if (cudaMalloc(&bias, cols * sizeof(bf16)) != cudaSuccess || cudaMemset(bias, 0, cols * sizeof(bf16))) {
            fprintf(stderr, "h_bwd: no memory for the bias gradient\n");
            return -1;
        }
        bias_cols = cols;
    }
    return h_bwd_bias(dqkv, dout, qkv, out, lse, scratch, scratch_floats, B, T, NH, NKV, HS,
                      with_bias ? bias : nullptr, stream);
}
int h_bias_backward(void* dbias, const void* dout, void* scratch, size_t scratch_floats, int N, int OC, void* stream) {
    try {
        bias_backward((bf16*)dbias, (const bf16*)dout, (float*)scratch, scratch_floats, N, OC, (cudaStream_t)stream);
        return 0;
    } catch (const std::exception& e) { fprintf(stderr, "%s\n", e.what()); return -1; }
}
size_t h_bwd_scratch(int B, int T, int NH, int HS) { return attention_backward_scratch_floats(B, T, NH, HS); }
int h_backend_in_use(int B, int T, int NH, int HS) { return attention_backend_in_use(B, T, NH, HS); }
}
