"""Rollouts: B sequences sampled at once with a KV cache, over the model family's forward schedule.

    decoder = BatchedDecoder(model)                  # model: any (B, T); the cache holds T positions
    rollout = generate(model, decoder, prompts, max_new_tokens, eot, rng, temperature=1.0, top_k=None)

The batched decoder is kv_cache.KVCacheDecoder widened to B rows: the prefill is the model's own forward
(kv_cache.forward_caching_qkv) over (B, T) (prompts right-padded with EOT, which causal attention keeps out
of earlier positions) and a step runs model.forward_schedule on one position of every row through the
backend's ops, with attention the backend's decode_attention op (each row's one new query against its
own cached keys and values: one launch per layer on CUDA). The next tokens are drawn by the backend's
sample_logits op from the LM head's logits where they are (on the GPU for CUDA): the host draws one
uniform number per sampling row from that row's generator and gets back B tokens and their
log-probabilities, never the (B, V) logits. On CUDA the step at a position is a CUDA graph from its
second run on (backend.graphed; one per position: the cache rows and the position's table rows are fixed
addresses), so a step costs one graph launch instead of ~100 kernel launches from Python.

Rows of different prompt lengths advance in lockstep at one shared position, so positions stay
absolute: the prefill covers the shortest prompt, and a row whose prompt is longer is fed its own prompt
tokens (teacher forcing) until its prompt ends, then its samples. A row stops at EOT (kept: ending is an
action the policy takes) or after max_new_tokens; the others go on.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..backends import numpy_ops
from ..kv_cache import forward_caching_qkv


class BatchedDecoder:
    """Incremental decoding of model.B sequences over model's parameters with cached keys and values."""

    def __init__(self, model):
        cfg, ops = model.cfg, model.ops
        self.model, self.ops, self.cfg = model, ops, cfg
        B, L = model.B, cfg.n_layer
        self.capacity = model.T
        self.qkv = ops.zeros((L, B, self.capacity, cfg.qkv_width))  # acts["qkv"] of every row, per layer
        # the family's buffers for B rows at one position; the layers run one after another and share them.
        # The new position's qkv goes to a buffer of its own (B rows apart by the capacity in the cache)
        self.top, self.block = model.decode_buffers(B)
        self.block["qkv"] = ops.zeros((B, 1, cfg.qkv_width))
        self.tokens = ops.from_numpy(np.zeros((B, 1), np.int32))
        self.sampled = ops.from_numpy(np.zeros(B, np.int32))  # sample_logits' outputs
        self.sampled_logprobs = ops.zeros((B,), fp32=True)
        # position -> its step (the forward and the LM head), backend.graphed: run eagerly once, captured as a
        # CUDA graph the second time, replayed after that. Everything a step reads is at fixed addresses for
        # a given position (its cache rows, its wpe or RoPE rows, the one-position buffers), and rollouts
        # revisit the same positions (the next chunk of prompts, the next RL step)
        self._steps = {}
        self.pos = 0

    def prefill(self, inputs: np.ndarray, length: int):
        """inputs (B, T) int32; caches positions 0..length-1 of every row and computes the logits predicting
        position `length` (kept by the backend: sample() or logits() reads them)."""
        m, ops = self.model, self.ops

        def store(l, qkv):
            with ops.on_stream():
                self.qkv[l][:, :length] = qkv[:, :length]

        forward_caching_qkv(m, ops.set_batch(inputs), store)
        with ops.on_stream():
            self.top["lnf"][...] = m.acts["lnf"][:, length - 1:length]  # contiguous for the LM head's GEMM
        self.pos = length
        m.lm_head(self.top["logits"], self.top["lnf"])

    def step(self, tokens: np.ndarray):
        """Appends one token per row at the next position and computes the logits after it."""
        if self.pos >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.capacity} positions)")
        ops, pos = self.ops, self.pos
        ops.from_numpy(np.asarray(tokens, np.int32).reshape(-1, 1), out=self.tokens)
        if pos not in self._steps:
            self._steps[pos] = ops.graphed(functools.partial(self._step_at, pos))
        self._steps[pos]()
        self.pos = pos + 1

    def _step_at(self, pos: int):
        m = self.model
        m.forward_schedule(self._acts, functools.partial(self._attend, pos), self.tokens,
                           m.position_rows(pos, pos + 1))
        m.lm_head(self.top["logits"], self.top["lnf"])

    def logits(self) -> np.ndarray:
        """The host float32 logits (B, vocab_size) of the last prefill or step."""
        return self.ops.to_numpy(self.top["logits"][:, 0, :self.cfg.vocab_size])

    def sample(self, uniforms: np.ndarray, temperature: float, top_k: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, log-probabilities) on the host, one per row, drawn from the last logits at the host's
        uniform draws (B,) in [0, 1) (unused when temperature is 0: greedy), as sample_tokens draws."""
        ops = self.ops
        ops.sample_logits(self.sampled, self.sampled_logprobs, self.top["logits"], uniforms, self.cfg.vocab_size,
                          temperature, top_k)
        return ops.to_numpy(self.sampled), ops.to_numpy(self.sampled_logprobs)

    def _acts(self, l):
        return self.top if l is None else self.block

    def _attend(self, pos: int, l: int, block):
        """block["atty"] = every row's new position attending over its cached positions 0..pos of layer l."""
        ops, n = self.ops, pos + 1
        with ops.on_stream():
            self.qkv[l][:, pos:n] = block["qkv"]
        ops.decode_attention(block["atty"], self.qkv[l][:, :n], self.cfg.n_head, self.cfg.n_kv_head)


