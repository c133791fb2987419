"""Incremental decoding with a KV cache, written once over a backend's ops (numpy and CUDA).

    dec = KVCacheDecoder(model, capacity)   # model: any family's (any B >= 1, T >= the prompt's length)
    logits = dec.prefill(prompt_tokens)     # one forward of `model`; keeps each layer's q, k, v rows
    logits = dec.step(token)                # one new position

The prefill is the model's own forward (row 0 holds the prompt, the other rows padding_token: EOT, as sample.generate
always did) through `forward_caching_qkv`: each layer's qkv rows of the prompt positions are copied into a cache
of `capacity` rows per layer, in the backend's activation dtype (bf16 bits on CUDA), as that layer's attention
reads them (after RoPE; before a -r 3 model reuses its one block's buffers for the next layer). A step then runs
the model family's own forward schedule (model.forward_schedule) on a single row (N = 1), over one-row
buffers, through the same backend ops (the qkv matmul writes its row straight into the cache), so every
tensor goes through the same kernels, in the same dtype, as in the full forward, and the block schedule
is written only in the family's module. Only attention differs, in one of two ways:

  "query"  (numpy's default): the backend's decode_attention op, the one new query against the cached
           keys and values (fp32 softmax; on CUDA kernels/decode_attention.cu, one launch per layer):
           scale 1/sqrt(hs), softmax over positions 0..pos. O(pos * C) per layer.
  "kernel" (CUDA's default): the model's own attention (model.attend) over the cached rows 0..pos,
           keeping the last row. It recomputes the earlier rows' attention (O(pos^2 * C) per layer,
           microseconds on a GPU for GPT-2 lengths), but it is one launch, and the very computation the
           full forward does (its logits equal the full forward's bitwise in tests/test_gpu_sample.py).

Measured on an H100 (d12, B=1, greedy, prefill included), before decode_attention had a kernel: the cache
with "kernel" attention 472 tok/s at T=128 and 385 at T=1024, the full recompute 415 and 322, "query"
attention (then ~15 CuPy array operations per layer) ~120. At this size a step is bound by host-side
launches (~90 per token), not by the GPU; capturing the step as a CUDA graph would be the next gain.

Positions are absolute and the cache never slides: a decoder holds `capacity` <= model.T positions, and
step() refuses to go past it. sample.generate switches to the windowed recompute at that point.
"""
from __future__ import annotations

import numpy as np

from .models.gpt2 import GPT2_EOT


def padding_token(cfg) -> int:
    """The token that fills the positions after a prompt or window (never seen by the positions before them,
    causal attention): GPT-2's EOT, or 0 where the vocabulary is smaller than GPT-2's (EOT would index past
    the embedding table: an illegal address on CUDA)."""
    return GPT2_EOT if GPT2_EOT < cfg.vocab_size else 0


def forward_caching_qkv(model, batch, store):
    """model's forward over batch (up to lnf, no loss) calling store(l, qkv) with layer l's qkv activation
    (B, T, qkv_width) just before its attention reads it. The attend is the decoder's, not the model's own, so
    the LLaMA family rotates q and k in place first whatever its rope_fusion (the cache holds rotated rows)."""
    def attend(l, a):
        store(l, a["qkv"])
        model.attend(l, a)
    model.forward_schedule(model.block_acts, attend, batch.tokens, model.position_rows(0, model.T))


class KVCacheDecoder:
    """Decoding of one sequence over `model`'s parameters with cached keys and values."""

    ATTENTION = ("query", "kernel")

    def __init__(self, model, capacity: int | None = None, attention: str | None = None):
        cfg, ops = model.cfg, model.ops
        capacity = model.T if capacity is None else capacity
        if not 1 <= capacity <= model.T:
            raise ValueError(f"KV cache capacity {capacity} must be in [1, {model.T}] (the model's T)")
        attention = attention or ops.kv_cache_attention
        if attention not in self.ATTENTION:
            raise ValueError(f"attention must be one of {self.ATTENTION}, got {attention!r}")
        self.model, self.ops, self.cfg, self.capacity, self.attention = model, ops, cfg, capacity, attention
        L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
        # the cache: acts["qkv"]'s rows 0..capacity-1 of row 0, per layer, in the activation dtype; a row holds
        # the query heads and the n_kv_head key and value heads (RoPE applied, for the LLaMA family)
        self.qkv = ops.zeros((L, 1, capacity, cfg.qkv_width))
        # one-row activations shared by every layer, from the family's model
        self.top, self.block = model.decode_buffers()
        if attention == "kernel":  # the model's attention over up to `capacity` rows
            self.atty_all = ops.zeros((1, capacity, C))
            self.lse = ops.zeros((H * capacity,), fp32=True)  # viewed as (1, H, n) for n rows
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
        inputs = np.full((m.B, m.T), padding_token(cfg), dtype=np.int32)
        inputs[0, :P] = prompt_tokens  # positions past P are never seen by positions < P (causal attention)

        def store(l, qkv):
            with ops.on_stream():
                self.qkv[l][0, :P] = qkv[0, :P]

        forward_caching_qkv(m, ops.set_batch(inputs), store)
        self.pos = P
        return m.logits(0, P - 1)[:cfg.vocab_size]

    # ---- one token -----------------------------------------------------------------------------------
    def step(self, token: int) -> np.ndarray:
        """Appends `token` at the next position; returns the float32 host logits (first vocab_size
        columns) that predict the position after it."""
        if self.pos >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.capacity} positions)")
        ops, pos = self.ops, self.pos
        ops.from_numpy(np.array([[token]], np.int32), out=self.token)
        self.model.forward_schedule(self._acts, self._attend, self.token, self.model.position_rows(pos, pos + 1))
        self.model.lm_head(self.top["logits"], self.top["lnf"])
        self.pos = pos + 1
        return ops.to_numpy(self.top["logits"][0, 0, :self.cfg.vocab_size])

    def _acts(self, l):
        if l is None:
            return self.top
        return {**self.block, "qkv": self.qkv[l][:, self.pos:self.pos + 1]}

    def _attend(self, l: int, block):
        """block["atty"] = the attention output of position pos over cached positions 0..pos of layer l."""
        n, cfg = self.pos + 1, self.cfg
        if self.attention == "kernel":
            out = self.atty_all[:, :n]
            self.model.attend(l, {"atty": out, "att_lse": self.lse[:cfg.n_head * n].reshape(1, cfg.n_head, n),
                                  "qkv": self.qkv[l][:, :n]})
            block["atty"] = out[:, n - 1:]  # the last row, read in place by the projection that follows
            return
        self.ops.decode_attention(block["atty"], self.qkv[l][:, :n], cfg.n_head, cfg.n_kv_head)
