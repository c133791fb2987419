"""The numpy backend: the ops of docs/architecture.md written as plain, vectorized array math.

This file is the oracle: every CUDA kernel is tested against these functions, and the model schedule is
tested through them against PyTorch. So clarity and exactness come before speed. Each op computes in
the dtype of its inputs (float32 in use, float64 in the finite-difference tests) and writes its outputs
in place (`out[...] = ...`), accumulating where the contract says "+=".

Activations are (..., C) arrays (N = B*T rows once flattened); weights are (OC, C) with y = x @ W.T + b.
Constants are Python floats so that, under NumPy 2's promotion rules, they never upcast float32 math.
"""
from __future__ import annotations

import math
import resource

import numpy as np

from ..optim import clip_scale, norm_from_squared
from . import numpy_llama_ops
from .base import POLICY_TERMS, VALUE_TERMS, Backend, Batch

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def _rows(a):
    """(..., C) -> (N, C) for reading: outputs are always written through the caller's array itself."""
    return a.reshape(-1, a.shape[-1])


def zero_(arr):
    arr[...] = 0


def accumulate(out, x):
    out += x


def gather_rows(out, src, index):
    """out[k] = src[index[k]]: rows of the last dimension, (K, C) from (N, C) (an LM head on listed positions)."""
    out[...] = _rows(src)[index]


def scatter_rows(out, src, index):
    """out[index[k]] = src[k], the indices distinct: gather_rows' inverse on the listed rows."""
    out.reshape(-1, out.shape[-1])[index] = src


# ---- encoder ------------------------------------------------------------------------------------
def encoder_forward(out, tokens, wte, wpe):
    out[...] = wte[tokens] + wpe


def encoder_backward(dwte, dwpe, dout, tokens):
    # np.add.at, not fancy-index +=: a token repeated in the batch must add once per occurrence
    np.add.at(dwte, tokens.reshape(-1), _rows(dout))
    dwpe += dout.sum(axis=0)


# ---- layernorm ----------------------------------------------------------------------------------
def layernorm_forward(out, mean, rstd, inp, weight, bias):
    mu = inp.mean(axis=-1, keepdims=True)
    xc = inp - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance, as nn.LayerNorm
    rs = 1.0 / np.sqrt(var + LN_EPS)
    out[...] = xc * rs * weight + bias
    mean[...] = mu[..., 0]
    rstd[...] = rs[..., 0]


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, dinp_sum=None):
    rs = rstd[..., None].astype(inp.dtype)
    xhat = (inp - mean[..., None].astype(inp.dtype)) * rs
    dnorm = dout * weight
    dinp += rs * (dnorm - dnorm.mean(axis=-1, keepdims=True) - xhat * (dnorm * xhat).mean(axis=-1, keepdims=True))
    dweight += (_rows(dout) * _rows(xhat)).sum(axis=0)
    dbias += _rows(dout).sum(axis=0)
    if dinp_sum is not None:  # the residual stream's gradient summed over rows: a projection's bias gradient
        dinp_sum += _rows(dinp).sum(axis=0)


# ---- GeLU (tanh form) ---------------------------------------------------------------------------
def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x)))


def _gelu_grad(x):
    t = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)


def gelu_forward(out, inp):
    out[...] = _gelu(inp)


def gelu_backward(dinp, dout, inp):
    # the right side is evaluated before the write, so dinp may alias dout
    dinp[...] = dout * _gelu_grad(inp)


