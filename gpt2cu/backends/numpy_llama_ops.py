"""The numpy reference ops of the LLaMA family: RMSNorm, RoPE, SwiGLU, the token embedding, and the key/value
head repetition (and its transpose) that numpy_ops.attention_forward_gqa / attention_backward_gqa wrap GPT-2's
attention in, in the contract of numpy_ops.py (outputs first, written in place, "+=" where gradients accumulate,
computed in the dtype of the inputs). The correctness bar is Hugging Face transformers' LlamaForCausalLM,
so its conventions are the ones followed here:

- RMSNorm: out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) (no mean subtraction, no bias).
- RoPE pairs channel i of a head with channel i + HS/2 (transformers' rotate_half), not the interleaved
  pairs (2i, 2i+1) of Meta's reference code: weights from Meta's layout (llm.c's LLaMA files) need the rows
  of their q and k projections permuted, as transformers' conversion script does.
- SwiGLU's input is one (..., 2H) tensor [gate | up]: the MLP's first matmul stacks gate_proj's rows (Meta's
  w1) on top of up_proj's rows (w3).
- Query head h reads key/value head h // (NH / NKV) (transformers' repeat_kv).

The packed qkv layout is (B, T, (NH + 2 NKV) * HS) = [q heads | k heads | v heads], GPT-2's (B, T, 3C) when
NKV = NH.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np



def _rows(a):
    return a.reshape(-1, a.shape[-1])


# ---- RMSNorm ------------------------------------------------------------------------------------
def rmsnorm_forward(out, rstd, inp, weight, eps):
    rs = 1.0 / np.sqrt((inp * inp).mean(axis=-1, keepdims=True) + eps)
    out[...] = inp * rs * weight
    rstd[...] = rs[..., 0]


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd):
    """xhat = x * rstd depends on x through rstd too: dx = rstd * (dxhat - xhat * mean(dxhat * xhat))."""
    rs = rstd[..., None].astype(inp.dtype)
    xhat = inp * rs
    dxhat = dout * weight
    dinp += rs * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dweight += (_rows(dout) * _rows(xhat)).sum(axis=0)


# ---- RoPE ---------------------------------------------------------------------------------------
class RopeScaling(NamedTuple):
    """Llama 3.1's frequency scaling (transformers' rope_type "llama3"): wavelengths longer than
    original_max_position / low_freq_factor are stretched by `factor`, those shorter than
    original_max_position / high_freq_factor kept, and the ones between interpolated smoothly."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


LLAMA31_SCALING = RopeScaling()


