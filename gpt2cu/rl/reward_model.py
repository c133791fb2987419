"""A scalar head on a GPT-2 trunk: the reward model (trained on preference pairs with the Bradley-Terry
loss) and PPO's value head (on the policy's own trunk, rl/ppo.py). The head is n_embd weights and a bias
on the final layernorm's output, value[b, t] = lnf[b, t] . w + bias; a sequence's reward is the value at
its last token (the EOT that ends a completion). The head is C + 1 float32 numbers on the device: applied by
the backend's scalar_head ops and updated by its AdamW op with the trunk's step; the trunk is an ordinary
model of its family, trained by optim.AdamW through the same ops as pretraining.

The reward model file (formats.REWARD_MODEL_FILE) is one file: the trunk as a model file's parameters
plus the head.
"""
from __future__ import annotations

import math

import numpy as np

from ..formats import HEADER_BYTES, REWARD_MODEL_FILE, atomic_write, check_file_size, new_header, read_header
from ..dist import SingleProcess
from ..models import family_of
from ..models.gpt2 import GPTConfig, param_layout
from ..optim import AdamW
from ..zero import make_storage
from .text import InputError, document_tokens


def build_model(cfg, backend, B: int, T: int, params: np.ndarray, comm=None):
    """A model of cfg's family in whole flat buffers on every rank of comm (ZeRO-0: AdamW all-reduces the
    gradients and every rank updates the whole model; default: a single process)."""
    family = family_of(cfg)
    storage = make_storage(0, backend, family.param_layout(cfg), cfg.n_layer, comm or SingleProcess())
    return family.Model(cfg, backend, B, T, params, storage=storage)


class ScalarHead:
    """value = lnf . w + bias on a trunk's final-norm output, after the trunk's forward; its backward
    feeds d(lnf) to the trunk's backward (acts["dbtc"], where the LM head's backward leaves its own).
    Two ops of the backend (scalar_head_forward, scalar_head_backward: on CUDA kernels/scalar_head.cu),
    into buffers at fixed addresses, so PPO's update captures them in its CUDA graph."""

    def __init__(self, trunk, head: np.ndarray | None = None):
        self.trunk, self.ops, C = trunk, trunk.ops, trunk.cfg.n_embd
        self.params = self.ops.from_numpy(np.zeros(C + 1, np.float32) if head is None else head.astype(np.float32))
        self.grad = self.ops.zeros((C + 1,), fp32=True)
        self.values = self.ops.zeros((trunk.B, trunk.T), fp32=True)  # or, after value_loss, its gradient
        self.losses = self.ops.zeros((trunk.B, trunk.T), fp32=True)  # value_loss's weighted loss per position

    def forward(self):
        """values (B, T) float32 (a buffer of the backend, overwritten by the next call) of the trunk's last
        forward."""
        self.ops.scalar_head_forward(self.values, None, self.trunk.acts["lnf"], self.params)
        return self.values

    def backward(self, dvalues, add: bool = False):
        """Accumulates the gradients of sum(dvalues * values) of the trunk's last forward into grad, and
        writes d(lnf) into the trunk's acts["dbtc"] for its backward (add: onto the LM head's d(lnf) there).
        dvalues (B, T) float32 of the backend's array module."""
        dlnf = self.trunk.acts["dbtc"]
        if not add:
            self.ops.zero_(dlnf)
        self.ops.scalar_head_backward(dlnf, self.grad, dvalues, self.trunk.acts["lnf"], self.params)

    def value_loss(self, value_loss):
        """PPO's clipped value loss (backends.base.ValueLoss) of the trunk's last forward: its gradient
        added into grad and onto the LM head's d(lnf) in acts["dbtc"]; each position's weighted loss left
        in self.losses."""
        acts = self.trunk.acts
        self.ops.scalar_head_forward(self.values, self.losses, acts["lnf"], self.params, value_loss)
        self.ops.scalar_head_backward(acts["dbtc"], self.grad, self.values, acts["lnf"], self.params)

    def host_params(self) -> np.ndarray:
        return self.ops.to_numpy(self.params)