# ---- matmul -------------------------------------------------------------------------------------
def matmul_forward(out, inp, weight, bias=None, gelu_pre=None, residual=None):
    if residual is not None and gelu_pre is not None:
        raise ValueError("matmul_forward: residual and gelu_pre cannot both be given")
    y = _rows(inp) @ weight.T
    if bias is not None:
        y += bias
    y = y.reshape(out.shape)
    if residual is not None:  # y is a new array: residual may be out
        y += residual
    if gelu_pre is None:
        out[...] = y
    else:
        gelu_pre[...] = y
        out[...] = _gelu(y)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, dinp_gelu_pre=None, dinp_gelu_dbias=None,
                    dinp_head_dot=None, head_dot_with=None, gelu_of_pre=None):
    if gelu_of_pre is not None:  # the forward's activation recomputed, before dweight reads inp (which may be it)
        gelu_of_pre[...] = _gelu(dinp_gelu_pre)
    d2 = _rows(dout)
    dweight += d2.T @ _rows(inp)
    if dbias is not None:
        dbias += d2.sum(axis=0)
    dx = (d2 @ weight).reshape(dinp.shape)
    if dinp_gelu_pre is not None:
        dx *= _gelu_grad(dinp_gelu_pre)
    dinp[...] = dx
    if dinp_gelu_dbias is not None:  # the sum of the stored dinp, as the next layer's dbias would take it
        dinp_gelu_dbias += _rows(dinp).sum(axis=0)
    if dinp_head_dot is not None:  # (B, NH, T): the attention backward's D, from dinp as stored
        B, n_head, T = dinp_head_dot.shape
        dinp_head_dot[...] = head_dot(dinp.reshape(B, T, -1), head_dot_with.reshape(B, T, -1), n_head)


# ---- attention ----------------------------------------------------------------------------------
def _to_heads(x, n_head):
    """(B, T, C) -> (B, H, T, hs): head h is columns h*hs..(h+1)*hs."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _from_heads(x):
    """(B, H, T, hs) -> (B, T, H*hs)."""
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def _causal_scores(qkv, n_head):
    """q, k, v as (B, H, T, hs), the masked scaled scores (B, H, T, T) and the scale."""
    C = qkv.shape[-1] // 3
    q, k, v = (_to_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))
    scale = 1.0 / math.sqrt(C // n_head)
    T = qkv.shape[1]
    s = np.where(np.tri(T, dtype=bool), (q @ k.swapaxes(-1, -2)) * scale, -np.inf)
    return q, k, v, s, scale


def attention_forward(out, lse, qkv, n_head):
    _, _, v, s, _ = _causal_scores(qkv, n_head)
    m = s.max(axis=-1, keepdims=True)  # finite: the diagonal is never masked
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    out[...] = _from_heads((e / total) @ v)
    lse[...] = (m + np.log(total))[..., 0]


def head_dot(x, y, n_head):
    """(B, H, T): the dot products of x's and y's (B, T, C) rows head by head (the attention backward's D from dO
    and O)."""
    return (_to_heads(x, n_head) * _to_heads(y, n_head)).sum(axis=-1)


def attention_backward(dqkv, dout, qkv, out, lse, n_head, dout_head_dot=None, dqkv_bias=None):
    """dout_head_dot: head_dot(dout, out) already computed (matmul_backward's dinp_head_dot), or None; dqkv_bias: the
    qkv projection's bias gradient, += the column sums of dqkv (as matmul_backward's dbias would take them)."""
    q, k, v, s, scale = _causal_scores(qkv, n_head)
    do = _to_heads(dout, n_head)
    d = head_dot(dout, out, n_head) if dout_head_dot is None else dout_head_dot
    # P from the saved lse, as the flash kernel recomputes it; masked entries are exp(-inf) = 0
    p = np.exp(s - lse[..., None].astype(s.dtype))
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.swapaxes(-1, -2)
    # softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O) = D
    ds = p * (dp - d[..., None])
    dq = (ds @ k) * scale
    dk = (ds.swapaxes(-1, -2) @ q) * scale
    dqkv[...] = np.concatenate([_from_heads(dq), _from_heads(dk), _from_heads(dv)], axis=-1)
    if dqkv_bias is not None:
        dqkv_bias += _rows(dqkv).sum(axis=0)


# ---- classifier ---------------------------------------------------------------------------------
def attention_forward_gqa(out, lse, qkv, n_head, n_kv_head):
    """Causal attention over the LLaMA family's packed qkv (B, T, (NH + 2 NKV) HS); out (B, T, NH HS), lse
    (B, NH, T). Each key/value head serves NH / NKV consecutive query heads (numpy_llama_ops.repeat_kv)."""
    attention_forward(out, lse, numpy_llama_ops.repeat_kv(qkv, n_head, n_kv_head), n_head)


def attention_backward_gqa(dqkv, dout, qkv, out, lse, n_head, n_kv_head, dout_head_dot=None, dqkv_bias=None):
    """dqkv (B, T, (NH + 2 NKV) HS) overwritten; dK and dV of a key/value head summed over its group; dqkv_bias as
    attention_backward's."""
    repeated = numpy_llama_ops.repeat_kv(qkv, n_head, n_kv_head)
    drepeated = np.empty_like(repeated)
    attention_backward(drepeated, dout, repeated, out, lse, n_head, dout_head_dot)
    dqkv[...] = numpy_llama_ops.sum_kv_groups(drepeated, n_head, n_kv_head)
    if dqkv_bias is not None:
        dqkv_bias += _rows(dqkv).sum(axis=0)


