"""A plain PyTorch LLaMA-3 on gpt2cu's parameter layout (models/llama.py): the reference the GPU tests and
benchmarks compare the LLaMA family to, as torch_gpt2.py is GPT-2's.

transformers' LlamaForCausalLM computed with gpt2cu's stacked tensors: RMSNorm in fp32 (as transformers),
RoPE with rotate_half pairing from the same fp32 tables as the numpy backend, SDPA with grouped key/value
heads, SwiGLU over fcw = [gate | up], an untied (or tied) head over the padded vocabulary. Runs in fp32 on
the CPU, and under bf16 autocast and torch.compile on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends.numpy_llama_ops import LLAMA31_SCALING, rope_tables
from ..models.llama import LlamaConfig
from .flat import FlatParams
from .torch_gpt2 import _cast


class RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(C))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate(x, cos, sin):
    """x (B, heads, T, HS): channel i paired with i + HS/2, rotated by the angle of (t, i); cos, sin (T, HS/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, cfg.qkv_width, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        NH, NKV, HS = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_size
        q, k, v = self.qkv(x).split([NH * HS, NKV * HS, NKV * HS], dim=-1)
        q, k, v = (t.view(B, T, -1, HS).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=NKV != NH)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.ln_1, self.ln_2 = RMSNorm(cfg.n_embd, cfg.norm_eps), RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.fc = nn.Linear(cfg.n_embd, 2 * cfg.ffn_hidden, bias=False)  # [gate | up]
        self.fcproj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, residual_dtype=None):
        x = _cast(x + self.attn(self.ln_1(x), cos, sin), residual_dtype)
        gate, up = self.fc(self.ln_2(x)).chunk(2, dim=-1)
        return _cast(x + self.fcproj(F.silu(gate) * up), residual_dtype)


class TorchLlama(FlatParams):
    def __init__(self, cfg: LlamaConfig, residual_dtype=None):
        """residual_dtype: as TorchGPT's (None: the parameters' dtype; torch.bfloat16 rounds each add)."""
        super().__init__()
        self.cfg, self.residual_dtype = cfg, residual_dtype
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tied_embeddings else nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta,
                               LLAMA31_SCALING if cfg.use_scaled_rope else None)
        self.register_buffer("cos", torch.from_numpy(cos), persistent=False)  # (max_seq_len, HS/2)
        self.register_buffer("sin", torch.from_numpy(sin), persistent=False)

    def forward(self, idx, targets=None):
        """idx, targets (B, T) int64 -> (logits (B, T, V) over the real vocabulary, mean cross-entropy over
        the targets that are not -1, or None without targets)."""
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = _cast(self.wte(idx), self.residual_dtype)
        for block in self.h:
            x = block(x, cos, sin, self.residual_dtype)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return self.lm_head_loss(self.ln_f(x), head, targets)

    def layout_tensors(self) -> dict:
        h = self.h
        tensors = {
            "wte": [self.wte.weight], "ln1w": [b.ln_1.weight for b in h], "qkvw": [b.attn.qkv.weight for b in h],
            "attprojw": [b.attn.proj.weight for b in h], "ln2w": [b.ln_2.weight for b in h],
            "fcw": [b.fc.weight for b in h], "fcprojw": [b.fcproj.weight for b in h], "lnfw": [self.ln_f.weight],
        }
        if self.lm_head is not None:
            tensors["lm_head"] = [self.lm_head.weight]
        return tensors