class ScalarHeadModel:
    """A trunk of (B, T) and its scalar head (the reward model): forward(inputs) -> values (B, T),
    backward(dvalues)."""

    def __init__(self, cfg, backend, B: int, T: int, trunk_params: np.ndarray, head: np.ndarray | None = None,
                 comm=None):
        """comm: the ranks that train it data-parallel (default: a single process)."""
        self.cfg, self.ops = cfg, backend
        self.trunk = build_model(cfg, backend, B, T, trunk_params, comm)
        self.scalar_head = ScalarHead(self.trunk, head)
        self.head, self.head_grad = self.scalar_head.params, self.scalar_head.grad
        self._batch = None

    def forward(self, inputs: np.ndarray):
        """values (B, T) float32 (an array of the backend's array module) of the host tokens `inputs`."""
        self._batch = self.ops.set_batch(inputs)
        self.trunk.forward(self._batch)  # no targets: up to the final layernorm only
        return self.scalar_head.forward()

    def backward(self, dvalues):
        """Accumulates the gradients of sum(dvalues * values) of the last forward into head_grad and the
        trunk's grads; dvalues (B, T) float32 of the backend's array module."""
        self.scalar_head.backward(dvalues)
        self.trunk.backward(self._batch)

    def host_head(self) -> np.ndarray:
        return self.scalar_head.host_params()


class ModelOptimizer:
    """AdamW over a family model's flat parameters and, when given, a scalar head on it too; one global
    gradient norm clips both. On several ranks (the model's storage's communicator) both gradients are
    averaged over the ranks first: the trunk's by AdamW (ZeRO-0), the head's here, so every rank applies
    the same update. The head's C + 1 fp32 parameters and moments stay on the device, updated by the
    backend's AdamW with the trunk's step scalars (no weight decay)."""

    def __init__(self, backend, model, init_params: np.ndarray, cfg, head: ScalarHead | None = None):
        self.ops, self.cfg, self.model, self.head = backend, cfg, model, head
        self.adamw = AdamW(backend, model, model.storage.comm, cfg, initial_params=init_params)
        if head:
            self.head_m = backend.zeros(head.params.shape, fp32=True)
            self.head_v = backend.zeros(head.params.shape, fp32=True)
        self.t = 0

    def step(self, lr: float) -> float:
        """One update from the accumulated gradients, which it then zeroes; returns their global norm."""
        c, head = self.cfg, self.head
        if head:
            self.adamw.comm.all_reduce(head.grad, op="avg")  # SingleProcess: the identity
        grad_norm = self.adamw.reduce_gradients(extra=(head.grad,) if head else ())
        norm = float(grad_norm)
        if math.isfinite(norm):  # a non-finite gradient skips the update, as the trainer does
            self.t += 1
            self.adamw.step(lr, self.t, grad_norm, seed=self.t)
            if head:  # with the trunk's step scalars, already on the device
                self.ops.adamw_update(head.params, None, head.grad, self.head_m, self.head_v, self.adamw.scalars,
                                      c.beta1, c.beta2, c.eps, 0.0)
        self.model.zero_grad()
        if head:
            self.ops.zero_(head.grad)
        return norm

    def state_arrays(self) -> dict:
        """Host float32 arrays of everything a resumed run needs besides the model file."""
        arrays = {name: self.ops.to_numpy(a) for name, a in self.adamw.state_arrays().items()}
        arrays["step"] = np.array([self.t], np.float32)
        if self.head:
            arrays.update(head=self.head.host_params(), head_m=self.ops.to_numpy(self.head_m),
                          head_v=self.ops.to_numpy(self.head_v))
        return arrays

    def load_state(self, arrays: dict):
        self.adamw.load_state(arrays)
        self.t = int(arrays["step"][0])
        if self.head:
            for name, dev in (("head", self.head.params), ("head_m", self.head_m), ("head_v", self.head_v)):
                self.ops.from_numpy(arrays[name], out=dev)


# ---- the file --------------------------------------------------------------------------------------

def write_reward_model(path: str, cfg: GPTConfig, trunk_params: np.ndarray, head: np.ndarray) -> None:
    header = new_header(REWARD_MODEL_FILE, 1, [cfg.max_seq_len, cfg.vocab_size, cfg.n_layer, cfg.n_head,
                                               cfg.n_embd, cfg.padded_vocab_size])
    body = np.concatenate([np.asarray(trunk_params, np.float32), np.asarray(head, np.float32)])

    def write(f):
        f.write(header.tobytes())
        f.write(memoryview(body).cast("B"))
    atomic_write(path, write)


def read_reward_model(path: str) -> tuple[GPTConfig, np.ndarray, np.ndarray]:
    """(config, fp32 trunk parameters, fp32 head) of a reward model file; InputError when it is not one."""
    try:
        header, size = read_header(path, REWARD_MODEL_FILE, InputError)
        max_seq_len, vocab_size, n_layer, n_head, n_embd, padded_vocab = (int(x) for x in header[2:8])
        cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_seq_len=max_seq_len,
                        vocab_size=vocab_size, padded_vocab_size=padded_vocab)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from None
    n = param_layout(cfg).total
    check_file_size(path, REWARD_MODEL_FILE, size, HEADER_BYTES + 4 * (n + n_embd + 1), InputError)
    body = np.fromfile(path, dtype=np.float32, offset=HEADER_BYTES)
    return cfg, body[:n], body[n:]


