"""Incremental decoding with a KV cache, written once over a backend's ops (numpy and CUDA).

    dec = KVCacheDecoder(model, capacity)   # model: a GPT (any B >= 1, T >= the prompt's length)
    logits = dec.prefill(prompt_tokens)     # one forward of `model`; keeps each layer's q, k, v rows
    logits = dec.step(token)                # one new position

The prefill is the model's own forward (row 0 holds the prompt, the other rows EOT, as sample.generate
always did); each layer's qkv rows of the prompt positions are copied out of acts["qkv"] into a cache of
`capacity` rows per layer, in the backend's activation dtype (bf16 bits on CUDA). A step then runs
model.forward's schedule on a single row (N = 1) through the same backend ops -- encoder, layernorm,
matmul (cuBLASLt on CUDA; the qkv matmul writes its row straight into the cache), fused residual +
layernorm, matmul with the GeLU epilogue, the tied LM head -- so every tensor goes through the same
kernels, in the same dtype, as in the full forward. Only attention differs, in one of two ways:

  "query"  (numpy's default): the one new query against the cached keys and values, plain float32
           array math (numpy, or CuPy on CUDA after widening the bf16 bits exactly, bits << 16, and
           rounding the output back to bf16 with the float_to_bf16 launcher): scale 1/sqrt(hs), softmax
           over positions 0..pos. O(pos * C) per layer, but ~15 small array operations.
  "kernel" (CUDA's default): the backend's own causal attention_forward over the cached rows 0..pos,
           keeping the last row. It recomputes the earlier rows' attention (O(pos^2 * C) per layer,
           microseconds on a GPU for GPT-2 lengths), but it is one launch, and the very computation the
           full forward does (its logits equal the full forward's bitwise in tests/test_gpu_sample.py).
           No new CUDA kernels either way.

Measured on an H100 (d12, B=1, greedy, prefill included): the cache with "kernel" attention 472 tok/s at
T=128 and 385 at T=1024, the full recompute 415 and 322, "query" attention ~120 (CuPy's per-operation
overhead). At this size a step is bound by host-side launches (~90 per token), not by the GPU; capturing
the step as a CUDA graph would be the next gain.

Positions are absolute and the cache never slides: a decoder holds `capacity` <= model.T positions, and
step() refuses to go past it. sample.generate switches to the windowed recompute at that point.
"""
from __future__ import annotations

import math

import numpy as np

from .config import GPT2_EOT


def supports_kv_cache(backend) -> bool:
    """Whether KVCacheDecoder runs on this backend (numpy and CUDA do)."""
    return getattr(backend, "name", None) in ("numpy", "cuda")


class _Arrays:
    """The few array operations the cached attention needs: the array module (numpy or cupy) and the
    conversions between the backend's activation dtype and float32."""

    def __init__(self, backend):
        self.backend = backend
        if backend.name == "cuda":
            import cupy
            from .backends.cuda_ops import ptr
            self.xp = cupy

            def to_f32(bits):  # bf16 bits -> float32, exact
                return (bits.astype(cupy.uint32) << 16).view(cupy.float32)

            def store(out, f32):  # float32 -> bf16 bits, round to nearest even
                f32 = cupy.ascontiguousarray(f32, dtype=cupy.float32)
                backend.k.float_to_bf16(ptr(out), ptr(f32), f32.size, backend.stream.ptr)
        else:
            self.xp = np

            def to_f32(a):
                return a.astype(np.float32, copy=False)

            def store(out, f32):
                out[...] = f32.reshape(out.shape)
        self.to_f32, self.store = to_f32, store


