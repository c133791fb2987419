"""The LLaMA-3 family: its shape (LlamaConfig), parameter and activation tables, initialization, the forward
and backward schedule over a backend's ops, and llm.c's LLaMA model file.

The network is Meta's Llama 3 as transformers' LlamaForCausalLM computes it: token embedding (no position
embedding), pre-norm blocks with RMSNorm, attention with RoPE (rotate_half pairing, numpy_llama_ops.py) and
grouped key/value heads, a SwiGLU MLP, no biases, a final RMSNorm and an untied LM head (tied as an option).
The schedule mirrors GPT-2's: residual adds fused into the projection matmuls, RoPE applied in place to the qkv
matmul's output (the backward rotates dqkv back), and GPT-2's LM head, run chunk by chunk with its loss
and backward inside the training forward, over lm_head (or wte when tied).
`recompute` trades SwiGLU (1) and RMSNorm (2) outputs for a second compute, as GPT-2's GeLU and layernorm,
and at 3 keeps only each block's input, running the block's forward again inside its backward.

`-e llama:dN`: N layers, channels and query heads as GPT-2's dN, key/value heads the largest divisor of the
query heads that is at most a third of them (llama:d12 = 12 layers, C=768, 12 query and 4 key/value heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.numpy_llama_ops import LLAMA31_SCALING, rope_tables
from ..formats import (HEADER_BYTES, HEADER_INTS, HeaderFormat, atomic_write, bf16_bits_to_f32, check_file_size,
                       f32_to_bf16_bits, new_header, read_header)
from ..layout import Layout, build_layout
from .base import FlatModel, TransformerShape
from .gpt2 import GPT2_PADDED_VOCAB, GPT2_VOCAB, LM_HEAD_CHUNK_ROWS, depth_shape, recompute_slots

VOCAB_ALIGN = 128  # the padded vocabulary is the next multiple of this (the LM-head GEMM stays well tiled)


def float32_value(x: float) -> float:
    """The shortest decimal of x's float32 rounding (1.3 -> 1.3, not 1.2999999523): llm.c's file stores these
    fields as float32, and a config must read back equal to the one written."""
    return float(str(np.float32(x)))


def ffn_hidden_size(n_embd: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """The SwiGLU width as Meta's reference computes it: 2/3 of 4C, times the multiplier, rounded up to a
    multiple of multiple_of (C=4096, 1.3, 1024 -> 14336, Llama 3 8B)."""
    hidden = int(2 * (4 * n_embd) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_shape_for(n_embd: int, hidden: int) -> tuple[float | None, int]:
    """(ffn_dim_multiplier, multiple_of) that give exactly `hidden` (a Hugging Face intermediate_size): the
    defaults (None, 256) where they do, else multiple_of = hidden and a multiplier (a float32 value, as llm.c's
    file stores it) that brings Meta's 2/3 * 4C to at most hidden when it is larger."""
    if ffn_hidden_size(n_embd, None, 256) == hidden:
        return None, 256
    base = int(2 * (4 * n_embd) / 3)
    multiplier = None if base <= hidden else float32_value(hidden / base)
    assert ffn_hidden_size(n_embd, multiplier, hidden) == hidden
    return multiplier, hidden


@dataclass(frozen=True)
class LlamaConfig(TransformerShape):
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1's frequency scaling (numpy_llama_ops.LLAMA31_SCALING)
    max_seq_len: int = 1024
    vocab_size: int = GPT2_VOCAB
    padded_vocab_size: int = GPT2_PADDED_VOCAB
    tied_embeddings: bool = False  # the LM head is wte (no lm_head tensor)

    def __post_init__(self):
        for name in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float32_value(getattr(self, name)))
        self.check_shape(self.n_kv_head, self.multiple_of, self.max_seq_len)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.head_size % 2:
            raise ValueError(f"RoPE needs an even head dimension, n_embd / n_head = {self.head_size}")

    @property
    def ffn_hidden(self) -> int:
        return ffn_hidden_size(self.n_embd, self.ffn_dim_multiplier, self.multiple_of)

    @property
    def qkv_width(self) -> int:
        return (self.n_head + 2 * self.n_kv_head) * self.head_size

    @classmethod
    def from_descriptor(cls, desc: str, **overrides) -> "LlamaConfig":
        depth, channels, heads = depth_shape(desc, "LLaMA", "llama:d12")
        kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 3))
        return cls(n_layer=depth, n_head=heads, n_kv_head=kv_heads, n_embd=channels, **overrides)

    def num_parameters(self) -> int:
        return param_layout(self).total

    def flops_per_token(self, T: int) -> int:
        """Training FLOPs of one token: 6 per matmul weight (the embedding lookup is none) plus attention's
        6LCT, as llm.c counts GPT-2's."""
        matmul_weights = self.num_parameters() - (0 if self.tied_embeddings else self.padded_vocab_size * self.n_embd)
        return 6 * matmul_weights + 6 * self.n_layer * self.n_embd * T


