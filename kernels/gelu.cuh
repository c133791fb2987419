// gelu.cuh: the tanh GeLU and its derivative in fp32, shared by gelu.cu and the GEMM epilogues of
// gemm_sm90.cu (one formula everywhere; cuBLASLt's GELU epilogues use the same tanh approximation).
//   u = sqrt(2/pi) * (x + 0.044715 x^3),  gelu(x) = 0.5 x (1 + tanh u)
//   gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// The tanh is evaluated through 0.5 (1 + tanh u) = sigmoid(2u) = 1 / (1 + exp(-2u)), so
//   gelu(x) = x * sig,   gelu'(x) = sig + sig (1 - sig) 2x du/dx   (1 - tanh^2 u = 4 sig (1 - sig)),
// one exp2 and one fast reciprocal (two special-function ops), the constants folded so that the argument is
// x * (a + b x^2): 3 fp32 ops. The flush-to-zero exp2 (fast_exp2) gives the same sigmoid as the IEEE one
// (1 / (1 + tiny) = 1) without the 3 instructions of denormal scaling. tanh.approx.f32 would be one special-function
// op, but its error (~2^-11 absolute near |tanh| = 1) is all of 1 + tanh u for x < -2: kept out.
#pragma once
#include "common.cuh"

constexpr float GELU_SCALE = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float GELU_CUBIC = 0.044715f;
constexpr float GELU_EXP2 = -2.302208198144325f;  // -2 * log2(e) * sqrt(2/pi): exp(-2u) = exp2(GELU_EXP2 * ...)

// sigmoid(2u) = 0.5 (1 + tanh u), from x and x^2; exp2 overflow gives 1/inf = 0, the right limit
__device__ __forceinline__ float gelu_sigmoid(float x, float x2) {
    return __fdividef(1.0f, 1.0f + fast_exp2(x * fmaf(GELU_EXP2 * GELU_CUBIC, x2, GELU_EXP2)));
}
__device__ __forceinline__ float gelu_sigmoid(float x) { return gelu_sigmoid(x, x * x); }

// gelu'(x) from x, x^2 and sig = gelu_sigmoid(x, x2) (so gelu(x) = x * sig comes with it at no further cost)
__device__ __forceinline__ float gelu_grad(float x, float x2, float sig) {
    const float du2 = x * fmaf(6.0f * GELU_CUBIC * GELU_SCALE, x2, 2.0f * GELU_SCALE);  // 2x du/dx
    return fmaf(sig * du2, 1.0f - sig, sig);
}
__device__ __forceinline__ float gelu_grad(float x) {
    const float x2 = x * x;
    return gelu_grad(x, x2, gelu_sigmoid(x, x2));
}
