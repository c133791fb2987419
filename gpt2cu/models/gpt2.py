"""The GPT-2 family: its shape (GPTConfig), parameter and activation tables, initialization, and the
forward and backward schedule, written once over a backend's ops.

The schedule is llm.c's: pre-LN blocks whose residual adds are fused into the next layernorm, the
GeLU fused into the MLP's first matmul (and its derivative into the second one's backward), the LM
head tied to wte, and a classifier that turns the logits into dlogits in place. Each op's contract is
in docs/architecture.md; `recompute` trades GeLU (1) and layernorm (2) outputs for a second compute.

`-e` accepts llm.c's descriptors: "d12" (GPT-2 124M), "d24", "d36", "d48", any "dN" (channels = 64 * N,
heads = N, rounded to llm.c's table for the named sizes), or a model file whose header carries the shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..layout import Layout, build_layout

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
        return param_layout(self).total


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
    return build_layout([
        ("encoded", (B, T, C)),
        ("ln1", (ln_layers, B, T, C)),
        ("ln1_mean", (L, B, T)),
        ("ln1_rstd", (L, B, T)),
        ("qkv", (L, B, T, 3 * C)),
        ("atty", (L, B, T, C)),
        ("att_lse", (L, B, H, T)),
        ("residual2", (L, B, T, C)),
        ("ln2", (ln_layers, B, T, C)),
        ("ln2_mean", (L, B, T)),
        ("ln2_rstd", (L, B, T)),
        ("fch", (L, B, T, 4 * C)),
        ("fch_gelu", (gelu_layers, B, T, 4 * C)),
        ("residual3", (L, B, T, C)),
        ("lnf", (B, T, C)),
        ("lnf_mean", (B, T)),
        ("lnf_rstd", (B, T)),
        ("losses", (B, T)),
        # one chunk of rows of the LM head's logits (the classifier overwrites them with dlogits)
        ("logits", (min(B * T, LM_HEAD_CHUNK_ROWS), Vp)),
        # backward scratch
        ("dresidual", (B, T, C)),
        ("dbtc", (B, T, C)),
        ("dbt4c", (B, T, 4 * C)),
        ("dqkv", (B, T, 3 * C)),
        ("btc_scratch", (B, T, C)),  # forward: matmul outputs before the fused residual add
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


def _allocate(group: str, make):
    try:
        return make()
    except MemoryError as e:  # CuPy's OutOfMemoryError is a MemoryError
        raise MemoryError(f"out of memory allocating the {group}: {str(e).rstrip('.')}. Try a smaller -b, "
                          f"or -r 2 to recompute activations") from e


class GPT:
    """Parameters, gradients and activations of one model for a fixed (B, T), on one backend."""

    def __init__(self, cfg: GPTConfig, backend, B: int, T: int, params: np.ndarray, recompute: int = 0,
                 padded_size: int | None = None):
        if not 1 <= T <= cfg.max_seq_len:
            raise ValueError(f"sequence length {T} must be in [1, {cfg.max_seq_len}] for this model")
        self.cfg, self.ops, self.B, self.T, self.recompute = cfg, backend, B, T, recompute
        self.layout = param_layout(cfg)
        # the flat buffers may be longer than the layout (ZeRO shards are padded to align)
        n = padded_size or self.layout.total
        self.params = _allocate("parameters", lambda: backend.upload_params(params, n))
        self.grads = _allocate("gradients", lambda: backend.zeros((n,), param=True))
        self.p = self.layout.views(self.params[:self.layout.total])
        self.g = self.layout.views(self.grads[:self.layout.total])
        self.acts = _allocate("activations", lambda: {
            t.name: backend.zeros(t.shape, fp32=t.name in FP32_ACTIVATIONS)
            for t in activation_layout(cfg, B, T, recompute).tensors})

    def load_params(self, host_params: np.ndarray):
        """Replace the parameters with a host fp32 flat buffer (e.g. a checkpoint's)."""
        self.ops.upload_params(host_params, self.params.shape[0], out=self.params)

    def host_params(self) -> np.ndarray:
        """The parameters as a host fp32 flat buffer of the layout's size."""
        return self.ops.to_numpy(self.params[:self.layout.total])

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, batch, dloss: float = 0.0):
        """The forward up to the final layernorm; with batch.targets also acts["losses"], and with
        dloss != 0 (1/(B*T*grad_accum) in training) the LM head's backward too: dwte += and d(lnf) into
        acts["dbtc"], chunk by chunk, so whole logits are never stored. batch: the backend's
        upload_batch result. logits() gives the logits of an inference forward."""
        self.forward_schedule(self.block_acts, self.attend, batch.tokens, self.p["wpe"][:self.T])
        if batch.targets is not None:
            self.lm_head_loss(batch.targets, dloss)

    def lm_head(self, out, hidden):
        """logits = hidden @ wte.T: the LM head, tied to the token embedding."""
        self.ops.matmul_forward(out, hidden, self.p["wte"])

    def _lm_head_chunks(self):
        """(rows of lnf, the logits buffer's rows) of each chunk of the LM head."""
        N, chunk = self.B * self.T, self.acts["logits"].shape[0]
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            yield rows, self.acts["logits"][:rows.stop - rows.start]

    def lm_head_loss(self, targets, dloss: float, weights=None, entropy=None):
        """Per chunk: logits = lnf @ wte.T, the fused softmax cross-entropy (losses, dlogits in place),
        and with dloss != 0 the chunk's backward at once: d(lnf) rows = dlogits @ wte, dwte +=
        dlogits.T @ lnf rows. Same sums as whole logits, in chunk order: deterministic.
        weights (B, T) fp32, optional: per-position factors on dlogits (RL's policy-gradient weights);
        entropy (B, T) fp32, optional: filled with each position's softmax entropy."""
        ops, a, p, g, C = self.ops, self.acts, self.p, self.g, self.cfg.n_embd
        lnf, dlnf = a["lnf"].reshape(-1, C), a["dbtc"].reshape(-1, C)
        losses, targets = a["losses"].reshape(-1), targets.reshape(-1)
        row_weights = None if weights is None else weights.reshape(-1)
        row_entropy = None if entropy is None else entropy.reshape(-1)
        for rows, logits in self._lm_head_chunks():
            self.lm_head(logits, lnf[rows])
            ops.fused_classifier(losses[rows], logits, targets[rows], dloss, self.cfg.vocab_size,
                                 None if row_weights is None else row_weights[rows],
                                 None if row_entropy is None else row_entropy[rows])
            if dloss:
                ops.matmul_backward(dlnf[rows], g["wte"], None, logits, lnf[rows], p["wte"])

    def logits(self, row: int | None = None, position: int | None = None) -> np.ndarray:
        """Host float32 logits (all Vp columns) after an inference forward: of every position, (B, T, Vp),
        or of one (row, position), (Vp,). Computed chunk by chunk from lnf."""
        ops, C, Vp = self.ops, self.cfg.n_embd, self.cfg.padded_vocab_size
        lnf = self.acts["lnf"].reshape(-1, C)
        if row is not None:
            at = row * self.T + position
            out = self.acts["logits"][:1]
            self.lm_head(out, lnf[at:at + 1])
            return ops.to_numpy(out)[0]
        host = np.empty((self.B * self.T, Vp), np.float32)
        for rows, logits in self._lm_head_chunks():
            self.lm_head(logits, lnf[rows])
            host[rows] = ops.to_numpy(logits)
        return host.reshape(self.B, self.T, Vp)

    def forward_schedule(self, acts, attend, tokens, wpe_rows):
        """The forward up to the final layernorm (lnf), over activations wherever the caller keeps them:
        acts(l) gives block l's buffers (acts(None) the ones outside the blocks: encoded, lnf*) and
        attend(l, block) fills block["atty"] (and block["att_lse"]) from block["qkv"]. The full forward
        passes its activation tables; the KV-cache decoder (kv_cache.py) one-row buffers and attention
        over its cache, so the block schedule is written only here."""
        ops, p, L = self.ops, self.p, self.cfg.n_layer
        top = acts(None)
        ops.encoder_forward(top["encoded"], tokens, p["wte"], wpe_rows)
        first = acts(0)
        ops.layernorm_forward(first["ln1"], first["ln1_mean"], first["ln1_rstd"], top["encoded"],
                              p["ln1w"][0], p["ln1b"][0])
        for l in range(L):
            a = acts(l)
            residual_in = top["encoded"] if l == 0 else acts(l - 1)["residual3"]
            ops.matmul_forward(a["qkv"], a["ln1"], p["qkvw"][l], p["qkvb"][l])
            attend(l, a)
            ops.matmul_forward(a["scratch"], a["atty"], p["attprojw"][l], p["attprojb"][l])
            ops.fused_residual_layernorm_forward(a["residual2"], a["ln2"], a["ln2_mean"], a["ln2_rstd"],
                                                 residual_in, a["scratch"], p["ln2w"][l], p["ln2b"][l])
            ops.matmul_forward(a["fch_gelu"], a["ln2"], p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"])
            ops.matmul_forward(a["scratch"], a["fch_gelu"], p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # the next block's first layernorm
                nxt = acts(l + 1)
                norm = (nxt["ln1"], nxt["ln1_mean"], nxt["ln1_rstd"], p["ln1w"][l + 1], p["ln1b"][l + 1])
            else:  # the final layernorm
                norm = (top["lnf"], top["lnf_mean"], top["lnf_rstd"], p["lnfw"], p["lnfb"])
            out, mean, rstd, weight, bias = norm
            # residual3 may be residual_in (the decoder's one-row buffers): it was read into residual2 above
            ops.fused_residual_layernorm_forward(a["residual3"], out, mean, rstd, a["residual2"], a["scratch"],
                                                 weight, bias)

    def block_acts(self, l):
        """Block l's activation buffers (or, for None, those outside the blocks) in this model's tables;
        the GeLU / layernorm outputs live in one shared slot when they are recomputed in the backward."""
        a = self.acts
        if l is None:
            return a
        ln = 0 if self.recompute >= 2 else l
        return {"ln1": a["ln1"][ln], "ln1_mean": a["ln1_mean"][l], "ln1_rstd": a["ln1_rstd"][l],
                "qkv": a["qkv"][l], "atty": a["atty"][l], "att_lse": a["att_lse"][l],
                "residual2": a["residual2"][l], "ln2": a["ln2"][ln], "ln2_mean": a["ln2_mean"][l],
                "ln2_rstd": a["ln2_rstd"][l], "fch": a["fch"][l],
                "fch_gelu": a["fch_gelu"][0 if self.recompute >= 1 else l],
                "residual3": a["residual3"][l], "scratch": a["btc_scratch"]}

    def attend(self, l, a):
        self.ops.attention_forward(a["atty"], a["att_lse"], a["qkv"], self.cfg.n_head)

    # ---- backward -------------------------------------------------------------------------------
    def backward(self, batch, layer_done=None):
        """Accumulates into self.grads; needs forward() to have run with dloss != 0 on the same batch
        (which ran the LM head's backward: dwte, and d(lnf) in acts["dbtc"]). layer_done(l), when given,
        is called as soon as layer l's gradients are complete (to start reducing them)."""
        ops, p, g, a, L, H = self.ops, self.p, self.g, self.acts, self.cfg.n_layer, self.cfg.n_head
        dresidual = a["dresidual"]
        ops.zero_(dresidual)
        ops.layernorm_backward(dresidual, g["lnfw"], g["lnfb"], a["dbtc"], a["residual3"][L - 1], p["lnfw"],
                               a["lnf_mean"], a["lnf_rstd"])
        for l in reversed(range(L)):
            b = self.block_acts(l)
            residual_in = a["encoded"] if l == 0 else a["residual3"][l - 1]
            if self.recompute >= 2:
                ops.layernorm_forward(b["ln1"], b["ln1_mean"], b["ln1_rstd"], residual_in, p["ln1w"][l],
                                      p["ln1b"][l])
                ops.layernorm_forward(b["ln2"], b["ln2_mean"], b["ln2_rstd"], b["residual2"], p["ln2w"][l],
                                      p["ln2b"][l])
            if self.recompute >= 1:
                ops.gelu_forward(b["fch_gelu"], b["fch"])
            # MLP: dresidual -> fcproj -> (GeLU') -> fc -> ln2
            ops.matmul_backward(a["dbt4c"], g["fcprojw"][l], g["fcprojb"][l], dresidual, b["fch_gelu"],
                                p["fcprojw"][l], dinp_gelu_pre=b["fch"])
            ops.matmul_backward(a["dbtc"], g["fcw"][l], g["fcb"][l], a["dbt4c"], b["ln2"], p["fcw"][l])
            ops.layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], a["dbtc"], b["residual2"], p["ln2w"][l],
                                   b["ln2_mean"], b["ln2_rstd"])
            # attention: dresidual -> attproj -> attention -> qkv -> ln1
            ops.matmul_backward(a["dbtc"], g["attprojw"][l], g["attprojb"][l], dresidual, b["atty"],
                                p["attprojw"][l])
            ops.attention_backward(a["dqkv"], a["dbtc"], b["qkv"], b["atty"], b["att_lse"], H)
            ops.matmul_backward(a["dbtc"], g["qkvw"][l], g["qkvb"][l], a["dqkv"], b["ln1"], p["qkvw"][l])
            ops.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], a["dbtc"], residual_in, p["ln1w"][l],
                                   b["ln1_mean"], b["ln1_rstd"])
            if layer_done is not None:
                layer_done(l)
        ops.encoder_backward(g["wte"], g["wpe"][:self.T], dresidual, batch)

    def zero_grad(self):
        self.ops.zero_(self.grads)


# the family interface (models/__init__.py)
Config, Model = GPTConfig, GPT
