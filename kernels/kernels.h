// Host-side launchers of every gpt2cu kernel: the one interface bindings.cpp exposes to Python.
//
// Conventions (all families):
//  - bf16 storage, fp32 arithmetic; fp32 buffers are named so (mean, rstd, lse, losses, master, m, v).
//  - row-major tensors; N = B*T rows; weights are (OC, C) and y = x @ W^T + b, as nn.Linear.
//  - "+=" in a comment means the launcher ACCUMULATES into that output (gradient accumulation);
//    every other output is overwritten.
//  - launchers never allocate on the hot path (CUDA-graph capture safe) except the one-time
//    cuBLASLt setup on the first matmul call; scratch comes in from the caller with its size in
//    floats, and a launcher throws std::runtime_error if the scratch is too small or a size is
//    unsupported. Every launch is followed by a cudaGetLastError check (CUDA_CHECK in common.cuh).
//  - reductions are deterministic: no float atomics on a shared output.
#pragma once
#include <cstddef>
#include <string>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// ---- encoder.cu -------------------------------------------------------------------------------
// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]
void encoder_forward(bf16* out, const int* tokens, const bf16* wte, const bf16* wpe, int B, int T, int C,
                     cudaStream_t stream);
// dwte[v,:] += sum over positions p with tokens[p]==v of dout[p,:];  dwpe[t,:] += sum_b dout[b,t,:]
// Deterministic: the caller passes the positions sorted (stably) by token, `sorted_positions` (B*T),
// and the start of each run of equal tokens, `bucket_starts` (num_buckets+1 entries, last = B*T);
// `num_buckets` is read from DEVICE memory so a captured graph can replay with new batches.
void encoder_backward(bf16* dwte, bf16* dwpe, const bf16* dout, const int* tokens, const int* sorted_positions,
                      const int* bucket_starts, const int* num_buckets, int B, int T, int C, cudaStream_t stream);

// ---- layernorm.cu -----------------------------------------------------------------------------
// out = (inp - mean) * rstd * weight + bias over the last dim C; eps = 1e-5; mean/rstd per row (fp32)
void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight,
                       const bf16* bias, int N, int C, cudaStream_t stream);
// dinp += d/dinp, dweight += sum_rows(dout * xhat), dbias += sum_rows(dout); dinp_sum (optional, C):
// += sum_rows(dinp) after the update (the bias gradient of the projection feeding the residual stream)
void layernorm_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                        const bf16* weight, const float* mean, const float* rstd, float* scratch,
                        size_t scratch_floats, int N, int C, cudaStream_t stream, float* dinp_sum = nullptr);
// floats of scratch layernorm_backward needs for (N, C)
size_t layernorm_backward_scratch_floats(int N, int C);

// ---- rmsnorm.cu -------------------------------------------------------------------------------
// out = inp * rstd * weight over the last dim C, rstd = 1/sqrt(mean(inp^2) + eps) per row (fp32)
void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, float eps, int N, int C,
                     cudaStream_t stream);
// dinp += d/dinp, dweight += sum_rows(dout * inp * rstd)
void rmsnorm_backward(bf16* dinp, bf16* dweight, const bf16* dout, const bf16* inp, const bf16* weight,
                      const float* rstd, float* scratch, size_t scratch_floats, int N, int C, cudaStream_t stream);
// floats of scratch rmsnorm_backward needs for (N, C)
size_t rmsnorm_backward_scratch_floats(int N, int C);

// ---- rope.cu ----------------------------------------------------------------------------------
// Rotary embedding of the q and k heads of the packed qkv (B, T, (NH + 2*NKV) * HS) = [q heads | k heads |
// v heads]: channel i < HS/2 of a head pairs with channel i + HS/2 (transformers' rotate_half), rotated by
// the angle of (position t, i) given as fp32 tables cos, sin (T, HS/2). v heads are copied; out may be inp.
// HS % 16 == 0.
void rope_forward(bf16* out, const bf16* inp, const float* cos, const float* sin, int B, int T, int NH, int NKV,
                  int HS, cudaStream_t stream);
// dinp = the transposed rotation of dout (dv copied); dinp may be dout
void rope_backward(bf16* dinp, const bf16* dout, const float* cos, const float* sin, int B, int T, int NH, int NKV,
                   int HS, cudaStream_t stream);