def param_layout(cfg: LlamaConfig) -> Layout:
    """Per-layer tensors stacked along dim 0; fcw is [gate | up] (Meta's w1 over w3), as swiglu_forward reads
    it. llm.c's file stores the same tensors in another order and split (write_model_file)."""
    L, C, H, Vp = cfg.n_layer, cfg.n_embd, cfg.ffn_hidden, cfg.padded_vocab_size
    # columns: name, shape, decay (every matmul weight and embedding), per_layer
    entries = [
        ("wte", (Vp, C), True, False),
        ("ln1w", (L, C), False, True),
        ("qkvw", (L, cfg.qkv_width, C), True, True),
        ("attprojw", (L, C, C), True, True),
        ("ln2w", (L, C), False, True),
        ("fcw", (L, 2 * H, C), True, True),
        ("fcprojw", (L, C, H), True, True),
        ("lnfw", (C,), False, False),
    ]
    if not cfg.tied_embeddings:
        entries.append(("lm_head", (Vp, C), True, False))
    return build_layout(entries)


FP32_ACTIVATIONS = frozenset({"ln1_rstd", "ln2_rstd", "lnf_rstd", "att_lse", "losses", "datt_dot"})


def activation_layout(cfg: LlamaConfig, B: int, T: int, recompute: int = 0) -> Layout:
    """As GPT-2's: recompute 1 keeps one shared SwiGLU output buffer, 2 also one per RMSNorm output, 3 one
    block's buffers in all (every block keeps only its input, the residual stream)."""
    L, C, NH, H, Vp = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.ffn_hidden, cfg.padded_vocab_size
    swiglu_layers, norm_layers, block_layers = recompute_slots(L, recompute)
    return build_layout([
        ("encoded", (B, T, C)),
        ("ln1", (norm_layers, B, T, C)),
        ("ln1_rstd", (block_layers, B, T)),
        ("qkv", (block_layers, B, T, cfg.qkv_width)),  # q and k rotated (RoPE in place)
        ("atty", (block_layers, B, T, C)),
        ("att_lse", (block_layers, B, NH, T)),
        ("residual2", (block_layers, B, T, C)),
        ("ln2", (norm_layers, B, T, C)),
        ("ln2_rstd", (block_layers, B, T)),
        ("fch", (block_layers, B, T, 2 * H)),  # [gate | up]
        ("swiglu", (swiglu_layers, B, T, H)),
        ("residual3", (L, B, T, C)),
        ("lnf", (B, T, C)),
        ("lnf_rstd", (B, T)),
        ("losses", (B, T)),
        # one chunk of rows of the LM head's logits (the classifier overwrites them with dlogits)
        ("logits", (min(B * T, LM_HEAD_CHUNK_ROWS), Vp)),
        # backward scratch
        ("dresidual", (B, T, C)),
        ("datt_dot", (B, NH, T)),  # the attention backward's D = rowsum(dO * O) per head, from attproj's backward
        ("dbtc", (B, T, C)),
        ("dbth", (B, T, H)),
        ("dbt2h", (B, T, 2 * H)),
        ("dqkv", (B, T, cfg.qkv_width)),
    ])