def decode_attention(out, qkv, n_head, n_kv_head):
    """The KV-cache decoders' attention: out (R, 1, n_head * hs) = each of R sequences' last position's query
    heads against its cached rows 0..n-1, qkv (R, n, (NH + 2 NKV) hs) = [q | k | v]; query head h reads
    key/value head h // (NH / NKV); scale 1/sqrt(hs), softmax over the n positions."""
    R, n, width = qkv.shape
    hs = width // (n_head + 2 * n_kv_head)
    q_width, kv_width = n_head * hs, n_kv_head * hs
    q = qkv[:, n - 1, :q_width].reshape(R, n_kv_head, n_head // n_kv_head, hs)
    keys = qkv[:, :, q_width:q_width + kv_width].reshape(R, n, n_kv_head, hs).transpose(0, 2, 3, 1)  # (R, KV, hs, n)
    values = qkv[:, :, q_width + kv_width:].reshape(R, n, n_kv_head, hs).transpose(0, 2, 1, 3)  # (R, KV, n, hs)
    s = (q @ keys) * (1.0 / math.sqrt(hs))  # (R, KV, NH/KV, n)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    out[...] = ((e / e.sum(axis=-1, keepdims=True)) @ values).reshape(out.shape)


def sample_logits(tokens, logprobs, logits, uniforms, vocab_size, temperature, top_k=None):
    """One token per row of logits (R, ..., Vp) (its first vocab_size columns) and its log-probability under
    the sampling distribution, into tokens (R,) and logprobs (R,). temperature 0: the argmax (log-probability
    0); else inverse-CDF sampling at the host's draw uniforms[r] in [0, 1) from softmax(logits / temperature),
    restricted by top_k (None: all) to the values >= the row's top_k-th largest: the first token whose
    cumulative (unnormalized) mass exceeds uniforms[r] times the total, never one of probability 0. float64."""
    x = logits.reshape(len(tokens), -1)[:, :vocab_size]
    if temperature == 0:
        tokens[...] = x.argmax(axis=-1)
        logprobs[...] = 0.0
        return
    # the host's per-token cost in a numpy rollout (R x V doubles): as few passes over them as possible
    z = x.astype(np.float64)
    z /= temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k:].min(axis=-1, keepdims=True)
        z[z < kth] = -np.inf
    z -= z.max(axis=-1, keepdims=True)
    cdf = np.exp(z)
    np.cumsum(cdf, axis=-1, out=cdf)
    total = cdf[:, -1]
    picked = np.array([np.searchsorted(row, u * t, side="right") for row, u, t in zip(cdf, uniforms, total)])
    picked = np.minimum(picked, z.shape[1] - 1)
    tokens[...] = picked
    logprobs[...] = z[np.arange(len(z)), picked] - np.log(total)


