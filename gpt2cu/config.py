"""Model shape: one source of truth for GPT-2's dimensions.

`-e` accepts llm.c's descriptors: "d12" (GPT-2 124M), "d24", "d36", "d48", any "dN"
(channels = 64 * N, heads = N, rounded to llm.c's table for the named sizes), or a path to an
llm.c model file, whose header carries the shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

GPT2_VOCAB = 50257
GPT2_PADDED_VOCAB = 50304  # next multiple of 128: keeps the LM-head GEMM well tiled
GPT2_EOT = 50256

# llm.c's named depths (the GPT-2 family): depth -> (channels, heads)
_NAMED = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25), 60: (1920, 30),
          72: (2880, 30), 84: (3456, 36)}


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    max_seq_len: int = 1024
    vocab_size: int = GPT2_VOCAB
    padded_vocab_size: int = GPT2_PADDED_VOCAB

    def __post_init__(self):
        if self.n_layer < 1 or self.n_head < 1 or self.n_embd < 1:
            raise ValueError(f"model dimensions must be positive: {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be >= vocab_size")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_descriptor(cls, desc: str, **overrides) -> "GPTConfig":
        """'d12' -> GPT-2 124M; any 'dN' gets 64*N channels and N heads unless llm.c names it."""
        m = re.fullmatch(r"d(\d+)", desc)
        if not m:
            raise ValueError(f"unknown model descriptor {desc!r}: expected dN (e.g. d12) or a model file path")
        depth = int(m.group(1))
        if depth < 1:
            raise ValueError(f"model depth must be >= 1, got {desc!r}")
        channels, heads = _NAMED.get(depth, (64 * depth, depth))
        return cls(n_layer=depth, n_head=heads, n_embd=channels, **overrides)

    def num_parameters(self) -> int:
        from .layout import param_layout
        return param_layout(self).total
