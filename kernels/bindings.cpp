// bindings.cpp: the pybind11 module gpt2cu._kernels, one Python function per launcher in kernels.h.
//
// Calling convention (every function):
//  - device pointers are Python ints (uintptr_t): CuPy's `array.data.ptr`, torch's `tensor.data_ptr()`;
//    0 stands for a null pointer (the optional arguments: bias, gelu_pre, dbias, master, ...);
//  - the stream is a Python int too (CuPy's `stream.ptr`; 0 = the legacy default stream);
//  - sizes are Python ints; the *_scratch_floats functions return ints;
//  - AdamWScalars is passed as a device pointer to the struct (sizeof_adamw_scalars() bytes, layout as
//    in kernels.h: float lr, grad_scale, beta1_correction, beta2_correction; uint32 seed; uint32 pad[3]);
//  - argument names and order are kernels.h's, so keyword calls work;
//  - launchers throw std::runtime_error, which reaches Python as RuntimeError.
// The launchers are asynchronous (they enqueue work on the stream) and hold the GIL while enqueuing.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
inline T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

inline cudaStream_t strm(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

static_assert(sizeof(AdamWScalars) == 32, "AdamWScalars layout changed: update the Python side");

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "gpt2cu CUDA kernels (kernels/kernels.h): device pointers and streams are Python ints";

    // ---- encoder.cu
    m.def(
        "encoder_forward",
        [](uintptr_t out, uintptr_t tokens, uintptr_t wte, uintptr_t wpe, int B, int T, int C, uintptr_t stream) {
            encoder_forward(ptr<bf16>(out), ptr<const int>(tokens), ptr<const bf16>(wte), ptr<const bf16>(wpe), B, T,
                            C, strm(stream));
        },
        "out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]", py::arg("out"), py::arg("tokens"), py::arg("wte"),
        py::arg("wpe"), py::arg("B"), py::arg("T"), py::arg("C"), py::arg("stream"));
    m.def(
        "encoder_backward",
        [](uintptr_t dwte, uintptr_t dwpe, uintptr_t dout, uintptr_t tokens, uintptr_t sorted_positions,
           uintptr_t bucket_starts, uintptr_t num_buckets, int B, int T, int C, uintptr_t stream) {
            encoder_backward(ptr<bf16>(dwte), ptr<bf16>(dwpe), ptr<const bf16>(dout), ptr<const int>(tokens),
                             ptr<const int>(sorted_positions), ptr<const int>(bucket_starts),
                             ptr<const int>(num_buckets), B, T, C, strm(stream));
        },
        "dwte[v,:] += sum of dout over positions with token v (positions sorted by token, bucket starts, "
        "num_buckets on device); dwpe[t,:] += sum_b dout[b,t,:]",
        py::arg("dwte"), py::arg("dwpe"), py::arg("dout"), py::arg("tokens"), py::arg("sorted_positions"),
        py::arg("bucket_starts"), py::arg("num_buckets"), py::arg("B"), py::arg("T"), py::arg("C"),
        py::arg("stream"));

    // ---- layernorm.cu
    m.def(
        "layernorm_forward",
        [](uintptr_t out, uintptr_t mean, uintptr_t rstd, uintptr_t inp, uintptr_t weight, uintptr_t bias, int N,
           int C, uintptr_t stream) {
            layernorm_forward(ptr<bf16>(out), ptr<float>(mean), ptr<float>(rstd), ptr<const bf16>(inp),
                              ptr<const bf16>(weight), ptr<const bf16>(bias), N, C, strm(stream));
        },
        "out = (inp - mean) * rstd * weight + bias over the last dim C; eps 1e-5; mean/rstd per row (fp32)",
        py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("inp"), py::arg("weight"), py::arg("bias"),
        py::arg("N"), py::arg("C"), py::arg("stream"));
    m.def(
        "layernorm_backward",
        [](uintptr_t dinp, uintptr_t dweight, uintptr_t dbias, uintptr_t dout, uintptr_t inp, uintptr_t weight,
           uintptr_t mean, uintptr_t rstd, uintptr_t scratch, size_t scratch_floats, int N, int C,
           uintptr_t stream, uintptr_t dinp_sum) {
            layernorm_backward(ptr<bf16>(dinp), ptr<bf16>(dweight), ptr<bf16>(dbias), ptr<const bf16>(dout),
                               ptr<const bf16>(inp), ptr<const bf16>(weight), ptr<const float>(mean),
                               ptr<const float>(rstd), ptr<float>(scratch), scratch_floats, N, C, strm(stream),
                               ptr<float>(dinp_sum));
        },
        "dinp += d/dinp, dweight += sum_rows(dout * xhat), dbias += sum_rows(dout); dinp_sum (0: none) += "
        "sum_rows(dinp) after the update",
        py::arg("dinp"), py::arg("dweight"), py::arg("dbias"), py::arg("dout"), py::arg("inp"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("scratch"), py::arg("scratch_floats"), py::arg("N"), py::arg("C"),
        py::arg("stream"), py::arg("dinp_sum") = 0);
    m.def(
        "layernorm_backward_scratch_floats", [](int N, int C) { return layernorm_backward_scratch_floats(N, C); },
        "floats of scratch layernorm_backward needs for (N, C)", py::arg("N"), py::arg("C"));

    // ---- rmsnorm.cu
    m.def(
        "rmsnorm_forward",
        [](uintptr_t out, uintptr_t rstd, uintptr_t inp, uintptr_t weight, float eps, int N, int C, uintptr_t stream) {
            rmsnorm_forward(ptr<bf16>(out), ptr<float>(rstd), ptr<const bf16>(inp), ptr<const bf16>(weight), eps, N,
                            C, strm(stream));
        },
        "out = inp * rstd * weight over the last dim C, rstd = 1/sqrt(mean(inp^2) + eps) per row (fp32)",
        py::arg("out"), py::arg("rstd"), py::arg("inp"), py::arg("weight"), py::arg("eps"), py::arg("N"),
        py::arg("C"), py::arg("stream"));
    m.def(
        "rmsnorm_backward",
        [](uintptr_t dinp, uintptr_t dweight, uintptr_t dout, uintptr_t inp, uintptr_t weight, uintptr_t rstd,
           uintptr_t scratch, size_t scratch_floats, int N, int C, uintptr_t stream) {
            rmsnorm_backward(ptr<bf16>(dinp), ptr<bf16>(dweight), ptr<const bf16>(dout), ptr<const bf16>(inp),
                             ptr<const bf16>(weight), ptr<const float>(rstd), ptr<float>(scratch), scratch_floats, N, C,
                             strm(stream));
        },
        "dinp += d/dinp, dweight += sum_rows(dout * inp * rstd)", py::arg("dinp"), py::arg("dweight"),
        py::arg("dout"), py::arg("inp"), py::arg("weight"), py::arg("rstd"), py::arg("scratch"),
        py::arg("scratch_floats"), py::arg("N"), py::arg("C"), py::arg("stream"));
    m.def(
        "rmsnorm_backward_scratch_floats", [](int N, int C) { return rmsnorm_backward_scratch_floats(N, C); },
        "floats of scratch rmsnorm_backward needs for (N, C)", py::arg("N"), py::arg("C"));

    // ---- rope.cu
    m.def(
        "rope_forward",
        [](uintptr_t out, uintptr_t inp, uintptr_t cos, uintptr_t sin, int B, int T, int NH, int NKV, int HS,
           uintptr_t stream) {
            rope_forward(ptr<bf16>(out), ptr<const bf16>(inp), ptr<const float>(cos), ptr<const float>(sin), B, T, NH,
                         NKV, HS, strm(stream));
        },
        "rotary embedding of the q and k heads of qkv (B, T, (NH + 2 NKV) HS), pairs (i, i + HS/2), fp32 cos/sin "
        "tables (T, HS/2); v copied; out may be inp; HS % 16 == 0",
        py::arg("out"), py::arg("inp"), py::arg("cos"), py::arg("sin"), py::arg("B"), py::arg("T"), py::arg("NH"),
        py::arg("NKV"), py::arg("HS"), py::arg("stream"));
    m.def(
        "rope_backward",
        [](uintptr_t dinp, uintptr_t dout, uintptr_t cos, uintptr_t sin, int B, int T, int NH, int NKV, int HS,
           uintptr_t stream) {
            rope_backward(ptr<bf16>(dinp), ptr<const bf16>(dout), ptr<const float>(cos), ptr<const float>(sin), B, T,
                          NH, NKV, HS, strm(stream));
        },
        "dinp = the transposed rotation of dout (dv copied); dinp may be dout", py::arg("dinp"), py::arg("dout"),
        py::arg("cos"), py::arg("sin"), py::arg("B"), py::arg("T"), py::arg("NH"), py::arg("NKV"), py::arg("HS"),
        py::arg("stream"));

    // ---- swiglu.cu
    m.def(
        "swiglu_forward",
        [](uintptr_t out, uintptr_t inp, int N, int H, uintptr_t stream) {
            swiglu_forward(ptr<bf16>(out), ptr<const bf16>(inp), N, H, strm(stream));
        },
        "inp (N, 2H) = [gate | up]; out (N, H) = silu(gate) * up", py::arg("out"), py::arg("inp"), py::arg("N"),
        py::arg("H"), py::arg("stream"));
    m.def(
        "swiglu_backward",
        [](uintptr_t dinp, uintptr_t dout, uintptr_t inp, int N, int H, uintptr_t stream) {
            swiglu_backward(ptr<bf16>(dinp), ptr<const bf16>(dout), ptr<const bf16>(inp), N, H, strm(stream));
        },
        "dinp (N, 2H) = [dout * up * silu'(gate) | dout * silu(gate)]; dinp may be inp", py::arg("dinp"),
        py::arg("dout"), py::arg("inp"), py::arg("N"), py::arg("H"), py::arg("stream"));

    // ---- gelu.cu
    m.def(
        "gelu_forward",
        [](uintptr_t out, uintptr_t inp, size_t n, uintptr_t stream) {
            gelu_forward(ptr<bf16>(out), ptr<const bf16>(inp), n, strm(stream));
        },
        "tanh GeLU: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))", py::arg("out"), py::arg("inp"),
        py::arg("n"), py::arg("stream"));
    m.def(
        "gelu_backward",
        [](uintptr_t dinp, uintptr_t dout, uintptr_t inp, size_t n, uintptr_t stream) {
            gelu_backward(ptr<bf16>(dinp), ptr<const bf16>(dout), ptr<const bf16>(inp), n, strm(stream));
        },
        "dinp = dout * gelu'(inp); dinp may alias dout", py::arg("dinp"), py::arg("dout"), py::arg("inp"),
        py::arg("n"), py::arg("stream"));

    // ---- bias.cu
    m.def(
        "bias_backward",
        [](uintptr_t dbias, uintptr_t dout, uintptr_t scratch, size_t scratch_floats, int N, int OC,
           uintptr_t stream) {
            bias_backward(ptr<bf16>(dbias), ptr<const bf16>(dout), ptr<float>(scratch), scratch_floats, N, OC,
                          strm(stream));
        },
        "dbias[OC] += sum over N rows of dout[N, OC]", py::arg("dbias"), py::arg("dout"), py::arg("scratch"),
        py::arg("scratch_floats"), py::arg("N"), py::arg("OC"), py::arg("stream"));
    m.def(
        "bias_backward_finish",
        [](uintptr_t dbias, uintptr_t partials, int rows, int OC, uintptr_t stream) {
            bias_backward_finish(ptr<bf16>(dbias), ptr<const float>(partials), rows, OC, strm(stream));
        },
        "dbias[OC] += the column sums of partials[rows, OC] (fp32), added in row order", py::arg("dbias"),
        py::arg("partials"), py::arg("rows"), py::arg("OC"), py::arg("stream"));
    m.def(
        "bias_backward_scratch_floats", [](int N, int OC) { return bias_backward_scratch_floats(N, OC); },
        "floats of scratch bias_backward needs for (N, OC)", py::arg("N"), py::arg("OC"));

    // ---- classifier.cu
    m.def(
        "fused_classifier",
        [](uintptr_t logits, uintptr_t losses, uintptr_t targets, float dloss, uintptr_t policy, float clip,
           uintptr_t entropy, int N, int V, int Vp, uintptr_t stream) {
            fused_classifier(ptr<bf16>(logits), ptr<float>(losses), ptr<const int>(targets), dloss,
                             ptr<const float>(policy), clip, ptr<float>(entropy), N, V, Vp, strm(stream));
        },
        "losses[i] = logsumexp(logits[i,:V]) - logits[i,targets[i]]; logits overwritten by dloss*(softmax - "
        "onehot) (times the policy-gradient weight of row i's log p when policy != 0), 0 in padded columns; "
        "entropy[i] = -sum p log p when entropy != 0; targets < 0 mask a row; dloss = 0 skips dlogits",
        py::arg("logits"), py::arg("losses"), py::arg("targets"), py::arg("dloss"), py::arg("policy"),
        py::arg("clip"), py::arg("entropy"), py::arg("N"), py::arg("V"), py::arg("Vp"), py::arg("stream"));

    // ---- lm_head.cu
    m.def(
        "lm_head_loss",
        [](uintptr_t losses, uintptr_t dhidden, uintptr_t dweight, uintptr_t logits, uintptr_t hidden,
           uintptr_t weight, uintptr_t targets, float dloss, int N, int C, int V, int Vp, uintptr_t scratch,
           size_t scratch_floats, uintptr_t stream) {
            lm_head_loss(ptr<float>(losses), ptr<bf16>(dhidden), ptr<bf16>(dweight), ptr<bf16>(logits),
                         ptr<const bf16>(hidden), ptr<const bf16>(weight), ptr<const int>(targets), dloss, N, C, V, Vp,
                         ptr<float>(scratch), scratch_floats, strm(stream));
        },
        "the LM head and its cross-entropy on N rows: losses; with dloss != 0 dhidden = dlogits @ weight and "
        "dweight += dlogits^T @ hidden (logits: (N, Vp) workspace)",
        py::arg("losses"), py::arg("dhidden"), py::arg("dweight"), py::arg("logits"), py::arg("hidden"),
        py::arg("weight"), py::arg("targets"), py::arg("dloss"), py::arg("N"), py::arg("C"), py::arg("V"),
        py::arg("Vp"), py::arg("scratch"), py::arg("scratch_floats"), py::arg("stream"));
    m.def(
        "lm_head_loss_scratch_floats", [](int N, int C, int Vp) { return lm_head_loss_scratch_floats(N, C, Vp); },
        "floats of scratch lm_head_loss needs for (N, C, Vp)", py::arg("N"), py::arg("C"), py::arg("Vp"));
    m.def(
        "lm_head_set_fused", [](int mode) { return lm_head_set_fused(mode); },
        "1: lm_head_loss's Hopper path where it applies, 0: matmul + fused_classifier + matmul; -1 only asks. "
        "Returns the setting before",
        py::arg("mode"));

    // ---- scalar_head.cu
    m.def(
        "scalar_head_forward",
        [](uintptr_t values, uintptr_t losses, uintptr_t inp, uintptr_t head, uintptr_t terms, float clip,
           float scale, int N, int C, uintptr_t stream) {
            scalar_head_forward(ptr<float>(values), ptr<float>(losses), ptr<const bf16>(inp), ptr<const float>(head),
                                ptr<const float>(terms), clip, scale, N, C, strm(stream));
        },
        "values[i] = inp[i,:] . head[:C] + head[C]; with terms != 0 (old value, return, weight per row): "
        "losses[i] = weight * the clipped value loss, values overwritten by scale * weight * its gradient",
        py::arg("values"), py::arg("losses"), py::arg("inp"), py::arg("head"), py::arg("terms"), py::arg("clip"),
        py::arg("scale"), py::arg("N"), py::arg("C"), py::arg("stream"));
    m.def(
        "scalar_head_backward",
        [](uintptr_t dinp, uintptr_t dhead, uintptr_t dvalues, uintptr_t inp, uintptr_t head, uintptr_t scratch,
           size_t scratch_floats, int N, int C, uintptr_t stream) {
            scalar_head_backward(ptr<bf16>(dinp), ptr<float>(dhead), ptr<const float>(dvalues), ptr<const bf16>(inp),
                                 ptr<const float>(head), ptr<float>(scratch), scratch_floats, N, C, strm(stream));
        },
        "dinp[i,:] += dvalues[i] * head[:C]; dhead += [sum_i dvalues[i] inp[i,:] | sum_i dvalues[i]]",
        py::arg("dinp"), py::arg("dhead"), py::arg("dvalues"), py::arg("inp"), py::arg("head"), py::arg("scratch"),
        py::arg("scratch_floats"), py::arg("N"), py::arg("C"), py::arg("stream"));
    m.def(
        "scalar_head_backward_scratch_floats", [](int N, int C) { return scalar_head_backward_scratch_floats(N, C); },
        "floats of scratch scalar_head_backward needs for (N, C)", py::arg("N"), py::arg("C"));

    // ---- attention.cu
    m.def(
        "attention_forward",
        [](uintptr_t out, uintptr_t lse, uintptr_t qkv, int B, int T, int NH, int HS, uintptr_t stream, int NKV) {
            attention_forward(ptr<bf16>(out), ptr<float>(lse), ptr<const bf16>(qkv), B, T, NH, NKV ? NKV : NH, HS,
                              strm(stream));
        },
        "causal flash attention over the packed qkv (B, T, (NH + 2 NKV) HS) = [q | k | v], query head h reading "
        "key/value head h / (NH / NKV); NKV = 0 means NH (GPT-2's (B, T, 3C)); out (B, T, NH HS); lse (B, NH, T) "
        "natural log, scale 1/sqrt(HS); HS in {64, 128}",
        py::arg("out"), py::arg("lse"), py::arg("qkv"), py::arg("B"), py::arg("T"), py::arg("NH"), py::arg("HS"),
        py::arg("stream"), py::arg("NKV") = 0);
    m.def(
        "attention_backward",
        [](uintptr_t dqkv, uintptr_t dout, uintptr_t qkv, uintptr_t out, uintptr_t lse, uintptr_t scratch,
           size_t scratch_floats, int B, int T, int NH, int HS, uintptr_t stream, int NKV, uintptr_t dout_head_dot,
           uintptr_t dqkv_bias) {
            attention_backward(ptr<bf16>(dqkv), ptr<const bf16>(dout), ptr<const bf16>(qkv), ptr<const bf16>(out),
                               ptr<const float>(lse), ptr<float>(scratch), scratch_floats, B, T, NH, NKV ? NKV : NH,
                               HS, strm(stream), ptr<const float>(dout_head_dot), ptr<bf16>(dqkv_bias));
        },
        "dqkv (qkv's layout) overwritten with [dq | dk | dv], dk and dv summed over each group of query heads "
        "(deterministic); NKV = 0 means NH; dout_head_dot != 0: D (B, NH, T) = rowsum(dout * out) given; "
        "dqkv_bias != 0: += dqkv's column sums (the qkv bias gradient)",
        py::arg("dqkv"), py::arg("dout"), py::arg("qkv"), py::arg("out"), py::arg("lse"), py::arg("scratch"),
        py::arg("scratch_floats"), py::arg("B"), py::arg("T"), py::arg("NH"), py::arg("HS"), py::arg("stream"),
        py::arg("NKV") = 0, py::arg("dout_head_dot") = 0, py::arg("dqkv_bias") = 0);
    m.def(
        "attention_backward_scratch_floats",
        [](int B, int T, int NH, int HS) { return attention_backward_scratch_floats(B, T, NH, HS); },
        "floats of scratch attention_backward needs for (B, T, NH, HS)", py::arg("B"), py::arg("T"), py::arg("NH"),
        py::arg("HS"));
    m.def(
        "attention_backward_preprocess",
        [](uintptr_t D, uintptr_t dout, uintptr_t out, int B, int T, int NH, int HS, uintptr_t stream) {
            attention_backward_preprocess(ptr<float>(D), ptr<const bf16>(dout), ptr<const bf16>(out), B, T, NH, HS,
                                          strm(stream));
        },
        "D (B, NH, T) fp32 = rowsum(dout * out) per head of HS columns (both (B, T, NH HS) bf16)", py::arg("D"),
        py::arg("dout"), py::arg("out"), py::arg("B"), py::arg("T"), py::arg("NH"), py::arg("HS"), py::arg("stream"));

    m.def(
        "attention_set_backend", [](int backend) { attention_set_backend(backend); },
        "0: automatic (Hopper wgmma/TMA kernels on compute capability 9.x where built), 1: the mma.sync kernels "
        "only, 2: the Hopper forward with the mma.sync backward",
        py::arg("backend"));
    m.def(
        "attention_backend_in_use",
        [](int B, int T, int NH, int HS) { return attention_backend_in_use(B, T, NH, HS); },
        "what attention would run now for this shape: (90 or 80 for the forward) + (9000 or 8000 for the backward)",
        py::arg("B"), py::arg("T"), py::arg("NH"), py::arg("HS"));
    m.def(
        "attention_set_sm90_forward_variant", [](int variant) { attention_set_sm90_forward_variant(variant); },
        "the Hopper forward's variant (0 or 1, kernels/attention_sm90.h) where attention runs it; -1: the default",
        py::arg("variant"));

    // ---- matmul.cu
    m.def(
        "matmul_forward",
        [](uintptr_t out, uintptr_t gelu_pre, uintptr_t inp, uintptr_t weight, uintptr_t bias, uintptr_t residual,
           int N, int C, int OC, uintptr_t stream) {
            matmul_forward(ptr<bf16>(out), ptr<bf16>(gelu_pre), ptr<const bf16>(inp), ptr<const bf16>(weight),
                           ptr<const bf16>(bias), ptr<const bf16>(residual), N, C, OC, strm(stream));
        },
        "out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (bias may be 0); gelu_pre != 0: gelu_pre = that, "
        "out = gelu(gelu_pre); residual != 0 (not with gelu_pre): out = that + residual, which may be out",
        py::arg("out"), py::arg("gelu_pre"), py::arg("inp"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("N"), py::arg("C"), py::arg("OC"), py::arg("stream"));
    m.def(
        "matmul_backward",
        [](uintptr_t dinp, uintptr_t dweight, uintptr_t dbias, uintptr_t dout, uintptr_t inp, uintptr_t weight,
           uintptr_t dinp_gelu_pre, uintptr_t dinp_gelu_dbias, uintptr_t scratch, size_t scratch_floats, int N, int C,
           int OC, uintptr_t stream, uintptr_t dinp_head_dot, uintptr_t head_dot_with, int head_size, int T,
           uintptr_t gelu_of_pre) {
            matmul_backward(ptr<bf16>(dinp), ptr<bf16>(dweight), ptr<bf16>(dbias), ptr<const bf16>(dout),
                            ptr<const bf16>(inp), ptr<const bf16>(weight), ptr<const bf16>(dinp_gelu_pre),
                            ptr<bf16>(dinp_gelu_dbias), ptr<float>(scratch), scratch_floats, N, C, OC, strm(stream),
                            ptr<float>(dinp_head_dot), ptr<const bf16>(head_dot_with), head_size, T,
                            ptr<bf16>(gelu_of_pre));
        },
        "dinp = dout @ weight (times gelu'(dinp_gelu_pre) when non-0); dweight += dout^T @ inp; dbias += "
        "colsum(dout) when non-0; dinp_gelu_dbias += colsum(dinp) when non-0 (with dinp_gelu_pre); dinp_head_dot "
        "!= 0: also (N / T, C / head_size, T) fp32 = rowsum(dinp * head_dot_with) per head (the attention "
        "backward's D); gelu_of_pre != 0 (with dinp_gelu_pre): gelu(dinp_gelu_pre) written there before dweight "
        "reads inp (which may be it)",
        py::arg("dinp"), py::arg("dweight"), py::arg("dbias"), py::arg("dout"), py::arg("inp"), py::arg("weight"),
        py::arg("dinp_gelu_pre"), py::arg("dinp_gelu_dbias"), py::arg("scratch"), py::arg("scratch_floats"),
        py::arg("N"), py::arg("C"), py::arg("OC"), py::arg("stream"), py::arg("dinp_head_dot") = 0,
        py::arg("head_dot_with") = 0, py::arg("head_size") = 0, py::arg("T") = 0, py::arg("gelu_of_pre") = 0);
    m.def(
        "matmul_backward_scratch_floats",
        [](int N, int C, int OC, bool dbias, bool dgelu, bool dgelu_dbias) {
            return matmul_backward_scratch_floats(N, C, OC, dbias, dgelu, dgelu_dbias);
        },
        "floats of scratch matmul_backward needs for (N, C, OC), with dbias, with the DGELU epilogue, with "
        "dinp_gelu_dbias",
        py::arg("N"), py::arg("C"), py::arg("OC"), py::arg("dbias"), py::arg("dgelu"), py::arg("dgelu_dbias") = false);
    m.def(
        "matmul_set_tuning", [](int mode) { return matmul_set_tuning(mode); },
        "1: time the cuBLASLt heuristic's candidates at a shape's first call (the default), 0: its first; -1 only "
        "asks; returns the mode before",
        py::arg("mode"));
    m.def(
        "matmul_set_sm90_cluster", [](int size) { return matmul_set_sm90_cluster(size); },
        "Hopper: 2 CTAs of a cluster share gemm_sm90.cu's weight loads where its row tiles pair up (the default "
        "unless GPT2CU_SM90_CLUSTER=1), 1 none; -1 only asks; returns the setting before",
        py::arg("size"));
    m.def(
        "matmul_set_sm90", [](int mode) { return matmul_set_sm90(mode); },
        "Hopper: 1 runs matmul_forward's GeLU-epilogue and residual GEMMs and matmul_backward's DGELU and "
        "head-dot ones on gemm_sm90.cu's kernel where they fit (the default unless GPT2CU_SM90_GEMM=0), 0 on cuBLASLt; -1 only asks; "
        "returns the setting before",
        py::arg("mode"));
    m.def(
        "matmul_tuning_report", []() { return matmul_tuning_report(); },
        "the GEMM algorithm choices made in this process, one line each: cache key, tab, how it was chosen");

    // ---- adamw.cu
    m.def(
        "adamw_update",
        [](uintptr_t params, uintptr_t master, uintptr_t grads, uintptr_t m_, uintptr_t v, size_t n,
           uintptr_t scalars, float beta1, float beta2, float eps, float weight_decay, unsigned int rounding_salt,
           uintptr_t stream) {
            adamw_update(ptr<bf16>(params), ptr<float>(master), ptr<const bf16>(grads), ptr<float>(m_), ptr<float>(v),
                         n, ptr<const AdamWScalars>(scalars), beta1, beta2, eps, weight_decay, rounding_salt,
                         strm(stream));
        },
        "AdamW on n elements; scalars is a DEVICE pointer to AdamWScalars (lr, grad_scale, beta1/2 corrections, "
        "seed); master 0: params (bf16) are the weights; rounding_salt decorrelates the stochastic rounding of "
        "different tensors",
        py::arg("params"), py::arg("master"), py::arg("grads"), py::arg("m"), py::arg("v"), py::arg("n"),
        py::arg("scalars"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("rounding_salt"), py::arg("stream"));
    m.def(
        "adamw_update_fp32",
        [](uintptr_t params, uintptr_t grads, uintptr_t m_, uintptr_t v, size_t n, uintptr_t scalars, float beta1,
           float beta2, float eps, float weight_decay, uintptr_t stream) {
            adamw_update(ptr<float>(params), ptr<const float>(grads), ptr<float>(m_), ptr<float>(v), n,
                         ptr<const AdamWScalars>(scalars), beta1, beta2, eps, weight_decay, strm(stream));
        },
        "AdamW on n fp32 params with fp32 grads (no master copy, no rounding); scalars as adamw_update's",
        py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"), py::arg("n"), py::arg("scalars"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("stream"));
    m.def(
        "adamw_scalars_clipped",
        [](uintptr_t out, float lr, float beta1_correction, float beta2_correction, unsigned int seed,
           uintptr_t norm_squared, uintptr_t loss, double max_norm, uintptr_t stream) {
            adamw_scalars_clipped(ptr<AdamWScalars>(out), lr, beta1_correction, beta2_correction, seed,
                                  ptr<const float>(norm_squared), ptr<const float>(loss), max_norm, strm(stream));
        },
        "writes AdamWScalars at the DEVICE pointer out from the global norm's square (device): grad_scale = "
        "max_norm / norm when norm > max_norm, else 1; skip when the norm or loss[0] (device, 0: none) is not finite",
        py::arg("out"), py::arg("lr"), py::arg("beta1_correction"), py::arg("beta2_correction"), py::arg("seed"),
        py::arg("norm_squared"), py::arg("loss"), py::arg("max_norm"), py::arg("stream"));
    m.def(
        "sizeof_adamw_scalars", []() { return sizeof(AdamWScalars); },
        "bytes of struct AdamWScalars (4 floats lr, grad_scale, beta1_correction, beta2_correction; uint32 seed; "
        "uint32 skip; uint32 pad[2])");

    // ---- global_norm.cu
    m.def(
        "global_norm_squared",
        [](uintptr_t out, uintptr_t grads, size_t n, uintptr_t scratch, size_t scratch_floats, uintptr_t stream) {
            global_norm_squared(ptr<float>(out), ptr<const bf16>(grads), n, ptr<float>(scratch), scratch_floats,
                                strm(stream));
        },
        "out[0] = sum of squares of grads[0..n) in fp32, deterministic", py::arg("out"), py::arg("grads"),
        py::arg("n"), py::arg("scratch"), py::arg("scratch_floats"), py::arg("stream"));
    m.def(
        "global_norm_scratch_floats", [](size_t n) { return global_norm_scratch_floats(n); },
        "floats of scratch global_norm_squared needs for n elements", py::arg("n"));

    // ---- decode_attention.cu
    m.def(
        "decode_attention",
        [](uintptr_t out, uintptr_t qkv, long long seq_stride, int B, int n, int NH, int NKV, int HS,
           uintptr_t stream) {
            decode_attention(ptr<bf16>(out), ptr<const bf16>(qkv), seq_stride, B, n, NH, NKV, HS, strm(stream));
        },
        "each sequence's last query (row n-1) against its cached keys and values of rows 0..n-1 in the packed "
        "qkv layout, sequences seq_stride elements apart; out (B, NH HS) bf16, scale 1/sqrt(HS), fp32 softmax",
        py::arg("out"), py::arg("qkv"), py::arg("seq_stride"), py::arg("B"), py::arg("n"), py::arg("NH"),
        py::arg("NKV"), py::arg("HS"), py::arg("stream"));

    // ---- sample.cu
    m.def(
        "sample_logits",
        [](uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t uniforms, int B, int V, int Vp,
           float temperature, int top_k, uintptr_t stream) {
            sample_logits(ptr<int>(tokens), ptr<float>(logprobs), ptr<const bf16>(logits), ptr<const float>(uniforms),
                          B, V, Vp, temperature, top_k, strm(stream));
        },
        "one token per row of logits (B, Vp) bf16 (first V columns) and its log-probability: greedy at temperature "
        "0, else the inverse CDF at uniforms[b] of softmax(logits / temperature) over the values >= the top_k-th "
        "largest (top_k 0: all)",
        py::arg("tokens"), py::arg("logprobs"), py::arg("logits"), py::arg("uniforms"), py::arg("B"), py::arg("V"),
        py::arg("Vp"), py::arg("temperature"), py::arg("top_k"), py::arg("stream"));

    // ---- rows.cu
    m.def(
        "gather_rows",
        [](uintptr_t out, uintptr_t src, uintptr_t index, int K, int C, uintptr_t stream) {
            gather_rows(ptr<bf16>(out), ptr<const bf16>(src), ptr<const int>(index), K, C, strm(stream));
        },
        "out[k, :] = src[index[k], :] for k < K, rows of C bf16", py::arg("out"), py::arg("src"), py::arg("index"),
        py::arg("K"), py::arg("C"), py::arg("stream"));
    m.def(
        "scatter_rows",
        [](uintptr_t out, uintptr_t src, uintptr_t index, int K, int C, uintptr_t stream) {
            scatter_rows(ptr<bf16>(out), ptr<const bf16>(src), ptr<const int>(index), K, C, strm(stream));
        },
        "out[index[k], :] = src[k, :] for k < K (distinct indices), rows of C bf16", py::arg("out"), py::arg("src"),
        py::arg("index"), py::arg("K"), py::arg("C"), py::arg("stream"));

    // ---- convert.cu
    m.def(
        "bf16_to_float",
        [](uintptr_t out, uintptr_t inp, size_t n, uintptr_t stream) {
            bf16_to_float(ptr<float>(out), ptr<const bf16>(inp), n, strm(stream));
        },
        "out (fp32) = inp (bf16), n elements", py::arg("out"), py::arg("inp"), py::arg("n"), py::arg("stream"));
    m.def(
        "float_to_bf16",
        [](uintptr_t out, uintptr_t inp, size_t n, uintptr_t stream) {
            float_to_bf16(ptr<bf16>(out), ptr<const float>(inp), n, strm(stream));
        },
        "out (bf16) = inp (fp32) rounded to nearest even, n elements", py::arg("out"), py::arg("inp"), py::arg("n"),
        py::arg("stream"));
    m.def(
        "bf16_accumulate",
        [](uintptr_t out, uintptr_t x, size_t n, uintptr_t stream) {
            bf16_accumulate(ptr<bf16>(out), ptr<const bf16>(x), n, strm(stream));
        },
        "out (bf16) += x (bf16), added in fp32 and rounded to nearest even, n elements", py::arg("out"),
        py::arg("x"), py::arg("n"), py::arg("stream"));
    m.def(
        "bf16_accumulate_fp32",
        [](uintptr_t out, uintptr_t x, size_t n, uintptr_t stream) {
            bf16_accumulate(ptr<bf16>(out), ptr<const float>(x), n, strm(stream));
        },
        "out (bf16) += x (fp32), added in fp32 and rounded to nearest even, n elements", py::arg("out"),
        py::arg("x"), py::arg("n"), py::arg("stream"));

    // ---- transpose.cu
    m.def(
        "bf16_transpose",
        [](uintptr_t out, uintptr_t inp, int rows, int cols, uintptr_t stream) {
            bf16_transpose(ptr<bf16>(out), ptr<const bf16>(inp), rows, cols, strm(stream));
        },
        "out (cols, rows) = inp (rows, cols)^T, bf16, exact", py::arg("out"), py::arg("inp"), py::arg("rows"),
        py::arg("cols"), py::arg("stream"));
}