def policy_weights(logp, terms, clip, xp=np):
    """(weights, clipped) per row of a policy-gradient loss on log p = logp (fused_classifier's policy),
    arrays of the array module xp (numpy, or CuPy where PPO counts the clipped rows on the device):
    terms (..., 4) rows [old log p, advantage A, reference log p, KL coefficient k] and the loss
        -min(r A, clip(r, 1 - clip, 1 + clip) A) + k (q - log q - 1),  r = exp(log p - old), q = exp(ref - log p)
    (PPO's clipped surrogate; GRPO's KL estimator, k = 0 for PPO). The weight is -d loss / d log p: r A where
    the unclipped term is the smaller (`clipped` marks the others, weight 0 there), minus k (1 - q)."""
    old, adv, ref, kl = (terms[..., i] for i in range(POLICY_TERMS))
    ratio = xp.exp(logp - old)
    clipped = ((adv > 0) & (ratio > 1.0 + clip)) | ((adv < 0) & (ratio < 1.0 - clip))
    with np.errstate(over="ignore"):  # q of a row with k = 0 is never used (CuPy does not warn)
        kl_grad = xp.where(kl != 0, kl * (1.0 - xp.exp(ref - logp)), 0.0)
    return xp.where(clipped, 0.0, ratio * adv) - kl_grad, clipped


def fused_classifier(losses, logits, targets, dloss, vocab_size, policy=None, entropy=None):
    valid = targets >= 0
    safe_t = np.where(valid, targets, 0)[..., None]  # an in-range index for masked rows, zeroed below
    # one (N, V) temporary, reused from shifted logits to exp to probabilities: V is 50257 in real use
    z = logits[..., :vocab_size] - logits[..., :vocab_size].max(axis=-1, keepdims=True)
    picked = np.take_along_axis(z, safe_t, axis=-1)[..., 0]
    if entropy is not None:  # -sum p log p = log(total) - sum p z, with z the shifted logits
        exp_z = np.exp(z)
        total = exp_z.sum(axis=-1)
        entropy[...] = np.where(valid, np.log(total) - (exp_z * z).sum(axis=-1) / total, 0.0)
    probs = np.exp(z, out=z)
    total = probs.sum(axis=-1, keepdims=True)
    row_losses = np.where(valid, np.log(total[..., 0]) - picked, 0.0)
    losses[...] = row_losses
    if dloss == 0:  # eval: the logits stay
        return
    probs /= total
    np.put_along_axis(probs, safe_t, np.take_along_axis(probs, safe_t, axis=-1) - 1.0, axis=-1)
    probs *= dloss
    if policy is not None:  # per-row weights on -log p(target) from each row's log p
        probs *= policy_weights(-row_losses, policy.terms, policy.clip)[0][..., None]
    probs[~valid] = 0.0
    logits[..., :vocab_size] = probs
    logits[..., vocab_size:] = 0.0


def lm_head_loss(losses, dhidden, dweight, logits, hidden, weight, targets, dloss, vocab_size):
    """The LM head and its cross-entropy as the three ops: logits = hidden @ weight.T, the fused classifier (logits
    become dlogits), dhidden = dlogits @ weight and dweight += dlogits^T @ hidden."""
    matmul_forward(logits, hidden, weight)
    fused_classifier(losses, logits, targets, dloss, vocab_size)
    if dloss:
        matmul_backward(dhidden, dweight, None, logits, hidden, weight)


def clipped_value_loss(values, terms, clip):
    """(loss, d loss / d values) per row of PPO's clipped value loss 0.5 max((v - R)^2, (v_clipped - R)^2),
    v_clipped = old + clip(v - old, -clip, clip), terms (..., 3) rows [old value, return R, weight] (the
    weight is not applied here). The gradient is that of the larger square (the clipped one's is 0
    outside the clip range)."""
    old, ret = terms[..., 0], terms[..., 1]
    v_clipped = old + np.clip(values - old, -clip, clip)
    plain, clipped = (values - ret) ** 2, (v_clipped - ret) ** 2
    grad = np.where(plain >= clipped, values - ret, (v_clipped - ret) * (np.abs(values - old) < clip))
    return 0.5 * np.maximum(plain, clipped), grad


