"""The GPT-2 family: its shape (GPTConfig), parameter and activation tables, initialization, and the
forward and backward schedule, written once over a backend's ops.

The schedule is llm.c's, but for where the residual adds happen: pre-LN blocks whose residual adds are
fused into the projection matmuls before them (the projection's output never stored alone), the
GeLU fused into the MLP's first matmul (and its derivative into the second one's backward), the LM
head tied to wte, and a classifier that turns the logits into dlogits in place. Each op's contract is
in docs/architecture.md; `recompute` trades GeLU (1), layernorm (2) outputs, or every block's
activations but its input (3: the block's forward runs again inside its backward) for a second compute.
Parameters and gradients live in a storage (zero.py) that decides their ZeRO stage; the schedule calls its
gather and reduce hooks around each layer.

`-e` accepts llm.c's descriptors: "d12" (GPT-2 124M), "d24", "d36", "d48", any "dN" (channels = 64 * N,
heads = N, rounded to llm.c's table for the named sizes), or a model file whose header carries the shape;
and, through the `gpt3:` prefix (models/__init__.py), the GPT-3 paper's sizes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..formats import (HEADER_BYTES, MODEL_FILE, atomic_write, bf16_bits_to_f32, check_file_size, f32_to_bf16_bits,
                       new_header, read_header)
from ..layout import Layout, build_layout
from .base import FlatModel, TransformerShape

GPT2_VOCAB = 50257
GPT2_PADDED_VOCAB = 50304  # next multiple of 128: keeps the LM-head GEMM well tiled
GPT2_EOT = 50256

# llm.c's named depths (the GPT-2 family): depth -> (channels, heads)
_NAMED = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25), 60: (1920, 30),
          72: (2880, 30), 84: (3456, 36)}

# the GPT-3 paper's Table 2.1: name -> (n_layer, d_model, n_heads); d_head = d_model / n_heads, T = 2048.
# 13B: the table's d_model 5140 is not its 40 heads x d_head 128; 5120 is. Dense attention in every
# layer: the paper's alternating locally banded sparse layers are not modelled. The CUDA attention
# kernels take d_head 64 or 128, so 760M (96) and 2.7B (80) run on the numpy backend and the planner only.
GPT3_SIZES = {"125M": (12, 768, 12), "350M": (24, 1024, 16), "760M": (24, 1536, 16), "1.3B": (24, 2048, 32),
              "2.7B": (32, 2560, 32), "6.7B": (32, 4096, 32), "13B": (40, 5120, 40), "175B": (96, 12288, 96)}
GPT3_SEQ_LEN = 2048


def depth_shape(desc: str, family: str, example: str) -> tuple[int, int, int]:
    """(layers, channels, heads) of a 'dN' descriptor, scaled as llm.c scales GPT-2 (every family's dN
    follows it); family and example: what the error message names and shows."""
    m = re.fullmatch(r"d(\d+)", desc)
    if not m:
        raise ValueError(f"unknown {family} descriptor {desc!r}: expected dN (e.g. {example}) or a model file path")
    depth = int(m.group(1))
    if depth < 1:
        raise ValueError(f"model depth must be >= 1, got {desc!r}")
    return (depth, *_NAMED.get(depth, (64 * depth, depth)))


@dataclass(frozen=True)
class GPTConfig(TransformerShape):
    n_layer: int
    n_head: int
    n_embd: int
    max_seq_len: int = 1024
    vocab_size: int = GPT2_VOCAB
    padded_vocab_size: int = GPT2_PADDED_VOCAB

    def __post_init__(self):
        self.check_shape()

    @property
    def n_kv_head(self) -> int:
        return self.n_head  # every query head has its own key/value head

    @property
    def qkv_width(self) -> int:
        return 3 * self.n_embd

    @classmethod
    def from_descriptor(cls, desc: str, **overrides) -> "GPTConfig":
        """'d12' -> GPT-2 124M; any 'dN' gets 64*N channels and N heads unless llm.c names it."""
        depth, channels, heads = depth_shape(desc, "model", "d12")
        return cls(n_layer=depth, n_head=heads, n_embd=channels, **overrides)

    @classmethod
    def from_gpt3(cls, size: str) -> "GPTConfig":
        """'175B' -> the GPT-3 paper's 175B shape, on GPT-2's vocabulary (as the paper's BPE)."""
        if size not in GPT3_SIZES:
            raise ValueError(f"unknown GPT-3 size {size!r}: expected one of {', '.join(GPT3_SIZES)}")
        n_layer, channels, heads = GPT3_SIZES[size]
        return cls(n_layer=n_layer, n_head=heads, n_embd=channels, max_seq_len=GPT3_SEQ_LEN)

    def num_parameters(self) -> int:
        return param_layout(self).total

    def flops_per_token(self, T: int) -> int:
        """llm.c's 6N + 6LCT: the training FLOPs of one token at sequence length T (attention's included)."""
        return 6 * self.num_parameters() + 6 * self.n_layer * self.n_embd * T


def param_layout(cfg: GPTConfig) -> Layout:
    """The 16 parameter tensors in llm.c's order; per-layer tensors are stacked along dim 0."""
    L, C, Vp, maxT = cfg.n_layer, cfg.n_embd, cfg.padded_vocab_size, cfg.max_seq_len
    # decay follows llm.c/nanoGPT: every tensor of 2+ dims (matmul weights and embeddings) decays;
    # columns: name, shape, decay, per_layer (stacked along dim 0, one slice per block)
    return build_layout([
        ("wte", (Vp, C), True, False),
        ("wpe", (maxT, C), True, False),
        ("ln1w", (L, C), False, True),
        ("ln1b", (L, C), False, True),
        ("qkvw", (L, 3 * C, C), True, True),
        ("qkvb", (L, 3 * C), False, True),
        ("attprojw", (L, C, C), True, True),
        ("attprojb", (L, C), False, True),
        ("ln2w", (L, C), False, True),
        ("ln2b", (L, C), False, True),
        ("fcw", (L, 4 * C, C), True, True),
        ("fcb", (L, 4 * C), False, True),
        ("fcprojw", (L, C, 4 * C), True, True),
        ("fcprojb", (L, C), False, True),
        ("lnfw", (C,), False, False),
        ("lnfb", (C,), False, False),
    ])


# rows of logits alive at once: the LM head runs chunk by chunk (logits, loss, dlogits, and the two
# backward GEMMs of each chunk before the next), so at B=64, T=1024 its buffer is 8x smaller than whole
# logits (0.8 GB instead of 6.6 GB); 8192 rows keep each GEMM large enough to run at the full rate
LM_HEAD_CHUNK_ROWS = 8192

# activation tensors whose elements are float32 on every backend (statistics and losses);
# everything else is in the backend's activation dtype (fp32 for numpy, bf16 for CUDA)
FP32_ACTIVATIONS = frozenset({"ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd",
                              "att_lse", "losses", "dresidual_sum", "datt_dot"})


RECOMPUTE_LEVELS = (0, 1, 2, 3)


def recompute_slots(n_layer: int, recompute: int) -> tuple[int, int, int]:
    """Layers of buffers the activation table keeps, by recompute level: (the MLP activation's, the norms'
    outputs', every other block buffer's); 1 where the backward recomputes them into one shared slot."""
    if recompute not in RECOMPUTE_LEVELS:
        raise ValueError(f"recompute must be one of {RECOMPUTE_LEVELS}, got {recompute}")
    return tuple(1 if recompute >= level else n_layer for level in (1, 2, 3))


def activation_layout(cfg: GPTConfig, B: int, T: int, recompute: int = 0) -> Layout:
    """Forward activations kept for the backward pass, plus the backward's scratch buffers.

    recompute 0: keep everything; 1: GeLU outputs are recomputed in the backward (one shared buffer);
    2: also the layernorm outputs (one shared buffer each; the backward recomputes them from the
    residual stream and the saved mean/rstd); 3: every block keeps only its input (the residual
    stream), and the backward runs the block's forward again into one block's buffers.
    """
    L, C, H, Vp = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size
    gelu_layers, ln_layers, block_layers = recompute_slots(L, recompute)
    return build_layout([
        ("encoded", (B, T, C)),
        ("ln1", (ln_layers, B, T, C)),
        ("ln1_mean", (block_layers, B, T)),
        ("ln1_rstd", (block_layers, B, T)),
        ("qkv", (block_layers, B, T, 3 * C)),
        ("atty", (block_layers, B, T, C)),
        ("att_lse", (block_layers, B, H, T)),
        ("residual2", (block_layers, B, T, C)),
        ("ln2", (ln_layers, B, T, C)),
        ("ln2_mean", (block_layers, B, T)),
        ("ln2_rstd", (block_layers, B, T)),
        ("fch", (block_layers, B, T, 4 * C)),
        ("fch_gelu", (gelu_layers, B, T, 4 * C)),
        ("residual3", (L, B, T, C)),  # the blocks' outputs: each the next block's input
        ("lnf", (B, T, C)),
        ("lnf_mean", (B, T)),
        ("lnf_rstd", (B, T)),
        ("losses", (B, T)),
        # one chunk of rows of the LM head's logits: lm_head_loss's workspace (the classifier's in-place dlogits,
        # or on Hopper the exp of the logits that the fused path keeps)
        ("logits", (min(B * T, LM_HEAD_CHUNK_ROWS), Vp)),
        # backward scratch
        ("dresidual", (B, T, C)),
        ("dresidual_sum", (C,)),  # dresidual summed over rows by the layernorm backward: a projection's dbias
        ("datt_dot", (B, H, T)),  # the attention backward's D = rowsum(dO * O) per head, from attproj's backward
        ("dbtc", (B, T, C)),
        ("dbt4c", (B, T, 4 * C)),
        ("dqkv", (B, T, 3 * C)),
    ])


def init_params(cfg: GPTConfig, seed: int = 0) -> np.ndarray:
    """GPT-2 initialization as llm.c: N(0, 0.02) weights and embeddings, residual projections scaled
    by 1/sqrt(2L), zero biases, unit layernorm gains. The padded vocabulary rows stay zero: no token
    selects them and the classifier gives them no gradient."""
    layout = param_layout(cfg)
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.total, dtype=np.float32)
    views = layout.views(flat)
    residual_std = 0.02 / np.sqrt(2 * cfg.n_layer)
    for t in layout.tensors:
        if t.name in ("ln1w", "ln2w", "lnfw"):
            views[t.name][...] = 1.0
        elif t.name == "wte":
            views[t.name][:cfg.vocab_size] = rng.normal(0.0, 0.02, (cfg.vocab_size, cfg.n_embd))
        elif t.decay:
            std = residual_std if t.name in ("attprojw", "fcprojw") else 0.02
            views[t.name][...] = rng.normal(0.0, std, t.shape)
    return flat