def init_params(cfg: LlamaConfig, seed: int = 0) -> np.ndarray:
    """N(0, 0.02) weights and embeddings, residual projections scaled by 1/sqrt(2L) (as GPT-2 in llm.c),
    unit RMSNorm gains; padded vocabulary rows stay zero (no token selects them, no logit of theirs counts)."""
    layout = param_layout(cfg)
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.total, dtype=np.float32)
    views = layout.views(flat)
    residual_std = 0.02 / np.sqrt(2 * cfg.n_layer)
    for t in layout.tensors:
        if not t.decay:  # the RMSNorm gains
            views[t.name][...] = 1.0
        elif t.name in ("wte", "lm_head"):
            views[t.name][:cfg.vocab_size] = rng.normal(0.0, 0.02, (cfg.vocab_size, cfg.n_embd))
        else:
            std = residual_std if t.name in ("attprojw", "fcprojw") else 0.02
            views[t.name][...] = rng.normal(0.0, std, t.shape)
    return flat


class Llama(FlatModel):
    """Parameters, gradients and activations of one model for a fixed (B, T), on one backend; the RoPE
    tables (fp32, max_seq_len rows) live on the backend beside them, computed once."""
    BLOCK_ACTIVATIONS = ("ln1", "ln1_rstd", "qkv", "atty", "att_lse", "residual2", "ln2", "ln2_rstd", "fch",
                         "swiglu", "residual3")

    def __init__(self, cfg: LlamaConfig, backend, B: int, T: int, params: np.ndarray, recompute: int = 0,
                 storage=None):
        super().__init__(cfg, backend, B, T, params, recompute, storage, param_layout(cfg),
                         activation_layout(cfg, B, T, recompute), FP32_ACTIVATIONS)
        cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta,
                               LLAMA31_SCALING if cfg.use_scaled_rope else None)
        self.rope_cos, self.rope_sin = backend.from_numpy(cos), backend.from_numpy(sin)
        self.head = "wte" if cfg.tied_embeddings else "lm_head"  # the LM head's weight

    def position_rows(self, start: int, stop: int):
        """What the schedule needs of positions start..stop-1: their rows of the RoPE tables."""
        return self.rope_cos[start:stop], self.rope_sin[start:stop]

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, batch, dloss: float = 0.0):
        """As GPT-2's forward: up to the final RMSNorm; with targets the losses, and with dloss != 0 the LM
        head's backward (d(lnf) into acts["dbtc"]). logits() gives the logits of an inference forward."""
        self.forward_schedule(self.block_acts, self.attend, batch.tokens, self.position_rows(0, self.T))
        if batch.targets is not None:
            self.lm_head_loss(batch.targets, dloss)

    def forward_schedule(self, acts, attend, tokens, position_rows):
        """The forward up to the final RMSNorm (lnf) over activations wherever the caller keeps them
        (gpt2.GPT.forward_schedule describes acts and attend); position_rows: the (cos, sin) rows of the tokens'
        positions."""
        ops, p, cfg, storage = self.ops, self.p, self.cfg, self.storage
        L, eps = cfg.n_layer, cfg.norm_eps
        top = acts(None)
        storage.gather_top()
        ops.embedding_forward(top["encoded"], tokens, p["wte"])
        first = acts(0)
        storage.gather_layer(0, prefetch=1)
        ops.rmsnorm_forward(first["ln1"], first["ln1_rstd"], top["encoded"], p["ln1w"][0], eps)
        for l in range(L):
            a = acts(l)
            residual_in = top["encoded"] if l == 0 else acts(l - 1)["residual3"]
            self.block_forward_to_mlp(l, a, residual_in, attend, position_rows)
            # residual3 may be residual_in (the decoder's one-row buffers): it was read into residual2 above
            ops.matmul_forward(a["residual3"], a["swiglu"], p["fcprojw"][l], residual=a["residual2"])
            if l + 1 < L:  # the next block's first RMSNorm
                storage.gather_layer(l + 1, prefetch=l + 2)
                nxt = acts(l + 1)
                out, rstd, weight = nxt["ln1"], nxt["ln1_rstd"], p["ln1w"][l + 1]
            else:  # the final RMSNorm
                out, rstd, weight = top["lnf"], top["lnf_rstd"], p["lnfw"]
            ops.rmsnorm_forward(out, rstd, a["residual3"], weight, eps)

    def block_forward_to_mlp(self, l, a, residual_in, attend, position_rows):
        """Block l's forward from its first RMSNorm's output to the SwiGLU output: everything its backward
        reads (the MLP's second matmul and the residual add feed only the next block)."""
        ops, p, cfg = self.ops, self.p, self.cfg
        cos, sin = position_rows
        ops.matmul_forward(a["qkv"], a["ln1"], p["qkvw"][l])
        ops.rope_forward(a["qkv"], a["qkv"], cos, sin, cfg.n_head, cfg.n_kv_head)
        attend(l, a)
        ops.matmul_forward(a["residual2"], a["atty"], p["attprojw"][l], residual=residual_in)
        ops.rmsnorm_forward(a["ln2"], a["ln2_rstd"], a["residual2"], p["ln2w"][l], cfg.norm_eps)
        ops.matmul_forward(a["fch"], a["ln2"], p["fcw"][l])
        ops.swiglu_forward(a["swiglu"], a["fch"])

    def decode_buffers(self, rows: int = 1):
        """Buffers for a decoding step of `rows` sequences at one position (B = rows, T = 1): (outside the
        blocks, one block's, shared by every block); the decoder supplies qkv and may replace atty."""
        ops, C, H, Vp = self.ops, self.cfg.n_embd, self.cfg.ffn_hidden, self.cfg.padded_vocab_size
        z = lambda *shape, fp32=False: ops.zeros((rows, 1) + shape, fp32=fp32)  # noqa: E731
        ln, rstd, residual3 = z(C), z(fp32=True), z(C)
        top = {"encoded": z(C), "lnf": z(C), "lnf_rstd": rstd, "logits": z(Vp)}
        block = {"ln1": ln, "ln1_rstd": rstd, "ln2": ln, "ln2_rstd": rstd, "atty": z(C), "att_lse": None,
                 "residual2": z(C), "fch": z(2 * H), "swiglu": z(H), "residual3": residual3}
        return top, block

    def attend(self, l, a):
        self.ops.attention_forward_gqa(a["atty"], a["att_lse"], a["qkv"], self.cfg.n_head, self.cfg.n_kv_head)

    # ---- backward -------------------------------------------------------------------------------
    def backward(self, batch, layer_done=None):
        """Accumulates into self.grads after forward() with dloss != 0 on the same batch (which ran the LM
        head's backward: d(lnf) in acts["dbtc"]); layer_done(l) is called as soon as layer l's gradients are
        complete."""
        ops, p, g, a, cfg = self.ops, self.p, self.g, self.acts, self.cfg
        NH, NKV, eps = cfg.n_head, cfg.n_kv_head, cfg.norm_eps
        cos, sin = self.position_rows(0, self.T)
        dresidual = a["dresidual"]
        ops.zero_(dresidual)
        ops.rmsnorm_backward(dresidual, g["lnfw"], a["dbtc"], a["residual3"][cfg.n_layer - 1], p["lnfw"],
                             a["lnf_rstd"])
        for l in reversed(range(cfg.n_layer)):
            b = self.block_acts(l)
            residual_in = a["encoded"] if l == 0 else a["residual3"][l - 1]
            self.storage.gather_layer(l, prefetch=l - 1)
            if self.recompute >= 3:  # the whole block again, from its input
                ops.rmsnorm_forward(b["ln1"], b["ln1_rstd"], residual_in, p["ln1w"][l], eps)
                self.block_forward_to_mlp(l, b, residual_in, self.attend, (cos, sin))
            elif self.recompute == 2:
                ops.rmsnorm_forward(b["ln1"], b["ln1_rstd"], residual_in, p["ln1w"][l], eps)
                ops.rmsnorm_forward(b["ln2"], b["ln2_rstd"], b["residual2"], p["ln2w"][l], eps)
            if self.recompute in (1, 2):
                ops.swiglu_forward(b["swiglu"], b["fch"])
            # MLP: dresidual -> fcproj -> SwiGLU -> fc -> ln2
            ops.matmul_backward(a["dbth"], g["fcprojw"][l], None, dresidual, b["swiglu"], p["fcprojw"][l])
            ops.swiglu_backward(a["dbt2h"], a["dbth"], b["fch"])
            ops.matmul_backward(a["dbtc"], g["fcw"][l], None, a["dbt2h"], b["ln2"], p["fcw"][l])
            ops.rmsnorm_backward(dresidual, g["ln2w"][l], a["dbtc"], b["residual2"], p["ln2w"][l], b["ln2_rstd"])
            # attention: dresidual -> attproj -> attention -> RoPE -> qkv -> ln1
            ops.matmul_backward(a["dbtc"], g["attprojw"][l], None, dresidual, b["atty"], p["attprojw"][l],
                                dinp_head_dot=a["datt_dot"], head_dot_with=b["atty"])
            ops.attention_backward_gqa(a["dqkv"], a["dbtc"], b["qkv"], b["atty"], b["att_lse"], NH, NKV,
                                       dout_head_dot=a["datt_dot"])
            ops.rope_backward(a["dqkv"], a["dqkv"], cos, sin, NH, NKV)
            ops.matmul_backward(a["dbtc"], g["qkvw"][l], None, a["dqkv"], b["ln1"], p["qkvw"][l])
            ops.rmsnorm_backward(dresidual, g["ln1w"][l], a["dbtc"], residual_in, p["ln1w"][l], b["ln1_rstd"])
            self.storage.layer_grads_done(l)
            if layer_done is not None:
                layer_done(l)
        ops.embedding_backward(g["wte"], dresidual, batch)
        self.storage.top_grads_done()