// ---- swiglu.cu --------------------------------------------------------------------------------
// inp (N, 2H) = [gate | up]; out (N, H) = silu(gate) * up
void swiglu_forward(bf16* out, const bf16* inp, int N, int H, cudaStream_t stream);
// dinp (N, 2H) = [dgate | dup] = [dout * up * silu'(gate) | dout * silu(gate)]; dinp may be inp
void swiglu_backward(bf16* dinp, const bf16* dout, const bf16* inp, int N, int H, cudaStream_t stream);

// ---- gelu.cu ----------------------------------------------------------------------------------
// tanh GeLU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
void gelu_forward(bf16* out, const bf16* inp, size_t n, cudaStream_t stream);
// dinp = dout * gelu'(inp); dinp may alias dout
void gelu_backward(bf16* dinp, const bf16* dout, const bf16* inp, size_t n, cudaStream_t stream);

// ---- bias.cu ----------------------------------------------------------------------------------
// dbias[OC] += sum over N rows of dout[N, OC]
void bias_backward(bf16* dbias, const bf16* dout, float* scratch, size_t scratch_floats, int N, int OC,
                   cudaStream_t stream);
size_t bias_backward_scratch_floats(int N, int OC);
// dbias (OC) += the column sums of partials (rows, OC) fp32, added in row order (bias_backward's second phase)
void bias_backward_finish(bf16* dbias, const float* partials, int rows, int OC, cudaStream_t stream);

// ---- classifier.cu ----------------------------------------------------------------------------
// Softmax cross-entropy over the first V of Vp columns, in one pass over the logits:
//   losses[i] = logsumexp(logits[i,:V]) - logits[i, targets[i]]
//   logits[i,:] is overwritten by dlogits = dloss * (softmax(logits[i,:V]) - onehot(targets[i])),
//   and zero in the padded columns V..Vp-1.
// targets[i] < 0 masks row i: loss 0, dlogits row 0. dloss = 0 skips writing dlogits (eval).
// policy (nullable, fp32 [N, 4]: old log p, advantage, reference log p, KL coefficient per row) and clip:
// row i's dlogits are scaled by the policy-gradient weight of its log p = -losses[i] (classifier.cu).
// entropy (nullable, fp32 [N]): entropy[i] = -sum_j p_j log p_j over the first V columns (0 for masked rows).
void fused_classifier(bf16* logits, float* losses, const int* targets, float dloss, const float* policy,
                      float clip, float* entropy, int N, int V, int Vp, cudaStream_t stream);

// ---- lm_head.cu --------------------------------------------------------------------------------
// The LM head and its softmax cross-entropy on N rows: logits = hidden (N, C) @ weight (Vp, C)^T, losses[i] =
// logsumexp(logits[i,:V]) - logits[i, targets[i]] (targets[i] < 0: loss 0, no gradient); with dloss != 0 also
// dhidden (N, C) = dlogits @ weight and dweight (Vp, C) += dlogits^T @ hidden, dlogits = dloss (softmax - onehot).
// logits (N, Vp) is workspace: afterwards it holds dlogits, or on Hopper what the fused path leaves there. On Hopper
// (matmul_sm90_active, C a multiple of 64 up to 12288, Vp of 128, 16-byte aligned pointers) without forming dlogits (lm_head.cu);
// elsewhere matmul_forward, fused_classifier, matmul_backward. scratch: lm_head_loss_scratch_floats(N, C, Vp) floats
// (asked for on every GPU).
void lm_head_loss(float* losses, bf16* dhidden, bf16* dweight, bf16* logits, const bf16* hidden, const bf16* weight,
                  const int* targets, float dloss, int N, int C, int V, int Vp, float* scratch, size_t scratch_floats,
                  cudaStream_t stream);
size_t lm_head_loss_scratch_floats(int N, int C, int Vp);
// 1: the Hopper path where it applies (the default unless GPT2CU_FUSED_LM_HEAD=0), 0: the three ops; -1 only asks.
// Returns the setting before. For benchmarks and tests.
int lm_head_set_fused(int mode);

// ---- scalar_head.cu ---------------------------------------------------------------------------
// A scalar head on N rows of C (the final norm's output), head = [w (C) | b] fp32 (16-byte aligned):
//   values[i] = inp[i,:] . w + b (fp32).
// terms (nullable, fp32 [N, 3]: old value, return, weight per row), clip, scale: PPO's clipped value loss
// (scalar_head.cu): losses[i] = weight * loss of row i, and values[i] is overwritten by
// scale * weight * d loss / d value (the dvalues scalar_head_backward takes).
void scalar_head_forward(float* values, float* losses, const bf16* inp, const float* head, const float* terms,
                         float clip, float scale, int N, int C, cudaStream_t stream);