class GPT(FlatModel):
    """Parameters, gradients and activations of one model for a fixed (B, T), on one backend."""
    BLOCK_ACTIVATIONS = ("ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "att_lse", "residual2", "ln2", "ln2_mean",
                         "ln2_rstd", "fch", "fch_gelu", "residual3")

    def __init__(self, cfg: GPTConfig, backend, B: int, T: int, params: np.ndarray, recompute: int = 0,
                 storage=None):
        super().__init__(cfg, backend, B, T, params, recompute, storage, param_layout(cfg),
                         activation_layout(cfg, B, T, recompute), FP32_ACTIVATIONS)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, batch, dloss: float = 0.0):
        """The forward up to the final layernorm; with batch.targets also acts["losses"], and with
        dloss != 0 (1/(B*T*grad_accum) in training) the LM head's backward too: dwte += and d(lnf) into
        acts["dbtc"], chunk by chunk, so whole logits are never stored. batch: the backend's
        upload_batch result. logits() gives the logits of an inference forward."""
        self.forward_schedule(self.block_acts, self.attend, batch.tokens, self.position_rows(0, self.T))
        if batch.targets is not None:
            self.lm_head_loss(batch.targets, dloss)

    def forward_schedule(self, acts, attend, tokens, wpe_rows):
        """The forward up to the final layernorm (lnf), over activations wherever the caller keeps them:
        acts(l) gives block l's buffers (acts(None) the ones outside the blocks: encoded, lnf*) and
        attend(l, block) fills block["atty"] (and block["att_lse"]) from block["qkv"]. The full forward
        passes its activation tables; the KV-cache decoder (kv_cache.py) one-row buffers and attention
        over its cache, so the block schedule is written only here."""
        ops, p, L, storage = self.ops, self.p, self.cfg.n_layer, self.storage
        top = acts(None)
        storage.gather_top()
        ops.encoder_forward(top["encoded"], tokens, p["wte"], wpe_rows)
        first = acts(0)
        storage.gather_layer(0, prefetch=1)
        ops.layernorm_forward(first["ln1"], first["ln1_mean"], first["ln1_rstd"], top["encoded"],
                              p["ln1w"][0], p["ln1b"][0])
        for l in range(L):
            a = acts(l)
            residual_in = top["encoded"] if l == 0 else acts(l - 1)["residual3"]
            self.block_forward_to_mlp(l, a, residual_in, attend)
            # residual3 may be residual_in (the decoder's one-row buffers): it was read into residual2 above
            ops.matmul_forward(a["residual3"], a["fch_gelu"], p["fcprojw"][l], p["fcprojb"][l],
                               residual=a["residual2"])
            if l + 1 < L:  # the next block's first layernorm
                storage.gather_layer(l + 1, prefetch=l + 2)
                nxt = acts(l + 1)
                ops.layernorm_forward(nxt["ln1"], nxt["ln1_mean"], nxt["ln1_rstd"], a["residual3"], p["ln1w"][l + 1],
                                      p["ln1b"][l + 1])
            else:  # the final layernorm
                ops.layernorm_forward(top["lnf"], top["lnf_mean"], top["lnf_rstd"], a["residual3"], p["lnfw"],
                                      p["lnfb"])

    def block_forward_to_mlp(self, l, a, residual_in, attend):
        """Block l's forward from its first layernorm's output to the MLP's GeLU: everything its backward
        reads (the MLP's second matmul and the residual add feed only the next block)."""
        ops, p = self.ops, self.p
        ops.matmul_forward(a["qkv"], a["ln1"], p["qkvw"][l], p["qkvb"][l])
        attend(l, a)
        ops.matmul_forward(a["residual2"], a["atty"], p["attprojw"][l], p["attprojb"][l], residual=residual_in)
        ops.layernorm_forward(a["ln2"], a["ln2_mean"], a["ln2_rstd"], a["residual2"], p["ln2w"][l], p["ln2b"][l])
        ops.matmul_forward(a["fch_gelu"], a["ln2"], p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"])

    def attend(self, l, a):
        self.ops.attention_forward(a["atty"], a["att_lse"], a["qkv"], self.cfg.n_head)

    def position_rows(self, start: int, stop: int):
        """What the schedule needs of positions start..stop-1: their rows of wpe."""
        return self.p["wpe"][start:stop]

    def decode_buffers(self, rows: int = 1):
        """Buffers for a decoding step of `rows` sequences at one position (B = rows, T = 1): (outside the
        blocks, one block's, shared by every block); the decoder supplies qkv and may replace atty."""
        ops, C, Vp = self.ops, self.cfg.n_embd, self.cfg.padded_vocab_size
        z = lambda *shape, fp32=False: ops.zeros((rows, 1) + shape, fp32=fp32)  # noqa: E731
        ln, mean, rstd, residual3 = z(C), z(fp32=True), z(fp32=True), z(C)
        top = {"encoded": z(C), "lnf": z(C), "lnf_mean": mean, "lnf_rstd": rstd, "logits": z(Vp)}
        block = {"ln1": ln, "ln1_mean": mean, "ln1_rstd": rstd, "ln2": ln, "ln2_mean": mean,
                 "ln2_rstd": rstd, "atty": z(C), "att_lse": None, "residual2": z(C),
                 "fch": z(4 * C), "fch_gelu": z(4 * C), "residual3": residual3}
        return top, block

    # ---- backward -------------------------------------------------------------------------------
    def backward(self, batch, layer_done=None):
        """Accumulates into self.grads; needs forward() to have run with dloss != 0 on the same batch
        (which ran the LM head's backward: dwte, and d(lnf) in acts["dbtc"]). layer_done(l), when given,
        is called as soon as layer l's gradients are complete (to start reducing them)."""
        ops, p, g, a, L, H = self.ops, self.p, self.g, self.acts, self.cfg.n_layer, self.cfg.n_head
        storage = self.storage
        dresidual, dres_sum = a["dresidual"], a["dresidual_sum"]
        # attproj's and fcproj's bias gradients are dresidual summed over rows: each layernorm backward sums
        # the dresidual it writes (dres_sum), and the projection that reads that dresidual next adds the sum
        # (no pass of its own over dresidual; a separate fp32 buffer, since under ZeRO-2/3 every layer's
        # gradients share one buffer and the sum for layer l - 1 is made during layer l's backward)
        ops.zero_(dresidual)
        ops.zero_(dres_sum)
        ops.layernorm_backward(dresidual, g["lnfw"], g["lnfb"], a["dbtc"], a["residual3"][L - 1], p["lnfw"],
                               a["lnf_mean"], a["lnf_rstd"], dinp_sum=dres_sum)
        for l in reversed(range(L)):
            b = self.block_acts(l)
            residual_in = a["encoded"] if l == 0 else a["residual3"][l - 1]
            storage.gather_layer(l, prefetch=l - 1)
            if self.recompute >= 3:  # the whole block again, from its input
                ops.layernorm_forward(b["ln1"], b["ln1_mean"], b["ln1_rstd"], residual_in, p["ln1w"][l],
                                      p["ln1b"][l])
                self.block_forward_to_mlp(l, b, residual_in, self.attend)
            elif self.recompute == 2:
                ops.layernorm_forward(b["ln1"], b["ln1_mean"], b["ln1_rstd"], residual_in, p["ln1w"][l],
                                      p["ln1b"][l])
                ops.layernorm_forward(b["ln2"], b["ln2_mean"], b["ln2_rstd"], b["residual2"], p["ln2w"][l],
                                      p["ln2b"][l])
            # MLP: dresidual -> fcproj -> (GeLU') -> fc -> ln2
            ops.accumulate(g["fcprojb"][l], dres_sum)
            # fc's bias gradient, colsum(dbt4c), comes with fcproj's dinp (on Hopper from the GEMM's epilogue); under
            # recompute 1 and 2 so does fch_gelu, gelu(fch), before fcproj's dweight reads it (fch is read anyway)
            ops.matmul_backward(a["dbt4c"], g["fcprojw"][l], None, dresidual, b["fch_gelu"],
                                p["fcprojw"][l], dinp_gelu_pre=b["fch"], dinp_gelu_dbias=g["fcb"][l],
                                gelu_of_pre=b["fch_gelu"] if self.recompute in (1, 2) else None)
            ops.matmul_backward(a["dbtc"], g["fcw"][l], None, a["dbt4c"], b["ln2"], p["fcw"][l])
            ops.zero_(dres_sum)
            ops.layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], a["dbtc"], b["residual2"], p["ln2w"][l],
                                   b["ln2_mean"], b["ln2_rstd"], dinp_sum=dres_sum)
            # attention: dresidual -> attproj -> attention -> qkv -> ln1
            ops.accumulate(g["attprojb"][l], dres_sum)
            ops.matmul_backward(a["dbtc"], g["attprojw"][l], None, dresidual, b["atty"], p["attprojw"][l],
                                dinp_head_dot=a["datt_dot"], head_dot_with=b["atty"])
            # qkv's bias gradient, colsum(dqkv), comes with dqkv (on Hopper from the attention kernel itself)
            ops.attention_backward(a["dqkv"], a["dbtc"], b["qkv"], b["atty"], b["att_lse"], H,
                                   dout_head_dot=a["datt_dot"], dqkv_bias=g["qkvb"][l])
            ops.matmul_backward(a["dbtc"], g["qkvw"][l], None, a["dqkv"], b["ln1"], p["qkvw"][l])
            if l > 0:
                ops.zero_(dres_sum)
            ops.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], a["dbtc"], residual_in, p["ln1w"][l],
                                   b["ln1_mean"], b["ln1_rstd"], dinp_sum=dres_sum if l > 0 else None)
            storage.layer_grads_done(l)
            if layer_done is not None:
                layer_done(l)
        ops.encoder_backward(g["wte"], g["wpe"][:self.T], dresidual, batch)
        storage.top_grads_done()