class KVCacheDecoder:
    """Decoding of one sequence over `model`'s parameters with cached keys and values."""

    ATTENTION = ("query", "kernel")

    def __init__(self, model, capacity: int | None = None, attention: str | None = None):
        cfg, ops = model.cfg, model.ops
        if not supports_kv_cache(ops):
            raise ValueError(f"no KV-cache decoding on the {getattr(ops, 'name', type(ops).__name__)} backend")
        capacity = model.T if capacity is None else capacity
        if not 1 <= capacity <= model.T:
            raise ValueError(f"KV cache capacity {capacity} must be in [1, {model.T}] (the model's T)")
        attention = attention or ("kernel" if ops.name == "cuda" else "query")
        if attention not in self.ATTENTION:
            raise ValueError(f"attention must be one of {self.ATTENTION}, got {attention!r}")
        self.model, self.ops, self.cfg, self.capacity, self.attention = model, ops, cfg, capacity, attention
        self.arr = _Arrays(ops)
        L, H, C, Vp = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.padded_vocab_size
        self.scale = 1.0 / math.sqrt(C // H)
        # the cache: acts["qkv"]'s rows 0..capacity-1 of row 0, per layer, in the activation dtype
        self.qkv = ops.zeros((L, 1, capacity, 3 * C))
        # one-row activations (separate allocations: aligned for the kernels)
        z = lambda *shape, fp32=False: ops.zeros((1, 1) + shape, fp32=fp32)
        self.a = {"encoded": z(C), "ln": z(C), "atty": z(C), "proj": z(C), "residual2": z(C),
                  "residual3": z(C), "fch": z(4 * C), "fch_gelu": z(4 * C), "lnf": z(C), "logits": z(Vp),
                  "mean": z(fp32=True), "rstd": z(fp32=True)}
        if attention == "kernel":  # attention_forward's outputs over up to `capacity` rows
            self.a["atty_all"] = ops.zeros((1, capacity, C))
            self.a["lse"] = ops.zeros((H * capacity,), fp32=True)  # viewed as (1, H, n) for n rows
        self.token = ops.from_numpy(np.zeros((1, 1), np.int32))
        self.pos = 0  # the number of cached positions

    # ---- prefill ---------------------------------------------------------------------------------
    def prefill(self, prompt_tokens) -> np.ndarray:
        """Runs the model's forward over the prompt (in row 0); returns the float32 host logits (first
        vocab_size columns) of its last position and caches every layer's qkv rows."""
        m, ops, cfg = self.model, self.ops, self.cfg
        P = len(prompt_tokens)
        if not 1 <= P <= self.capacity:
            raise ValueError(f"prompt of {P} tokens: the KV cache holds 1..{self.capacity} positions")
        inputs = np.full((m.B, m.T), GPT2_EOT, dtype=np.int32)
        inputs[0, :P] = prompt_tokens  # positions past P are never seen by positions < P (causal attention)
        tok, _ = ops.set_batch(inputs, np.zeros_like(inputs))
        m.forward(tok)
        with _on_stream(ops):
            self.qkv[:, 0, :P] = m.acts["qkv"][:, 0, :P]
        self.pos = P
        return ops.to_numpy(m.acts["logits"][0, P - 1, :cfg.vocab_size])

    # ---- one token -----------------------------------------------------------------------------------
    def step(self, token: int) -> np.ndarray:
        """Appends `token` at the next position; returns the float32 host logits (first vocab_size
        columns) that predict the position after it."""
        if self.pos >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.capacity} positions)")
        ops, p, a, cfg, pos = self.ops, self.model.p, self.a, self.cfg, self.pos
        L = cfg.n_layer
        ops.from_numpy(np.array([[token]], np.int32), out=self.token)
        ops.encoder_forward(a["encoded"], self.token, p["wte"], p["wpe"][pos:pos + 1])
        ops.layernorm_forward(a["ln"], a["mean"], a["rstd"], a["encoded"], p["ln1w"][0], p["ln1b"][0])
        for l in range(L):
            residual_in = a["encoded"] if l == 0 else a["residual3"]
            ops.matmul_forward(self.qkv[l][:, pos:pos + 1], a["ln"], p["qkvw"][l], p["qkvb"][l])
            atty = self._attend(l, pos + 1)
            ops.matmul_forward(a["proj"], atty, p["attprojw"][l], p["attprojb"][l])
            ops.fused_residual_layernorm_forward(a["residual2"], a["ln"], a["mean"], a["rstd"], residual_in,
                                                 a["proj"], p["ln2w"][l], p["ln2b"][l])
            ops.matmul_forward(a["fch_gelu"], a["ln"], p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"])
            ops.matmul_forward(a["proj"], a["fch_gelu"], p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # the next block's first layernorm
                out, weight, bias = a["ln"], p["ln1w"][l + 1], p["ln1b"][l + 1]
            else:  # the final layernorm
                out, weight, bias = a["lnf"], p["lnfw"], p["lnfb"]
            # residual3 may be residual_in: it was read into residual2 above, before this overwrites it
            ops.fused_residual_layernorm_forward(a["residual3"], out, a["mean"], a["rstd"], a["residual2"],
                                                 a["proj"], weight, bias)
        ops.matmul_forward(a["logits"], a["lnf"], p["wte"])
        self.pos = pos + 1
        return ops.to_numpy(a["logits"][0, 0, :cfg.vocab_size])

    def _attend(self, l: int, n: int):
        """The attention output (1, 1, C) of position n-1 over cached positions 0..n-1 of layer l."""
        C, H = self.cfg.n_embd, self.cfg.n_head
        if self.attention == "kernel":
            out = self.a["atty_all"][:, :n]
            self.ops.attention_forward(out, self.a["lse"][:H * n].reshape(1, H, n), self.qkv[l][:, :n], H)
            return out[:, n - 1:]
        xp, hs = self.arr.xp, C // H
        with _on_stream(self.ops):
            qkv = self.arr.to_f32(self.qkv[l][0, :n])  # (n, 3C)
            q = qkv[n - 1, :C].reshape(H, 1, hs)
            keys = qkv[:, C:2 * C].reshape(n, H, hs).transpose(1, 2, 0)  # (H, hs, n)
            values = qkv[:, 2 * C:].reshape(n, H, hs).transpose(1, 0, 2)  # (H, n, hs)
            s = (q @ keys) * self.scale  # (H, 1, n)
            e = xp.exp(s - s.max(axis=-1, keepdims=True))
            y = (e / e.sum(axis=-1, keepdims=True)) @ values  # (H, 1, hs)
            self.arr.store(self.a["atty"], y.reshape(C))
        return self.a["atty"]


class _on_stream:
    """CuPy work inside the block runs on the CUDA backend's stream (a no-op elsewhere)."""

    def __init__(self, backend):
        self.stream = getattr(backend, "stream", None)

    def __enter__(self):
        if self.stream is not None:
            self.stream.__enter__()

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream.__exit__(*exc)