// dinp[i,:] += dvalues[i] * w (bf16, rounded to nearest even); dhead += [sum_i dvalues[i] inp[i,:] |
// sum_i dvalues[i]] (fp32, deterministic). Rows with dvalues[i] == 0 are not read.
void scalar_head_backward(bf16* dinp, float* dhead, const float* dvalues, const bf16* inp, const float* head,
                          float* scratch, size_t scratch_floats, int N, int C, cudaStream_t stream);
size_t scalar_head_backward_scratch_floats(int N, int C);

// ---- attention.cu -----------------------------------------------------------------------------
// Causal flash attention with grouped key/value heads over the packed qkv (B, T, (NH + 2 NKV) HS), each
// row [q: NH heads | k: NKV heads | v: NKV heads]; query head h attends with key/value head h / (NH / NKV)
// (NKV divides NH; NKV == NH is GPT-2's multi-head qkv (B, T, 3C)). out (B, T, NH HS) has query head h in
// columns h*HS..(h+1)*HS; lse (B, NH, T) is the natural-log logsumexp of each row of scaled scores (scale
// 1/sqrt(HS)). HS in {64, 128}.
void attention_forward(bf16* out, float* lse, const bf16* qkv, int B, int T, int NH, int NKV, int HS,
                       cudaStream_t stream);
// dqkv (qkv's layout) overwritten with [dq | dk | dv]; dk, dv of a key/value head are the sums over the
// query heads of its group, in a fixed order (deterministic: no atomics). dout_head_dot: D (B, NH, T) fp32 =
// rowsum(dout * out) per head, precomputed (matmul_backward's dinp_head_dot); null: computed here into the scratch
// (attention_backward_preprocess), which then needs B * NH * T floats more. dqkv_bias ((NH + 2 NKV) HS bf16, if
// not null) += the column sums of dqkv as stored (the qkv projection's bias gradient, bias_backward's semantics: fp32
// sums in a fixed order, one bf16 rounding): on Hopper summed by the backward kernel itself, elsewhere bias_backward
void attention_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                        float* scratch, size_t scratch_floats, int B, int T, int NH, int NKV, int HS,
                        cudaStream_t stream, const float* dout_head_dot = nullptr, bf16* dqkv_bias = nullptr);
size_t attention_backward_scratch_floats(int B, int T, int NH, int HS);
// D[b, h, t] = sum over head h's HS columns of dout[b, t] * out[b, t] (both (B, T, NH HS) bf16, 16-byte aligned),
// fp32 (B, NH, T): the attention backward's first step
void attention_backward_preprocess(float* D, const bf16* dout, const bf16* out, int B, int T, int NH, int HS,
                                   cudaStream_t stream);
// Which kernels run: 0 (default) picks the Hopper wgmma/TMA kernels (attention_sm90.cu) on compute
// capability 9.x where they were built and support the shape, else the mma.sync kernels; 1 forces the
// mma.sync kernels (for comparisons); 2 the Hopper forward with the mma.sync backward.
// attention_backend_in_use says what would run now: (90 or 80 for the forward) + (9000 or 8000 for the backward).
void attention_set_backend(int backend);
int attention_backend_in_use(int B, int T, int NH, int HS);
// the variant of the Hopper forward (attention_sm90.h: 0 or 1) attention_forward runs when it runs that kernel;
// -1 (the default): the fastest measured per head size. For tests and benchmarks of the variants.
void attention_set_sm90_forward_variant(int variant);

// ---- decode_attention.cu ----------------------------------------------------------------------
// The KV-cache decoders' attention: for each of B sequences, the query heads of its last cached position
// n-1 against its keys and values of positions 0..n-1, in the packed layout of attention_forward (rows
// of (NH + 2 NKV) HS: [q | k | v], query head h reading key/value head h / (NH / NKV)); sequence b's rows
// start at qkv + b * seq_stride (elements, >= n rows). out (B, NH HS) bf16: softmax(q k^T / sqrt(HS)) v
// in fp32. HS in 1..256; n at most ~12K (48 KB of shared memory) without opting in, ~50K with.
void decode_attention(bf16* out, const bf16* qkv, long long seq_stride, int B, int n, int NH, int NKV, int HS,
                      cudaStream_t stream);