# ---- llm.c's model file (formats.py describes it) --------------------------------------------------
MODEL_VERSION = {dtype: version for version, dtype in MODEL_FILE.versions.items()}  # "fp32" -> 3, "bf16" -> 5


def write_model_file(path: str, cfg: GPTConfig, params: np.ndarray, dtype: str) -> None:
    header = new_header(MODEL_FILE, MODEL_VERSION[dtype], [cfg.max_seq_len, cfg.vocab_size, cfg.n_layer,
                                                           cfg.n_head, cfg.n_embd, cfg.padded_vocab_size])
    data = f32_to_bf16_bits(params) if dtype == "bf16" else np.ascontiguousarray(params)

    def write(f):
        f.write(header.tobytes())
        f.write(memoryview(data).cast("B"))
    atomic_write(path, write)


def read_model_file_header(path: str, error) -> tuple[GPTConfig, str]:
    """(GPTConfig, "fp32" | "bf16") of an llm.c model file, after checking its size matches."""
    header, size = read_header(path, MODEL_FILE, error)
    max_seq_len, vocab_size, n_layer, n_head, n_embd, padded_vocab = (int(x) for x in header[2:8])
    try:
        cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_seq_len=max_seq_len,
                        vocab_size=vocab_size, padded_vocab_size=padded_vocab)
    except ValueError as e:
        raise error(f"{path}: bad model shape in header: {e}") from e
    dtype = MODEL_FILE.versions[int(header[1])]
    param_bytes = 4 if dtype == "fp32" else 2
    check_file_size(path, MODEL_FILE, size, HEADER_BYTES + param_layout(cfg).total * param_bytes, error)
    return cfg, dtype


def read_model_file(path: str, error) -> tuple[GPTConfig, np.ndarray]:
    cfg, dtype = read_model_file_header(path, error)
    n = param_layout(cfg).total
    raw = np.fromfile(path, dtype=np.float32 if dtype == "fp32" else np.uint16, count=n, offset=HEADER_BYTES)
    return cfg, raw if dtype == "fp32" else bf16_bits_to_f32(raw)


# the family interface (models/__init__.py)
Config, Model = GPTConfig, GPT