# ---- llm.c's LLaMA model file ---------------------------------------------------------------------
# train_llama3.py's write_model: 256 int32 then 256 float32 of header, then the tensors. Ints: [0] magic,
# [1] version (3 fp32, 5 bf16), [2] block_size, [3] vocab_size, [4] n_layer, [5] n_head, [6] n_kv_head,
# [7] n_embd, [8] multiple_of, [9] use_scaled_rope, [10] [11] Llama version major, minor (3, 1); gpt2cu's
# own slots, zero in llm.c's files: [12] 1 when the LM head is tied to wte, [13] padded vocab size (0: the
# next multiple of 128). Floats: [0] ffn_dim_multiplier (0: none), [1] norm_eps, [2] rope_theta.
# Tensors, each over the real vocabulary V: wte (V, C), ln_1 (L, C), c_attn (L, qkv_width, C), attn c_proj
# (L, C, C), ln_2 (L, C), c_fc = up (L, H, C), c_fc2 = gate (L, H, C), mlp c_proj (L, C, H), ln_f (C),
# lm_head (V, C) (wte again when tied). llm.c rotates interleaved channel pairs (2i, 2i+1), Meta's layout;
# our RoPE pairs (i, i + HS/2), so the q and k rows of c_attn are permuted on the way in and out, as
# transformers' conversion script does.
MODEL_FILE = HeaderFormat("LLaMA model file", "an llm.c LLaMA model file", 20240803, {3: "fp32", 5: "bf16"})
MODEL_VERSION = {dtype: version for version, dtype in MODEL_FILE.versions.items()}
_LLAMA_VERSION = (3, 1)
_SLOT_TIED, _SLOT_PADDED_VOCAB = 12, 13
FILE_HEADER_BYTES = 2 * HEADER_BYTES