def scalar_head_forward(values, losses, inp, head, value_loss=None):
    """values = inp . head[:C] + head[C] per row; with value_loss (base.ValueLoss): losses = weight * its
    loss per row, and values overwritten by scale * weight * d loss / d value (scalar_head_backward's
    dvalues)."""
    C = inp.shape[-1]
    v = inp @ head[:C] + head[C]
    if value_loss is None:
        values[...] = v
        return
    terms = value_loss.terms.reshape(v.shape + (VALUE_TERMS,))
    loss, grad = clipped_value_loss(v, terms, value_loss.clip)
    weight = terms[..., 2]
    losses[...] = weight * loss
    values[...] = value_loss.scale * weight * grad


def scalar_head_backward(dinp, dhead, dvalues, inp, head):
    """dinp += dvalues * head[:C] (each row); dhead += [sum over rows of dvalues * inp | sum of dvalues]."""
    C = inp.shape[-1]
    d = dvalues.reshape(-1, 1)
    dinp += (d * head[:C]).reshape(dinp.shape)
    dhead[:C] += (d * inp.reshape(-1, C)).sum(axis=0)
    dhead[C] += d.sum()


# ---- optimizer ----------------------------------------------------------------------------------
def global_norm_squared(grads):
    """Sum of squares of a flat buffer, accumulated in float64 chunk by chunk (no full-size float64
    copy), returned as a shape-(1,) array as the CUDA backend's device scalar is."""
    flat = grads.reshape(-1)
    chunk = 1 << 20
    total = 0.0
    for start in range(0, flat.size, chunk):
        c = flat[start:start + chunk].astype(np.float64)
        total += float(c @ c)
    return np.array([total], dtype=np.result_type(grads.dtype, np.float32))


def adamw_update(params, master, grads, m, v, scalars, beta1, beta2, eps, weight_decay, rounding_salt=0):
    """AdamW on one segment. scalars = NumpyBackend.adamw_scalars(...) (or _clipped); its seed and rounding_salt
    (how the GPU rounds bf16 params) are unused: fp32 params need no rounding. With master given (fp32 master weights), the
    update is applied to master and params receive a copy, as the kernel's contract says."""
    if scalars[5]:  # the step skipped (adamw_scalars_clipped: a non-finite norm or loss)
        return
    w = params if master is None else master
    dt = w.dtype.type
    lr, grad_scale, b1c, b2c = (dt(s) for s in scalars[:4])
    g = grads * grad_scale
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * (g * g)
    w -= lr * ((m / b1c) / (np.sqrt(v / b2c) + eps) + weight_decay * w)
    if master is not None:
        params[...] = master


class _ScalarsRead:
    """read_scalars_async's result on the host: the values, read already."""

    def __init__(self, values):
        self._values = values

    def values(self) -> list[float]:
        return list(self._values)


