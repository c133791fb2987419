"""GPT-2's forward and backward schedule, written once over a backend's ops.

The schedule is llm.c's: pre-LN blocks whose residual adds are fused into the next layernorm, the
GeLU fused into the MLP's first matmul (and its derivative into the second one's backward), the LM
head tied to wte, and a classifier that turns the logits into dlogits in place. Each op's contract is
in docs/architecture.md; `recompute` trades GeLU (1) and layernorm (2) outputs for a second compute.
"""
from __future__ import annotations

import numpy as np

from .config import GPTConfig
from .layout import FP32_ACTIVATIONS, activation_layout, param_layout


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

    # layernorm / GeLU outputs live in one shared slot when they are recomputed in the backward
    def _ln(self, which: str, layer: int):
        return self.acts[which][0 if self.recompute >= 2 else layer]

    def _gelu(self, layer: int):
        return self.acts["fch_gelu"][0 if self.recompute >= 1 else layer]

    def forward(self, tokens, targets=None, dloss: float = 0.0):
        """Fills acts["logits"]; with targets also acts["losses"], and with dloss != 0 the logits buffer
        becomes dlogits (dloss = 1/(B*T*grad_accum) for training)."""
        ops, p, a, L, H = self.ops, self.p, self.acts, self.cfg.n_layer, self.cfg.n_head
        ops.encoder_forward(a["encoded"], tokens, p["wte"], p["wpe"][:self.T])
        ops.layernorm_forward(self._ln("ln1", 0), a["ln1_mean"][0], a["ln1_rstd"][0], a["encoded"],
                              p["ln1w"][0], p["ln1b"][0])
        for l in range(L):
            residual_in = a["encoded"] if l == 0 else a["residual3"][l - 1]
            ops.matmul_forward(a["qkv"][l], self._ln("ln1", l), p["qkvw"][l], p["qkvb"][l])
            ops.attention_forward(a["atty"][l], a["att_lse"][l], a["qkv"][l], H)
            ops.matmul_forward(a["btc_scratch"], a["atty"][l], p["attprojw"][l], p["attprojb"][l])
            ops.fused_residual_layernorm_forward(a["residual2"][l], self._ln("ln2", l), a["ln2_mean"][l],
                                                 a["ln2_rstd"][l], residual_in, a["btc_scratch"],
                                                 p["ln2w"][l], p["ln2b"][l])
            ops.matmul_forward(self._gelu(l), self._ln("ln2", l), p["fcw"][l], p["fcb"][l], gelu_pre=a["fch"][l])
            ops.matmul_forward(a["btc_scratch"], self._gelu(l), p["fcprojw"][l], p["fcprojb"][l])
            if l + 1 < L:  # the next block's first layernorm
                norm = (self._ln("ln1", l + 1), a["ln1_mean"][l + 1], a["ln1_rstd"][l + 1], p["ln1w"][l + 1],
                        p["ln1b"][l + 1])
            else:  # the final layernorm
                norm = (a["lnf"], a["lnf_mean"], a["lnf_rstd"], p["lnfw"], p["lnfb"])
            out, mean, rstd, weight, bias = norm
            ops.fused_residual_layernorm_forward(a["residual3"][l], out, mean, rstd, a["residual2"][l],
                                                 a["btc_scratch"], weight, bias)
        ops.matmul_forward(a["logits"], a["lnf"], p["wte"])
        if targets is not None:
            ops.fused_classifier(a["losses"], a["logits"], targets, dloss, self.cfg.vocab_size)

    def backward(self, tokens, layer_done=None):
        """Accumulates into self.grads; needs forward() to have run with dloss != 0. layer_done(l), when
        given, is called as soon as layer l's gradients are complete (to start reducing them)."""
        ops, p, g, a, L, H = self.ops, self.p, self.g, self.acts, self.cfg.n_layer, self.cfg.n_head
        dresidual = a["dresidual"]
        ops.zero_(dresidual)
        ops.matmul_backward(a["dbtc"], g["wte"], None, a["logits"], a["lnf"], p["wte"])
        ops.layernorm_backward(dresidual, g["lnfw"], g["lnfb"], a["dbtc"], a["residual3"][L - 1], p["lnfw"],
                               a["lnf_mean"], a["lnf_rstd"])
        for l in reversed(range(L)):
            residual_in = a["encoded"] if l == 0 else a["residual3"][l - 1]
            ln1, ln2, gelu = self._ln("ln1", l), self._ln("ln2", l), self._gelu(l)
            if self.recompute >= 2:
                ops.layernorm_forward(ln1, a["ln1_mean"][l], a["ln1_rstd"][l], residual_in, p["ln1w"][l], p["ln1b"][l])
                ops.layernorm_forward(ln2, a["ln2_mean"][l], a["ln2_rstd"][l], a["residual2"][l], p["ln2w"][l],
                                      p["ln2b"][l])
            if self.recompute >= 1:
                ops.gelu_forward(gelu, a["fch"][l])
            # MLP: dresidual -> fcproj -> (GeLU') -> fc -> ln2
            ops.matmul_backward(a["dbt4c"], g["fcprojw"][l], g["fcprojb"][l], dresidual, gelu, p["fcprojw"][l],
                                dinp_gelu_pre=a["fch"][l])
            ops.matmul_backward(a["dbtc"], g["fcw"][l], g["fcb"][l], a["dbt4c"], ln2, p["fcw"][l])
            ops.layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], a["dbtc"], a["residual2"][l], p["ln2w"][l],
                                   a["ln2_mean"][l], a["ln2_rstd"][l])
            # attention: dresidual -> attproj -> attention -> qkv -> ln1
            ops.matmul_backward(a["dbtc"], g["attprojw"][l], g["attprojb"][l], dresidual, a["atty"][l],
                                p["attprojw"][l])
            ops.attention_backward(a["dqkv"], a["dbtc"], a["qkv"][l], a["atty"][l], a["att_lse"][l], H)
            ops.matmul_backward(a["dbtc"], g["qkvw"][l], g["qkvb"][l], a["dqkv"], ln1, p["qkvw"][l])
            ops.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], a["dbtc"], residual_in, p["ln1w"][l],
                                   a["ln1_mean"][l], a["ln1_rstd"][l])
            if layer_done is not None:
                layer_done(l)
        ops.encoder_backward(g["wte"], g["wpe"][:self.T], dresidual, tokens)

    def zero_grad(self):
        self.ops.zero_(self.grads)