// ---- sample.cu ----------------------------------------------------------------------------------
// One token per row of logits (B, Vp) bf16 (the first V columns): greedy (temperature 0: the first argmax,
// logprob 0) or drawn by inverse CDF with the host's uniform draw uniforms[b] in [0, 1) from
// softmax(logits / temperature), restricted to the values >= the top_k-th largest when 0 < top_k < V
// (top_k 0: no restriction); logprobs[b] = the token's log-probability under that distribution (fp32).
void sample_logits(int* tokens, float* logprobs, const bf16* logits, const float* uniforms, int B, int V, int Vp,
                   float temperature, int top_k, cudaStream_t stream);

// ---- matmul.cu (cuBLASLt; gemm_sm90.cu on Hopper) ---------------------------------------------
// out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (bias may be null);
// gelu_pre != null: gelu_pre = that, out = gelu(gelu_pre)   (GELU_AUX epilogue)
// residual != null (not with gelu_pre): out = that + residual (N, OC), one rounding; residual may be out itself
void matmul_forward(bf16* out, bf16* gelu_pre, const bf16* inp, const bf16* weight, const bf16* bias,
                    const bf16* residual, int N, int C, int OC, cudaStream_t stream);
// dinp = dout @ weight, times gelu'(dinp_gelu_pre) when that is non-null (DGELU epilogue);
// dweight += dout^T @ inp; dbias += colsum(dout) when dbias is non-null; dinp_gelu_dbias += colsum(dinp) when
// non-null (with dinp_gelu_pre: the gradient of the bias inside dinp_gelu_pre, e.g. GPT-2's fc bias; on Hopper
// from the GEMM's epilogue, elsewhere by bias_backward on dinp). dinp_head_dot (with dinp, not with
// dinp_gelu_pre): also D (N / T, C / head_size, T) fp32 = the attention backward's rowsum(dinp * head_dot_with) per
// head of head_size (64 or 128) columns, from dinp as stored (bf16), head_dot_with (N, C) bf16 (attention's
// output), N = B * T rows: in the GEMM's epilogue on Hopper, else by attention_backward_preprocess after it.
// scratch: at least matmul_backward_scratch_floats(N, C, OC, dbias != null, dinp and (dinp_gelu_pre or
// dinp_head_dot) != null, dinp_gelu_dbias != null) floats. gelu_of_pre (with dinp and dinp_gelu_pre; 16-byte aligned,
// not aliasing them): gelu(dinp_gelu_pre) written there before dweight reads inp (which may be it): the forward's
// activation recomputed (recompute >= 1) from the pre the DGELU reads anyway, on Hopper in the same GEMM's epilogue
// (elsewhere by gelu_forward); the same bits as gelu_forward's.
void matmul_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp, const bf16* weight,
                     const bf16* dinp_gelu_pre, bf16* dinp_gelu_dbias, float* scratch, size_t scratch_floats, int N,
                     int C, int OC, cudaStream_t stream, float* dinp_head_dot = nullptr,
                     const bf16* head_dot_with = nullptr, int head_size = 0, int T = 0, bf16* gelu_of_pre = nullptr);
// floats of scratch matmul_backward needs: the bias gradient's partial sums (with dbias), the weight transposed
// (with the DGELU or head-dot epilogue, dgelu true: Hopper's kernel takes it K-major) followed by dinp's column
// sums per row tile (with dgelu_dbias), or dinp's bias_backward partials (dgelu_dbias off Hopper); the largest, as
// they are used one after the other. Asked for on every GPU, so the size depends on the shapes alone.
size_t matmul_backward_scratch_floats(int N, int C, int OC, bool dbias, bool dgelu, bool dgelu_dbias);
// The algorithm of each GEMM shape is chosen at its first call (matmul.cu's header: timed among the
// heuristic's candidates, recorded in the GPT2CU_GEMM_CACHE file). mode 1: tuned (the default;
// GPT2CU_GEMM_TUNE=0 starts at 0), 0: the heuristic's first, -1: only asks. Returns the mode before.
// Later first calls use the new mode; plans made under the other mode stay for their shapes.
int matmul_set_tuning(int mode);
// whether matmul's Hopper kernels (gemm_sm90.cu) run on the current device: a build with sm_90, compute capability
// 9.x, matmul_set_sm90 on
bool matmul_sm90_active();
// One line per algorithm choice made in this process: cache key <TAB> how it was chosen.
std::string matmul_tuning_report();
// Hopper: 1 runs matmul_forward's GeLU-epilogue and residual GEMMs and matmul_backward's DGELU and head-dot ones on
// gemm_sm90.cu's kernel where they fit (matmul.cu's header), 0 on cuBLASLt (the head dot by the attention
// preprocess); -1 only asks.
// The default is 1 unless GPT2CU_SM90_GEMM=0; a build without sm_90 runs cuBLASLt either way. Returns the setting
// before. For benchmarks and tests.
int matmul_set_sm90(int mode);
// Hopper: the CTAs of a cluster sharing gemm_sm90.cu's weight loads, 1 or 2 (gemm_sm90.h; -1 only asks). A build
// without sm_90 has none and returns 1. For benchmarks and tests.
int matmul_set_sm90_cluster(int size);

