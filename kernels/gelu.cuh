// gelu.cuh: the tanh GeLU and its derivative in fp32, shared by gelu.cu and the GEMM epilogues of
// gemm_sm90.cu (one formula everywhere; cuBLASLt's GELU epilogues use the same tanh approximation).
//   u = sqrt(2/pi) * (x + 0.044715 x^3),  gelu(x) = 0.5 x (1 + tanh u)
//   gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// The tanh is evaluated through 0.5 (1 + tanh u) = sigmoid(2u) = 1 / (1 + exp(-2u)), so
//   gelu(x) = x * sig,   gelu'(x) = sig * (1 + 2 x (1 - sig) du/dx)   (1 - tanh^2 u = 4 sig (1 - sig)),
// one exp2 and one fast divide: tanhf would make the elementwise kernels compute bound.
#pragma once

constexpr float GELU_SCALE = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float GELU_CUBIC = 0.044715f;
constexpr float GELU_EXP2 = -2.302208198144325f;  // -2 * log2(e) * sqrt(2/pi): exp(-2u) = exp2(GELU_EXP2 * ...)

// sigmoid(2u) = 0.5 (1 + tanh u); exp2 overflow gives 1/inf = 0, the right limit
__device__ __forceinline__ float gelu_sigmoid(float x) {
    return __fdividef(1.0f, 1.0f + exp2f(GELU_EXP2 * (x + GELU_CUBIC * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float sig = gelu_sigmoid(x);
    const float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
    return sig * (1.0f + 2.0f * x * (1.0f - sig) * du);
}
