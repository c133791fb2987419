// attention_sm90.h: the Hopper (sm_90a) attention kernels of attention_sm90.cu, for attention.cu's dispatch.
// Compiled only when 90 is among GPT2CU_CUDA_ARCHS (then GPT2CU_HAVE_SM90_ATTENTION is defined for
// attention.cu); call them only on a device of compute capability 9.x.
#pragma once
#include "kernels.h"

// shapes the sm_90 kernels handle (head sizes 64 and 128, any B, T, NH; any NKV dividing NH)
bool attention_sm90_supported(int B, int T, int NH, int HS);
// same contract as attention_forward; variant 0 = 2 consumer warpgroups on 128-query blocks, 1 = 3 consumer
// warpgroups on 192-query blocks (HS 64; HS 128 runs 0) (attention_sm90.cu); -1 = the default for HS: 1 (HS 64),
// 0 (HS 128)
void attention_forward_sm90(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, int NKV, int HS,
                            cudaStream_t stream, int variant = -1);
// the backward after attention.cu's preprocess wrote dvec = rowsum(dO * O) (B, NH, T); same contract as
// attention_backward otherwise (dqkv overwritten): one kernel for dK, dV and dQ, dQ summed in fp32 in the work area
// by bulk adds in a fixed order (deterministic; attention_sm90.cu)
// work: attention_sm90_backward_work_floats floats (4-byte aligned); dqkv_bias (if not null) += dqkv's column sums,
// summed by the kernel from the values it stores (deterministic partial rows in the work area, then column_sum_add)
void attention_backward_sm90(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* dvec,
                             int B, int T, int NH, int NKV, int HS, float* work, size_t work_floats,
                             cudaStream_t stream, bf16* dqkv_bias = nullptr);
size_t attention_sm90_backward_work_floats(int B, int T, int NH, int HS);