def _file_tensors(cfg: LlamaConfig, views: dict) -> list:
    """Our views in the file's order (the file's tensors are these, after the RoPE row permutation)."""
    V, H = cfg.vocab_size, cfg.ffn_hidden
    head = views["wte"] if cfg.tied_embeddings else views["lm_head"]
    return [views["wte"][:V], views["ln1w"], views["qkvw"], views["attprojw"], views["ln2w"],
            views["fcw"][:, H:], views["fcw"][:, :H], views["fcprojw"], views["lnfw"], head[:V]]


def _rope_rows(cfg: LlamaConfig, qkvw: np.ndarray, to_file: bool) -> np.ndarray:
    """qkvw (L, qkv_width, C) with each q and k head's rows moved between our rotate_half order (pair
    partner HS/2 rows on) and Meta's interleaved one (partner the next row)."""
    L, _, C = qkvw.shape
    HS, half = cfg.head_size, cfg.head_size // 2
    out = qkvw.copy()
    rotated = (cfg.n_head + cfg.n_kv_head) * HS
    heads = qkvw[:, :rotated].reshape(L, -1, 2, half, C) if to_file else qkvw[:, :rotated].reshape(L, -1, half, 2, C)
    out[:, :rotated] = heads.swapaxes(2, 3).reshape(L, rotated, C)
    return out


