"""What every family's model holds, whatever its network: parameters and gradients in a storage
(zero.make_storage: whole flat buffers, or this rank's shards under ZeRO-2/3) viewed through the family's
parameter table, and activation buffers from its activation table, for a fixed (B, T) on one backend. A
family's Model subclasses FlatModel and adds its schedule, calling the storage's hooks around each layer
(gather_top, gather_layer, layer_grads_done, top_grads_done: no-ops for whole buffers)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dist import SingleProcess
from ..layout import Layout
from ..zero import FlatStorage, allocate


class TransformerShape:
    """What every family's config shares (mixed into its frozen dataclass): the head size, and the shape
    checks a config's __post_init__ runs before its own."""

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def check_shape(self, *more_dims: int):
        """Positive dimensions (more_dims: the family's own), heads dividing the width, the padded
        vocabulary covering the real one."""
        if min(self.n_layer, self.n_head, self.n_embd, *more_dims) < 1:
            raise ValueError(f"model dimensions must be positive: {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be >= vocab_size")


@dataclass
class ListedPositions:
    """What FlatModel.lm_head_loss_at reads and writes for K listed positions: index (K,) int32, distinct
    flattened positions b * T + t; targets (K,) int32 (-1: the position's loss is 0); losses (K,) fp32, written;
    hidden, dhidden (K, C) activation dtype: the gathered lnf rows and their gradient. The caller writes index
    and targets (in place: a captured graph reads these addresses)."""
    index: object
    targets: object
    losses: object
    hidden: object
    dhidden: object


