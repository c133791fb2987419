// harness.cu: a C interface over the attention launchers for dev/attn_sm90/check.py (ctypes), so the
// sm_90 kernels can be built, checked and timed on a GPU without building the whole extension.
#include <cstdio>
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
int h_bwd(void* dqkv, const void* dout, const void* qkv, const void* out, const void* lse, void* scratch,
          size_t scratch_floats, int B, int T, int NH, int NKV, int HS, void* stream) {
    try {
        attention_backward((bf16*)dqkv, (const bf16*)dout, (const bf16*)qkv, (const bf16*)out, (const float*)lse,
                           (float*)scratch, scratch_floats, B, T, NH, NKV, HS, (cudaStream_t)stream);
        return 0;
    } catch (const std::exception& e) { fprintf(stderr, "%s\n", e.what()); return -1; }
}
size_t h_bwd_scratch(int B, int T, int NH, int HS) { return attention_backward_scratch_floats(B, T, NH, HS); }
int h_backend_in_use(int B, int T, int NH, int HS) { return attention_backend_in_use(B, T, NH, HS); }
}