def _inverse_frequencies(head_dim, theta, scaling):
    """theta^(-2i/HS) for i < HS/2, in float32 as transformers computes them, to the bit: positions multiply
    these, so at position 1000 one float32 ulp of difference here would already be ~1e-4 rad."""
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
    inv_freq = f32(1.0) / (float(theta) ** exponent.astype(np.float64)).astype(f32)  # torch's pow: double, rounded
    if scaling is None:
        return inv_freq
    low_wavelen = f32(scaling.original_max_position / scaling.low_freq_factor)
    high_wavelen = f32(scaling.original_max_position / scaling.high_freq_factor)
    # torch evaluates scalar / tensor as reciprocal(tensor) * scalar, which rounds twice
    wavelen = (f32(1.0) / inv_freq) * f32(2 * math.pi)
    stretched = np.where(wavelen > low_wavelen, inv_freq / f32(scaling.factor), inv_freq)
    smooth = (((f32(1.0) / wavelen) * f32(scaling.original_max_position) - f32(scaling.low_freq_factor))
              / f32(scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (f32(1.0) - smooth) * stretched / f32(scaling.factor) + smooth * stretched
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(between, smoothed, stretched)


def rope_tables(head_dim, T, theta, scaling=None):
    """cos and sin of the rotation angles, float32 (T, HS/2): angle[t, i] = t * inv_freq[i], for positions
    0..T-1 (decoding at position p uses rows p.. of a longer table). scaling: None or a RopeScaling
    (LLAMA31_SCALING for Llama 3.1). The angle is the float32 product, as transformers computes it."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    angles = np.arange(T, dtype=np.float32)[:, None] * _inverse_frequencies(head_dim, theta, scaling)
    return np.cos(angles), np.sin(angles)


def rope_forward(out, inp, cos, sin, n_head, n_kv_head):
    """out = inp (B, T, (NH + 2 NKV) HS) with q and k rotated: for channel i < HS/2 of a head at position t,
    (x_i, x_{i+HS/2}) -> (x_i cos - x_{i+HS/2} sin, x_{i+HS/2} cos + x_i sin); v copied. out may be inp
    (the model rotates its qkv buffer in place). cos, sin: rope_tables' (T, HS/2)."""
    B, T, width = inp.shape
    head_dim = width // (n_head + 2 * n_kv_head)
    qk_width = (n_head + n_kv_head) * head_dim
    heads = inp[..., :qk_width].reshape(B, T, n_head + n_kv_head, head_dim)
    first, second = heads[..., :head_dim // 2], heads[..., head_dim // 2:]
    c, s = cos[:, None, :].astype(inp.dtype), sin[:, None, :].astype(inp.dtype)
    rotated = np.concatenate([first * c - second * s, second * c + first * s], axis=-1)  # a new array
    out[..., :qk_width] = rotated.reshape(B, T, qk_width)
    out[..., qk_width:] = inp[..., qk_width:]


def rope_backward(dinp, dout, cos, sin, n_head, n_kv_head):
    """dinp = the rotation's transpose (the rotation by minus the angle) applied to dout; dv copied.
    Overwrites dinp, which may be dout."""
    rope_forward(dinp, dout, cos, -sin, n_head, n_kv_head)


# ---- SwiGLU -------------------------------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gate_up(inp):
    hidden = inp.shape[-1] // 2
    return inp[..., :hidden], inp[..., hidden:]


def swiglu_forward(out, inp):
    """out (..., H) = silu(gate) * up for inp (..., 2H) = [gate | up]; silu(g) = g * sigmoid(g)."""
    gate, up = _gate_up(inp)
    out[...] = gate * _sigmoid(gate) * up


def swiglu_backward(dinp, dout, inp):
    """dinp (..., 2H) = [dgate | dup] overwritten: dgate = dout * up * silu'(gate), dup = dout * silu(gate),
    silu'(g) = sig(g) (1 + g (1 - sig(g))). dinp may be inp (both sides are read before the write)."""
    gate, up = _gate_up(inp)
    sig = _sigmoid(gate)
    dinp[...] = np.concatenate([dout * up * sig * (1.0 + gate * (1.0 - sig)), dout * gate * sig], axis=-1)


# ---- attention with grouped key/value heads -----------------------------------------------------
def _split_qkv(qkv, n_head, n_kv_head):
    head_dim = qkv.shape[-1] // (n_head + 2 * n_kv_head)
    q_end, k_end = n_head * head_dim, (n_head + n_kv_head) * head_dim
    return qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:], head_dim


def repeat_kv(qkv, n_head, n_kv_head):
    """The GPT-2 layout (B, T, 3 NH HS) in which every key/value head is repeated for each of the
    NH / NKV query heads it serves (head h of the copy is kv head h // group)."""
    if n_head % n_kv_head:
        raise ValueError(f"n_kv_head {n_kv_head} does not divide n_head {n_head}")
    q, k, v, head_dim = _split_qkv(qkv, n_head, n_kv_head)
    group = n_head // n_kv_head
    repeat = lambda x: np.repeat(x.reshape(*x.shape[:-1], n_kv_head, head_dim), group, axis=-2).reshape(  # noqa: E731
        *x.shape[:-1], n_head * head_dim)
    return np.concatenate([q, repeat(k), repeat(v)], axis=-1)


def sum_kv_groups(dqkv_repeated, n_head, n_kv_head):
    """The transpose of repeat_kv (deterministic): each key/value head's gradient is the sum over its group's copies."""
    head_dim = dqkv_repeated.shape[-1] // (3 * n_head)
    group = n_head // n_kv_head
    dq, dk, dv = np.split(dqkv_repeated, 3, axis=-1)
    fold = lambda d: d.reshape(*d.shape[:-1], n_kv_head, group, head_dim).sum(axis=-2).reshape(  # noqa: E731
        *d.shape[:-1], n_kv_head * head_dim)
    return np.concatenate([dq, fold(dk), fold(dv)], axis=-1)


# ---- token embedding (no position embedding) --------------------------------------------------
def embedding_forward(out, tokens, wte):
    out[...] = wte[tokens]


def embedding_backward(dwte, dout, tokens):
    # np.add.at: a token repeated in the batch adds once per occurrence
    np.add.at(dwte, tokens.reshape(-1), _rows(dout))