# ---- scoring and Bradley-Terry training -----------------------------------------------------------------

def pad_rows(seqs: list, B: int, T: int, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (B, T) int32 right-padded with EOT, last-token index of each row); rows past len(seqs)
    repeat the first sequence."""
    rows = list(seqs) + [seqs[0]] * (B - len(seqs))
    inputs = np.full((B, T), eot, np.int32)
    for r, s in enumerate(rows):
        inputs[r, :len(s)] = s
    return inputs, np.array([len(s) - 1 for s in rows])


def sequence_scores(model: ScalarHeadModel, seqs: list, eot: int) -> np.ndarray:
    """The value at each token sequence's last token, model.trunk.B sequences per forward."""
    B, T = model.trunk.B, model.trunk.T
    longest = max(len(s) for s in seqs)
    if longest > T:
        raise InputError(f"a sequence of {longest} tokens is longer than the reward model's {T} positions")
    scores = []
    for start in range(0, len(seqs), B):
        chunk = seqs[start:start + B]
        inputs, last = pad_rows(chunk, B, T, eot)
        values = model.ops.to_numpy(model.forward(inputs))
        scores.append(values[np.arange(len(chunk)), last[:len(chunk)]])
    return np.concatenate(scores)


def encode_pairs(records: list, codec) -> list:
    """[(EOT + prompt + chosen + EOT, EOT + prompt + rejected + EOT) token lists] of JSONL preference records
    (each sequence a document, as in the rollouts the reward model scores)."""
    return [tuple(document_tokens(codec, r["prompt"] + r[side]) + [codec.eot] for side in ("chosen", "rejected"))
            for r in records]


def rank_share(n: int, comm) -> slice:
    """This rank's contiguous share of n items split over comm's ranks (sizes differ by at most one)."""
    return slice(comm.rank * n // comm.world_size, (comm.rank + 1) * n // comm.world_size)


def pairwise_accuracy(model: ScalarHeadModel, pairs: list, eot: int) -> float:
    """The fraction of pairs whose chosen sequence scores above the rejected one (a tie counts half);
    on several ranks each scores its share of the pairs and the counts are summed."""
    comm = model.trunk.storage.comm
    mine = [s for pair in pairs[rank_share(len(pairs), comm)] for s in pair]
    scores = sequence_scores(model, mine, eot) if mine else np.zeros(0)
    chosen, rejected = scores[0::2], scores[1::2]
    wins = comm.all_reduce_scalar((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
    return wins / len(pairs)


def bradley_terry_step(model: ScalarHeadModel, optimizer: ModelOptimizer, pairs: list, eot: int,
                       lr: float) -> tuple[float, float]:
    """One update on model.trunk.B // 2 pairs (rows 2i chosen, 2i+1 rejected): the loss
    -log sigmoid(r_chosen - r_rejected), averaged over pairs. On several ranks `pairs` is this rank's
    share of the step's pairs (as many on every rank): the gradient is that of the mean over all of them
    once the ranks' gradients are averaged, and the loss and accuracy returned are over all of them."""
    B, T, comm = model.trunk.B, model.trunk.T, model.trunk.storage.comm
    inputs, last = pad_rows([s for pair in pairs for s in pair], B, T, eot)
    values = model.forward(inputs)
    scores = model.ops.to_numpy(values)[np.arange(B), last]
    margin = scores[0::2] - scores[1::2]
    # d loss / d margin = -sigmoid(-margin), spread over the pairs' two score positions; dividing by this
    # rank's count is dividing by all the pairs times the world size, which the ranks' average divides out
    dmargin = -0.5 * (1.0 - np.tanh(0.5 * margin)) / len(pairs)
    dvalues = np.zeros((B, T), np.float32)
    dvalues[np.arange(0, B, 2), last[0::2]] = dmargin
    dvalues[np.arange(1, B, 2), last[1::2]] = -dmargin
    model.backward(model.ops.from_numpy(dvalues))
    optimizer.step(lr)
    total = len(pairs) * comm.world_size
    return (comm.all_reduce_scalar(np.logaddexp(0.0, -margin).sum()) / total,
            comm.all_reduce_scalar((margin > 0).sum()) / total)