// ---- adamw.cu ---------------------------------------------------------------------------------
// Per-step values, read from DEVICE memory so one captured graph serves every step.
struct AdamWScalars {
    float lr;
    float grad_scale;        // multiplies the gradient (clipping), 1 when no clipping
    float beta1_correction;  // 1 - beta1^t
    float beta2_correction;  // 1 - beta2^t
    unsigned int seed;       // stochastic rounding seed for this step
    unsigned int skip;       // nonzero: the update leaves everything as it is (a non-finite norm or loss)
    unsigned int pad[2];
};
// AdamW on n elements (a tensor, or a ZeRO shard of one):
//   g = grads*grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
//   w = w - lr * (m/b1c / (sqrt(v/b2c) + eps) + weight_decay * w)
// w is master (fp32) when master != null, else params itself; params (bf16) gets w rounded stochastically,
// hashing (seed, rounding_salt, element index): distinct salts (one per tensor) give independent dither.
void adamw_update(bf16* params, float* master, const bf16* grads, float* m, float* v, size_t n,
                  const AdamWScalars* scalars, float beta1, float beta2, float eps, float weight_decay,
                  unsigned int rounding_salt, cudaStream_t stream);
// The same on fp32 params with fp32 gradients and no master copy (params are w).
void adamw_update(float* params, const float* grads, float* m, float* v, size_t n, const AdamWScalars* scalars,
                  float beta1, float beta2, float eps, float weight_decay, cudaStream_t stream);
// The step's scalars written on the device from the gradients' global norm, with no host read in between:
//   norm = sqrt(norm_squared[0]); grad_scale = max_norm / norm if norm > max_norm else 1 (in double, rounded once:
//   the host's clip_scale bit for bit); skip = norm or loss[0] (when loss is not null) not finite.
// lr, the corrections and the seed are the host's, as adamw_scalars writes them. One thread.
void adamw_scalars_clipped(AdamWScalars* out, float lr, float beta1_correction, float beta2_correction,
                           unsigned int seed, const float* norm_squared, const float* loss, double max_norm,
                           cudaStream_t stream);

// ---- global_norm.cu ---------------------------------------------------------------------------
// out[0] = sum of squares of grads[0..n) in fp32, deterministic (fixed block partials + one final pass)
void global_norm_squared(float* out, const bf16* grads, size_t n, float* scratch, size_t scratch_floats,
                         cudaStream_t stream);
size_t global_norm_scratch_floats(size_t n);

// ---- rows.cu ----------------------------------------------------------------------------------
// rows of C bf16 by a list of K distinct row indices: out[k] = src[index[k]] / out[index[k]] = src[k]
void gather_rows(bf16* out, const bf16* src, const int* index, int K, int C, cudaStream_t stream);
void scatter_rows(bf16* out, const bf16* src, const int* index, int K, int C, cudaStream_t stream);

// ---- convert.cu -------------------------------------------------------------------------------
void bf16_to_float(float* out, const bf16* inp, size_t n, cudaStream_t stream);
void float_to_bf16(bf16* out, const float* inp, size_t n, cudaStream_t stream);  // round to nearest even
void bf16_accumulate(bf16* out, const bf16* x, size_t n, cudaStream_t stream);  // out += x in fp32, rounded
void bf16_accumulate(bf16* out, const float* x, size_t n, cudaStream_t stream);  // the same, x fp32

// ---- transpose.cu -----------------------------------------------------------------------------
// out (cols, rows) = inp (rows, cols)^T, exact (16-bit elements moved); out must not alias inp
void bf16_transpose(bf16* out, const bf16* inp, int rows, int cols, cudaStream_t stream);
