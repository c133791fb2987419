"""Incremental decoding with a KV cache, written once over a backend's ops (numpy and CUDA).

    dec = KVCacheDecoder(model, capacity)   # model: a GPT (any B >= 1, T >= the prompt's length)
    logits = dec.prefill(prompt_tokens)     # one forward of `model`; keeps each layer's k, v
    logits = dec.step(token)                # one new position: O(L * C^2 + L * pos * C) work

The prefill is the model's own forward (row 0 holds the prompt, the other rows EOT, as sample.generate
always did); each layer's k and v of the prompt positions are copied out of acts["qkv"]. A step then runs
model.forward's schedule on a single row (N = 1) through the same backend ops -- encoder, layernorm,
matmul (cuBLASLt on CUDA), fused residual + layernorm, matmul with the GeLU epilogue -- except attention:
one query against the cache is plain array math (numpy, or CuPy on CUDA) in float32, with scale
1/sqrt(hs) and a softmax over positions 0..pos. On CUDA the bf16 bits of q, k and v are widened exactly
to float32 (bits << 16) and the attention output is rounded back to bf16 (nearest even) by the
float_to_bf16 launcher, so every other tensor goes through the same kernels, in the same dtype, as in
the full forward. No new CUDA kernels.

Positions are absolute and the cache never slides: a decoder holds `capacity` <= model.T positions (the
model's wpe rows), and step() refuses to go past it. sample.generate switches to the windowed
recompute at that point.
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
    """Greedy/sampled decoding of one sequence over `model`'s parameters with cached keys and values."""

    def __init__(self, model, capacity: int | None = None):
        cfg, ops = model.cfg, model.ops
        if not supports_kv_cache(ops):
            raise ValueError(f"no KV-cache decoding on the {getattr(ops, 'name', type(ops).__name__)} backend")
        capacity = model.T if capacity is None else capacity
        if not 1 <= capacity <= model.T:
            raise ValueError(f"KV cache capacity {capacity} must be in [1, {model.T}] (the model's T)")
        self.model, self.ops, self.cfg, self.capacity = model, ops, cfg, capacity
        self.arr = _Arrays(ops)
        xp = self.arr.xp
        L, H, C, Vp = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.padded_vocab_size
        hs = C // H
        self.scale = 1.0 / math.sqrt(hs)
        # float32 caches, head-major so that a head's keys 0..pos are one contiguous (pos+1, hs) block
        with _on_stream(ops):
            self.k = xp.zeros((L, H, capacity, hs), dtype=xp.float32)
            self.v = xp.zeros((L, H, capacity, hs), dtype=xp.float32)
        # one-row activations in the backend's dtypes (separate allocations: aligned for the kernels)
        z = lambda *shape, fp32=False: ops.zeros((1, 1) + shape, fp32=fp32)
        self.a = {"encoded": z(C), "ln": z(C), "qkv": z(3 * C), "atty": z(C), "proj": z(C), "residual2": z(C),
                  "residual3": z(C), "fch": z(4 * C), "fch_gelu": z(4 * C), "lnf": z(C), "logits": z(Vp),
                  "mean": ops.zeros((1, 1), fp32=True), "rstd": ops.zeros((1, 1), fp32=True)}
        self.token = ops.from_numpy(np.zeros((1, 1), np.int32))
        self.pos = 0  # the number of cached positions

    # ---- prefill ---------------------------------------------------------------------------------
    def prefill(self, prompt_tokens) -> np.ndarray:
        """Runs the model's forward over the prompt (in row 0); returns the float32 host logits (first
        vocab_size columns) of its last position and caches every layer's k, v."""
        m, ops, cfg = self.model, self.ops, self.cfg
        P = len(prompt_tokens)
        if not 1 <= P <= self.capacity:
            raise ValueError(f"prompt of {P} tokens: the KV cache holds 1..{self.capacity} positions")
        inputs = np.full((m.B, m.T), GPT2_EOT, dtype=np.int32)
        inputs[0, :P] = prompt_tokens  # positions past P are never seen by positions < P (causal attention)
        tok, _ = ops.set_batch(inputs, np.zeros_like(inputs))
        m.forward(tok)
        C, H, hs = cfg.n_embd, cfg.n_head, cfg.head_size
        with _on_stream(ops):
            for l in range(cfg.n_layer):
                qkv = m.acts["qkv"][l][0, :P]
                self.k[l, :, :P] = self.arr.to_f32(qkv[:, C:2 * C]).reshape(P, H, hs).transpose(1, 0, 2)
                self.v[l, :, :P] = self.arr.to_f32(qkv[:, 2 * C:]).reshape(P, H, hs).transpose(1, 0, 2)
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
            ops.matmul_forward(a["qkv"], a["ln"], p["qkvw"][l], p["qkvb"][l])
            self._attend(l, pos)
            ops.matmul_forward(a["proj"], a["atty"], p["attprojw"][l], p["attprojb"][l])
            ops.fused_residual_layernorm_forward(a["residual2"], a["ln"], a["mean"], a["rstd"], residual_in,
                                                 a["proj"], p["ln2w"][l], p["ln2b"][l])
            ops.matmul_forward(a["fch_gelu"], a["ln"], p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"])
            ops.matmul_forward(a["proj"], a["fch_gelu"], p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # the next block's first layernorm
                out, weight, bias = a["ln"], p["ln1w"][l + 1], p["ln1b"][l + 1]
            else:  # the final layernorm
                out, weight, bias = a["lnf"], p["lnfw"], p["lnfb"]
            # residual3 may be residual_in: it is read into residual2 above, before this overwrites it
            ops.fused_residual_layernorm_forward(a["residual3"], out, a["mean"], a["rstd"], a["residual2"],
                                                 a["proj"], weight, bias)
        ops.matmul_forward(a["logits"], a["lnf"], p["wte"])
        self.pos = pos + 1
        return ops.to_numpy(a["logits"][0, 0, :cfg.vocab_size])

    def _attend(self, l: int, pos: int):
        """a["atty"] = attention of this position's query over cached positions 0..pos (after appending
        this position's k and v), in float32."""
        xp, C, H = self.arr.xp, self.cfg.n_embd, self.cfg.n_head
        hs = C // H
        with _on_stream(self.ops):
            qkv = self.arr.to_f32(self.a["qkv"][0, 0])
            self.k[l, :, pos] = qkv[C:2 * C].reshape(H, hs)
            self.v[l, :, pos] = qkv[2 * C:].reshape(H, hs)
            q = qkv[:C].reshape(H, 1, hs)
            keys, values = self.k[l, :, :pos + 1], self.v[l, :, :pos + 1]  # (H, pos+1, hs)
            s = (q @ keys.transpose(0, 2, 1)) * self.scale  # (H, 1, pos+1)
            e = xp.exp(s - s.max(axis=-1, keepdims=True))
            y = (e / e.sum(axis=-1, keepdims=True)) @ values  # (H, 1, hs)
            self.arr.store(self.a["atty"], y.reshape(C))


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