def write_model_file(path: str, cfg: LlamaConfig, params: np.ndarray, dtype: str) -> None:
    header = new_header(MODEL_FILE, MODEL_VERSION[dtype], [
        cfg.max_seq_len, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.multiple_of,
        int(cfg.use_scaled_rope), *_LLAMA_VERSION, int(cfg.tied_embeddings), cfg.padded_vocab_size])
    floats = np.zeros(HEADER_INTS, dtype="<f4")
    floats[:3] = [cfg.ffn_dim_multiplier or 0.0, cfg.norm_eps, cfg.rope_theta]
    views = param_layout(cfg).views(params)
    views["qkvw"] = _rope_rows(cfg, views["qkvw"], to_file=True)
    tensors = [np.ascontiguousarray(t).reshape(-1) for t in _file_tensors(cfg, views)]
    encode = f32_to_bf16_bits if dtype == "bf16" else (lambda t: t)

    def write(f):
        f.write(header.tobytes())
        f.write(floats.tobytes())
        for t in tensors:
            f.write(memoryview(encode(t)).cast("B"))
    atomic_write(path, write)


def _file_params(cfg: LlamaConfig) -> int:
    """Parameters the file stores: the layout over the real vocabulary, plus lm_head when tied."""
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd * (1 if cfg.tied_embeddings else 2)
    return param_layout(cfg).total - padding + (cfg.vocab_size * cfg.n_embd if cfg.tied_embeddings else 0)


def read_model_file_header(path: str, error) -> tuple[LlamaConfig, str]:
    """(LlamaConfig, "fp32" | "bf16") of an llm.c LLaMA model file, after checking its size; a bad shape in
    the header raises `error` naming the file."""
    ints, size = read_header(path, MODEL_FILE, error)
    floats = np.fromfile(path, dtype="<f4", count=HEADER_INTS, offset=HEADER_BYTES)
    block_size, V, L, NH, NKV, C, multiple_of, scaled = (int(x) for x in ints[2:10])
    multiplier, eps, theta = (float(x) for x in floats[:3])  # LlamaConfig takes them back to short decimals
    try:
        cfg = LlamaConfig(n_layer=L, n_head=NH, n_kv_head=NKV, n_embd=C, ffn_dim_multiplier=multiplier or None,
                          multiple_of=multiple_of, norm_eps=eps, rope_theta=theta, use_scaled_rope=bool(scaled),
                          max_seq_len=block_size, vocab_size=V,
                          padded_vocab_size=int(ints[_SLOT_PADDED_VOCAB]) or -(-V // VOCAB_ALIGN) * VOCAB_ALIGN,
                          tied_embeddings=bool(ints[_SLOT_TIED]))
    except (ValueError, ZeroDivisionError) as e:
        raise error(f"{path}: bad model shape in header: {e}") from e
    dtype = MODEL_FILE.versions[int(ints[1])]
    check_file_size(path, MODEL_FILE, size, FILE_HEADER_BYTES + _file_params(cfg) * (4 if dtype == "fp32" else 2),
                    error)
    return cfg, dtype


def read_model_file(path: str, error) -> tuple[LlamaConfig, np.ndarray]:
    """(LlamaConfig, fp32 flat parameters in our layout) from an llm.c LLaMA model file."""
    cfg, dtype = read_model_file_header(path, error)
    raw = np.fromfile(path, dtype=np.float32 if dtype == "fp32" else np.uint16, count=_file_params(cfg),
                      offset=FILE_HEADER_BYTES)
    stored = raw if dtype == "fp32" else bf16_bits_to_f32(raw)
    flat = np.zeros(param_layout(cfg).total, dtype=np.float32)
    views = param_layout(cfg).views(flat)
    offset = 0
    for i, target in enumerate(_file_tensors(cfg, views)):
        values = stored[offset:offset + target.size].reshape(target.shape)
        offset += target.size
        if cfg.tied_embeddings and i == 9:  # the file's lm_head: wte again
            if not np.array_equal(values, target):
                raise error(f"{path}: the header says the LM head is tied to wte, but lm_head differs from wte")
            continue
        target[...] = values
    views["qkvw"][...] = _rope_rows(cfg, views["qkvw"], to_file=False)
    return cfg, flat


# the family interface (models/__init__.py)
Config, Model = LlamaConfig, Llama