class NumpyBackend(Backend):
    """float32 host arrays for everything; the ops are the functions above."""
    name = "numpy"
    checkpoint_dtype = "fp32"
    xp = np
    kv_cache_attention = "query"  # decode_attention: one query against the cached keys

    # ---- buffers ----------------------------------------------------------------------------------
    def zeros(self, shape, fp32=False, param=False):
        return np.zeros(shape, dtype=np.float32)

    def upload_params(self, host_fp32, n, out=None):
        out = np.zeros(n, dtype=np.float32) if out is None else out
        out[:host_fp32.size] = host_fp32
        out[host_fp32.size:] = 0
        return out

    def to_numpy(self, a):
        return np.array(a, copy=True)

    def from_numpy(self, host, out=None):
        if out is None:
            return np.array(host, copy=True)
        out[...] = host
        return out

    def fp32_copy(self, a):
        return np.array(a, dtype=np.float32)

    def activation_to_fp32(self, a):
        return a.astype(np.float32, copy=False)

    def store_fp32(self, out, f32):
        out[...] = f32.reshape(out.shape)

    def synchronize(self):
        pass

    # ---- batches ------------------------------------------------------------------------------------
    def prepare_batch(self, inputs, targets=None):
        return Batch(np.ascontiguousarray(inputs, dtype=np.int32),
                     None if targets is None else np.ascontiguousarray(targets, dtype=np.int32))

    def upload_batch(self, prepared):
        return prepared

    # ---- running and reporting, trivial on the host ----------------------------------------------------
    def select_device(self, device):
        pass

    def graphed(self, fn, enabled=True):
        return fn  # nothing to capture on the host

    def mean_loss(self, losses) -> float:
        return float(losses.mean())

    mean_loss_async = mean_loss

    def read_scalars_async(self, *arrays):
        return _ScalarsRead([float(a[0]) for a in arrays])

    def loss_sum(self, pending):
        return np.array([sum(pending)], dtype=np.float64)

    def adamw_scalars(self, lr, step, grad_scale, seed, beta1, beta2):
        return np.array([lr, grad_scale, 1.0 - beta1 ** step, 1.0 - beta2 ** step, seed, 0], dtype=np.float64)

    def adamw_scalars_clipped(self, lr, step, seed, beta1, beta2, norm_squared, loss, max_norm):
        norm = norm_from_squared(norm_squared[0])
        finite = math.isfinite(norm) and (loss is None or math.isfinite(float(loss[0])))
        scalars = self.adamw_scalars(lr, step, clip_scale(norm, max_norm), seed, beta1, beta2)
        scalars[5] = 0 if finite else 1
        return scalars

    def device_name(self) -> str:
        return "CPU (numpy)"

    def mfu(self, flops_per_second):
        return None  # no meaningful peak for numpy

    def peak_memory(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    # ---- ops ---------------------------------------------------------------------------------------------
    zero_ = staticmethod(zero_)
    accumulate = staticmethod(accumulate)
    gather_rows = staticmethod(gather_rows)
    scatter_rows = staticmethod(scatter_rows)
    encoder_forward = staticmethod(encoder_forward)

    def encoder_backward(self, dwte, dwpe, dout, batch):
        encoder_backward(dwte, dwpe, dout, batch.tokens)

    layernorm_forward = staticmethod(layernorm_forward)
    layernorm_backward = staticmethod(layernorm_backward)
    matmul_forward = staticmethod(matmul_forward)
    matmul_backward = staticmethod(matmul_backward)
    gelu_forward = staticmethod(gelu_forward)
    gelu_backward = staticmethod(gelu_backward)
    attention_forward = staticmethod(attention_forward)
    attention_backward = staticmethod(attention_backward)
    fused_classifier = staticmethod(fused_classifier)
    lm_head_loss = staticmethod(lm_head_loss)
    scalar_head_forward = staticmethod(scalar_head_forward)
    scalar_head_backward = staticmethod(scalar_head_backward)

    # the LLaMA family's (numpy_llama_ops.py)
    embedding_forward = staticmethod(numpy_llama_ops.embedding_forward)

    def embedding_backward(self, dwte, dout, batch):
        numpy_llama_ops.embedding_backward(dwte, dout, batch.tokens)

    rmsnorm_forward = staticmethod(numpy_llama_ops.rmsnorm_forward)
    rmsnorm_backward = staticmethod(numpy_llama_ops.rmsnorm_backward)
    rope_forward = staticmethod(numpy_llama_ops.rope_forward)
    rope_backward = staticmethod(numpy_llama_ops.rope_backward)
    swiglu_forward = staticmethod(numpy_llama_ops.swiglu_forward)
    swiglu_backward = staticmethod(numpy_llama_ops.swiglu_backward)
    attention_forward_gqa = staticmethod(attention_forward_gqa)
    attention_backward_gqa = staticmethod(attention_backward_gqa)

    # the KV-cache decoders'
    decode_attention = staticmethod(decode_attention)
    sample_logits = staticmethod(sample_logits)

    global_norm_squared = staticmethod(global_norm_squared)
    adamw_update = staticmethod(adamw_update)
