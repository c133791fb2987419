"""Where every tensor lives: the parameter table and the activation table.

Parameters are one flat buffer in llm.c's order (so model files are a header plus that buffer).
Backends, checkpoints, ZeRO shards, exporters and the PyTorch reference all read this table;
nothing else knows an offset.

Matmul weights are stored (out_features, in_features), as llm.c and nn.Linear do: y = x @ W.T + b.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from .config import GPTConfig


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    offset: int  # in elements, into the flat buffer
    decay: bool  # AdamW weight decay applies (2D+ weights, not biases/LN/...)

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    tensors: tuple
    total: int

    def __getitem__(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self):
        return [t.name for t in self.tensors]

    def views(self, flat) -> dict:
        """name -> view of `flat` (numpy or cupy) with the tensor's shape."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.total},)")
        return {t.name: flat[t.offset:t.end].reshape(t.shape) for t in self.tensors}


def _build(entries) -> Layout:
    tensors, offset = [], 0
    for name, shape, decay in entries:
        t = Tensor(name, tuple(shape), offset, decay)
        tensors.append(t)
        offset = t.end
    return Layout(tuple(tensors), offset)


def param_layout(cfg: GPTConfig) -> Layout:
    """The 16 parameter tensors in llm.c's order; per-layer tensors are stacked along dim 0."""
    L, C, Vp, maxT = cfg.n_layer, cfg.n_embd, cfg.padded_vocab_size, cfg.max_seq_len
    # decay follows llm.c/nanoGPT: every tensor of 2+ dims (matmul weights and embeddings) decays
    return _build([
        ("wte", (Vp, C), True),
        ("wpe", (maxT, C), True),
        ("ln1w", (L, C), False),
        ("ln1b", (L, C), False),
        ("qkvw", (L, 3 * C, C), True),
        ("qkvb", (L, 3 * C), False),
        ("attprojw", (L, C, C), True),
        ("attprojb", (L, C), False),
        ("ln2w", (L, C), False),
        ("ln2b", (L, C), False),
        ("fcw", (L, 4 * C, C), True),
        ("fcb", (L, 4 * C), False),
        ("fcprojw", (L, C, 4 * C), True),
        ("fcprojb", (L, C), False),
        ("lnfw", (C,), False),
        ("lnfb", (C,), False),
    ])


# activation tensors whose elements are float32 on every backend (statistics and losses);
# everything else is in the backend's activation dtype (fp32 for numpy, bf16 for CUDA)
FP32_ACTIVATIONS = frozenset({"ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd",
                              "att_lse", "losses"})


def activation_layout(cfg: GPTConfig, B: int, T: int, recompute: int = 0) -> Layout:
    """Forward activations kept for the backward pass, plus the backward's scratch buffers.

    recompute 0: keep everything; 1: GeLU outputs are recomputed in the backward (one shared buffer);
    2: also the layernorm outputs (one shared buffer each; the backward recomputes them from the
    residual stream and the saved mean/rstd).
    """
    if recompute not in (0, 1, 2):
        raise ValueError(f"recompute must be 0, 1 or 2, got {recompute}")
    L, C, H, Vp = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size
    gelu_layers = 1 if recompute >= 1 else L
    ln_layers = 1 if recompute >= 2 else L
    return _build([
        ("encoded", (B, T, C), False),
        ("ln1", (ln_layers, B, T, C), False),
        ("ln1_mean", (L, B, T), False),
        ("ln1_rstd", (L, B, T), False),
        ("qkv", (L, B, T, 3 * C), False),
        ("atty", (L, B, T, C), False),
        ("att_lse", (L, B, H, T), False),
        ("residual2", (L, B, T, C), False),
        ("ln2", (ln_layers, B, T, C), False),
        ("ln2_mean", (L, B, T), False),
        ("ln2_rstd", (L, B, T), False),
        ("fch", (L, B, T, 4 * C), False),
        ("fch_gelu", (gelu_layers, B, T, 4 * C), False),
        ("residual3", (L, B, T, C), False),
        ("lnf", (B, T, C), False),
        ("lnf_mean", (B, T), False),
        ("lnf_rstd", (B, T), False),
        ("losses", (B, T), False),
        ("logits", (B, T, Vp), False),  # the classifier overwrites it with dlogits
        # backward scratch
        ("dresidual", (B, T, C), False),
        ("dbtc", (B, T, C), False),
        ("dbt4c", (B, T, 4 * C), False),
        ("dqkv", (B, T, 3 * C), False),
        ("btc_scratch", (B, T, C), False),  # forward: matmul outputs before the fused residual add
    ])