class FlatModel:
    def __init__(self, cfg, backend, B: int, T: int, params: np.ndarray, recompute: int, storage,
                 layout: Layout, activations: Layout, fp32_activations: frozenset):
        """storage: where parameters and gradients live (default: whole flat buffers, ZeRO-0 on one rank);
        params, the host fp32 values, are loaded into it."""
        if not 1 <= T <= cfg.max_seq_len:
            raise ValueError(f"sequence length {T} must be in [1, {cfg.max_seq_len}] for this model")
        self.cfg, self.ops, self.B, self.T, self.recompute = cfg, backend, B, T, recompute
        self.layout = layout
        if storage is None:
            storage = FlatStorage(backend, layout, cfg.n_layer, SingleProcess())
        self.storage = storage
        storage.load_params(params)
        # p[name] / g[name]: a tensor, or for per-layer tensors anything indexed by layer
        self.p, self.g = storage.p, storage.g
        self.acts = allocate("activations", lambda: {
            t.name: backend.zeros(t.shape, fp32=t.name in fp32_activations) for t in activations.tensors})

    # the per-layer activations of the family's table that a block reads and writes
    BLOCK_ACTIVATIONS: tuple = ()

    def block_acts(self, l):
        """Block l's activation buffers (None: the whole table). A buffer the backward recomputes has a single
        slot shared by every layer (the table gives it a leading dimension of 1, by recompute level), so
        layer l's is slot min(l, slots - 1)."""
        a = self.acts
        if l is None:
            return a
        return {name: a[name][min(l, a[name].shape[0] - 1)] for name in self.BLOCK_ACTIVATIONS}

    # ---- the LM head, in row chunks (the activation table's "logits" holds one chunk) ------------
    head = "wte"  # the LM head's weight: tied to the token embedding (LLaMA's may be its own lm_head)

    def lm_head(self, out, hidden):
        """logits = hidden @ W.T, W = p[self.head]: the LM head."""
        self.ops.matmul_forward(out, hidden, self.p[self.head])

    def _lm_head_chunks(self, N: int):
        """(rows of the N hidden rows, the logits buffer's rows) of each chunk of the LM head."""
        chunk = self.acts["logits"].shape[0]
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            yield rows, self.acts["logits"][:rows.stop - rows.start]

    def lm_head_loss(self, targets, dloss: float, policy=None, entropy=None):
        """Per chunk: logits = lnf @ W.T, the fused softmax cross-entropy (losses, dlogits in place),
        and with dloss != 0 the chunk's backward at once: d(lnf) rows = dlogits @ W, dW += dlogits.T @
        lnf rows (W = p[self.head]). Same sums as whole logits, in chunk order: deterministic. lnf: the
        final norm's output, acts["lnf"], whatever the family's norm. policy (backends.base.PolicyLoss,
        optional): RL's policy-gradient loss, each position's dlogits weighted from its own log p in the
        same pass; entropy (B, T) fp32, optional: filled with each position's softmax entropy."""
        a, C = self.acts, self.cfg.n_embd
        self._lm_head_rows(a["lnf"].reshape(-1, C), a["dbtc"].reshape(-1, C), a["losses"].reshape(-1),
                           targets.reshape(-1), dloss, policy, None if entropy is None else entropy.reshape(-1))

    def lm_head_loss_at(self, at: "ListedPositions", dloss: float, policy=None, entropy=None):
        """lm_head_loss on the listed positions only (RL: the completions, whose loss is all there is): their
        lnf rows gathered, the LM head run on those, d(lnf) scattered back and zero at every other position.
        at.targets, at.losses, entropy (K,) and policy's terms (K, 4) are per listed position."""
        a, C, ops = self.acts, self.cfg.n_embd, self.ops
        ops.gather_rows(at.hidden, a["lnf"].reshape(-1, C), at.index)
        self._lm_head_rows(at.hidden, at.dhidden, at.losses, at.targets, dloss, policy, entropy)
        if dloss:
            dlnf = a["dbtc"].reshape(-1, C)
            ops.zero_(dlnf)
            ops.scatter_rows(dlnf, at.dhidden, at.index)

    def listed_positions(self, K: int) -> "ListedPositions":
        """Buffers for lm_head_loss_at on K positions (K <= B * T)."""
        if not 1 <= K <= self.B * self.T:
            raise ValueError(f"{K} listed positions: must be in [1, B * T = {self.B * self.T}]")
        ops, C = self.ops, self.cfg.n_embd
        index = ops.from_numpy(np.arange(K, dtype=np.int32))
        return ListedPositions(index, ops.from_numpy(np.full(K, -1, np.int32)), ops.zeros((K,), fp32=True),
                               ops.zeros((K, C)), ops.zeros((K, C)))

    def _lm_head_rows(self, hidden, dhidden, losses, targets, dloss, policy, entropy):
        """The LM head and loss over rows of hidden (N, C) -> losses (N,); d(hidden) into dhidden when dloss."""
        ops, p, g = self.ops, self.p, self.g
        for rows, logits in self._lm_head_chunks(hidden.shape[0]):
            if policy is None and entropy is None:  # pretraining's loss: the backend's LM head op (may be fused)
                ops.lm_head_loss(losses[rows], dhidden[rows], g[self.head], logits, hidden[rows], p[self.head],
                                 targets[rows], dloss, self.cfg.vocab_size)
                continue
            self.lm_head(logits, hidden[rows])
            ops.fused_classifier(losses[rows], logits, targets[rows], dloss, self.cfg.vocab_size,
                                 None if policy is None else policy.rows(rows),
                                 None if entropy is None else entropy[rows])
            if dloss:
                ops.matmul_backward(dhidden[rows], g[self.head], None, logits, hidden[rows], p[self.head])

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
        for rows, logits in self._lm_head_chunks(self.B * self.T):
            self.lm_head(logits, lnf[rows])
            host[rows] = ops.to_numpy(logits)
        return host.reshape(self.B, self.T, Vp)

    @property
    def params(self):
        """The parameter buffer this rank holds (the whole model, or its shard under ZeRO-3)."""
        return self.storage.params

    @property
    def grads(self):
        """The gradient buffer this rank holds (the whole model, or its shard under ZeRO-2 and -3)."""
        return self.storage.grads

    def load_params(self, host_params: np.ndarray):
        """Replace the parameters with a host fp32 flat buffer (e.g. a checkpoint's)."""
        self.storage.load_params(host_params)

    def host_params(self) -> np.ndarray:
        """The parameters as a host fp32 flat buffer of the layout's size (under ZeRO-3 a collective:
        every rank must call it)."""
        return self.storage.host_params()

    def zero_grad(self):
        self.storage.zero_grad()
