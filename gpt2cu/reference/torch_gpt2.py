"""A plain PyTorch GPT-2 on gpt2cu's parameter layout: the reference the tests and benchmarks compare to.

nanoGPT's model (pre-LN blocks, fused qkv Linear, SDPA causal attention, tanh GeLU MLP, LM head tied to
wte), with wte holding the padded vocabulary as gpt2cu does. Its parameters load from and export to
gpt2cu's flat fp32 buffer (flat.FlatParams), so both implementations start from the same init_params and
their gradients compare tensor by tensor. Used on the CPU in fp32/float64 for parity
tests, and on the GPU under bf16 autocast and torch.compile as the benchmark baseline, so the forward
stays free of Python-side data-dependent control flow. Only tests and benchmarks import this module
(and with it torch); the package itself does not need torch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.gpt2 import GPTConfig
from .flat import FlatParams


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        # [q | k | v] with head h in columns h*hs..(h+1)*hs of each third, as gpt2cu's qkv
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, residual_dtype=None):
        x = _cast(x + self.attn(self.ln_1(x)), residual_dtype)
        return _cast(x + self.mlp(self.ln_2(x)), residual_dtype)


def _cast(x, dtype):
    return x if dtype is None else x.to(dtype)


class TorchGPT(FlatParams):
    def __init__(self, cfg: GPTConfig, residual_dtype=None):
        """residual_dtype None keeps the residual stream in the parameters' dtype (fp32 under autocast);
        torch.bfloat16 rounds it after every add, as a bf16-activation implementation stores it."""
        super().__init__()
        self.cfg, self.residual_dtype = cfg, residual_dtype
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx, targets=None):
        """idx, targets (B, T) int64 -> (logits (B, T, V) over the real vocabulary, mean cross-entropy
        over the targets that are not -1, or None without targets)."""
        x = _cast(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)), self.residual_dtype)
        for block in self.h:
            x = block(x, self.residual_dtype)
        return self.lm_head_loss(self.ln_f(x), self.wte.weight, targets)  # the head tied to wte

    # ---- gpt2cu's flat buffer -----------------------------------------------------------------
    def layout_tensors(self) -> dict:
        """Layout name -> the parameters that make it up, one per layer for the stacked (L, ...) tensors."""
        h = self.h
        return {
            "wte": [self.wte.weight], "wpe": [self.wpe.weight],
            "ln1w": [b.ln_1.weight for b in h], "ln1b": [b.ln_1.bias for b in h],
            "qkvw": [b.attn.c_attn.weight for b in h], "qkvb": [b.attn.c_attn.bias for b in h],
            "attprojw": [b.attn.c_proj.weight for b in h], "attprojb": [b.attn.c_proj.bias for b in h],
            "ln2w": [b.ln_2.weight for b in h], "ln2b": [b.ln_2.bias for b in h],
            "fcw": [b.mlp.c_fc.weight for b in h], "fcb": [b.mlp.c_fc.bias for b in h],
            "fcprojw": [b.mlp.c_proj.weight for b in h], "fcprojb": [b.mlp.c_proj.bias for b in h],
            "lnfw": [self.ln_f.weight], "lnfb": [self.ln_f.bias],
        }