def draw_uniforms(rng, count: int) -> np.ndarray:
    """count uniform draws in [0, 1): from one Generator, or one from each of a sequence of count."""
    if isinstance(rng, np.random.Generator):
        return rng.random(count)
    return np.array([g.random() for g in rng], dtype=np.float64)


def sample_tokens(logits: np.ndarray, rng, temperature: float,
                  top_k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, their log-probabilities under the sampling distribution) for each row of logits (B, V).
    temperature 0 is greedy (log-probability 0); top_k keeps each row's k most likely tokens. rng: one
    Generator for all rows, or a sequence of B (each row draws from its own)."""
    tokens, logprobs = np.zeros(len(logits), np.int64), np.zeros(len(logits))
    uniforms = np.zeros(len(logits)) if temperature == 0 else draw_uniforms(rng, len(logits))
    numpy_ops.sample_logits(tokens, logprobs, logits, uniforms, logits.shape[1], temperature, top_k)
    return tokens, logprobs


@dataclass
class Rollout:
    """Sampled sequences, laid out for the training forward (inputs tokens[:, :-1], targets tokens[:, 1:])."""
    tokens: np.ndarray        # (B, T + 1) int32: prompt, completion, EOT padding
    prompt_lens: np.ndarray   # (B,)
    lengths: np.ndarray       # (B,) prompt + completion tokens (the completion's EOT included when sampled)
    logprobs: np.ndarray      # (B, T + 1) float32: each completion token's log-probability when sampled
    ended: np.ndarray         # (B,) bool: the completion ended with EOT (not cut at the length limit)

    def completion(self, row: int) -> list[int]:
        """Row's completion tokens, without the EOT that ended it."""
        tokens = self.tokens[row, self.prompt_lens[row]:self.lengths[row]].tolist()
        return tokens[:-1] if self.ended[row] else tokens


def completion_mask(prompt_lens: np.ndarray, lengths: np.ndarray, T: int) -> np.ndarray:
    """(B, T) bool over the input positions (tokens[:, :T]) whose target (the next token) is a completion
    token, of rows with these prompt lengths and lengths."""
    positions = np.arange(T)[None, :]
    return (positions >= prompt_lens[:, None] - 1) & (positions < lengths[:, None] - 1)


def generate(model, decoder: BatchedDecoder, prompts: list, max_new_tokens: int, eot: int,
             rng, temperature: float = 1.0, top_k: int | None = None) -> Rollout:
    """Completions of up to model.B prompts (token lists; missing rows repeat the first prompt and are
    dropped from the result). model.T must hold the longest prompt plus max_new_tokens - 1 positions.
    rng: one Generator for all rows, or one per prompt (a row's samples then depend on its own generator
    only, not on which rows share the batch: how data-parallel ranks sample what one rank would)."""
    B, T = model.B, model.T
    n = len(prompts)
    if not 1 <= n <= B:
        raise ValueError(f"generate takes 1..{B} prompts (the model's B), got {n}")
    rows = list(prompts) + [prompts[0]] * (B - n)
    if not isinstance(rng, np.random.Generator):  # the dropped rows draw from a generator of their own
        rng = list(rng) + [np.random.default_rng(0) for _ in range(B - n)]
    prompt_lens = np.array([len(p) for p in rows])
    if prompt_lens.min() < 1 or prompt_lens.max() + max_new_tokens - 1 > T:
        raise ValueError(f"prompts of {prompt_lens.min()}..{prompt_lens.max()} tokens and {max_new_tokens} new "
                         f"tokens need T >= {prompt_lens.max() + max_new_tokens - 1}, the model has {T}")
    tokens = np.full((B, T + 1), eot, np.int32)
    for r, p in enumerate(rows):
        tokens[r, :len(p)] = p
    logprobs = np.zeros((B, T + 1), np.float32)
    lengths = prompt_lens.copy()
    ended = np.zeros(B, bool)
    start = int(prompt_lens.min())
    decoder.prefill(tokens[:, :T], start)
    uniforms = np.zeros(B)
    for pos in range(start, T + 1):
        sampling = (pos >= prompt_lens) & ~ended & (lengths - prompt_lens < max_new_tokens)
        if not sampling.any() and pos >= prompt_lens.max():
            break
        # only the rows that sample draw (a row's draws then depend on its own prompt and samples alone,
        # not on the batch it shares, and finished rows cost no host work)
        rows_now = np.flatnonzero(sampling)
        if rows_now.size:
            if temperature != 0:
                uniforms[rows_now] = draw_uniforms(
                    rng if isinstance(rng, np.random.Generator) else [rng[r] for r in rows_now], rows_now.size)
            new, logp = decoder.sample(uniforms, temperature, top_k)  # every row's; the sampling rows' kept
            new, logp = new[rows_now], logp[rows_now]
            tokens[rows_now, pos] = new
            logprobs[rows_now, pos] = logp
            lengths[rows_now] += 1
            ended[rows_now] |= new == eot
        if pos < T:
            decoder.step(tokens[:, pos])
    return Rollout(tokens[:n], prompt_lens[:n], lengths[:n], logprobs[:n], ended[:n])
