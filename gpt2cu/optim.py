"""AdamW: its hyper-parameters, the float32 reference update, gradient clipping, and the optimizer a
trainer steps, which owns its communicator and ZeRO stage: it has the model's storage (zero.py) reduce
the gradients, clips them, updates its shard of the parameters and has them gathered back.

The CUDA backend's AdamW kernel and the numpy backend are both tested against `adamw_reference`; every
rank derives its shard from sharding's ranges alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



@dataclass(frozen=True)
class AdamWConfig:
    """llm.c's defaults: -l 3e-4, betas (0.9, 0.95), eps 1e-8, -c 0.0, gradients clipped to norm 1.0."""
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if not self.lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


def norm_from_squared(squared) -> float:
    """The gradient norm from its float32 square, as every reader takes it (float32 sqrt, then a float)."""
    return float(np.sqrt(np.float32(squared)))


class GradientNorm:
    """The global gradient norm as AdamW.reduce_gradients leaves it: its square where the backend computed it
    (the device). AdamW.step clips from it there; float() waits for it and reads the norm."""

    def __init__(self, squared, backend):
        self.squared, self.backend = squared, backend

    def __float__(self) -> float:
        return norm_from_squared(self.backend.to_numpy(self.squared)[0])


def clip_scale(norm: float, max_norm: float) -> float:
    """llm.c's grad_scale: shrink the gradients to `max_norm` when their global norm exceeds it."""
    return max_norm / norm if norm > max_norm else 1.0


def adamw_reference(params, grads, m, v, step: int, cfg: AdamWConfig, lr: float, grad_scale: float,
                    decay_mask) -> None:
    """One AdamW step in float32, in place on params, m and v (llm.c's adamw_kernel3).

    step is 1-based (bias corrections 1 - beta^step); decay_mask (bool, broadcastable to params) says
    where the decoupled weight decay applies: p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p).
    """
    if step < 1:
        raise ValueError(f"AdamW step counts from 1, got {step}")
    for name, a in (("params", params), ("grads", grads), ("m", m), ("v", v)):
        if a.dtype != np.float32:
            raise TypeError(f"adamw_reference needs float32 arrays, {name} is {a.dtype}")
    f32 = np.float32
    b1, b2 = f32(cfg.beta1), f32(cfg.beta2)
    g = grads * f32(grad_scale)
    m *= b1
    m += (f32(1) - b1) * g
    v *= b2
    v += (f32(1) - b2) * (g * g)
    # the corrections are float32 host scalars in llm.c too
    mhat = m / (f32(1) - b1 ** f32(step))
    vhat = v / (f32(1) - b2 ** f32(step))
    wd = np.where(decay_mask, f32(cfg.weight_decay), f32(0))
    params -= f32(lr) * (mhat / (np.sqrt(vhat) + f32(cfg.eps)) + wd * params)


class AdamW:
    """AdamW over this rank's shard of the model's parameters, on any backend: fp32 moments, fp32 master
    weights when the backend stores bf16 parameters, one update launch per tensor segment so weight decay
    follows the layout. Which shard, and how gradients are reduced and parameters gathered, is the ZeRO
    stage of the model's storage (zero.py): ZeRO-0 all-reduces and updates everything on every rank,
    ZeRO-1 shards the update, ZeRO-2 the gradients as well (reduced during the backward), ZeRO-3 the
    parameters too."""

    def __init__(self, backend, model, comm, cfg: AdamWConfig, zero_stage: int = 0, master_weights: bool = True,
                 graphs: bool = True, initial_params: np.ndarray | None = None):
        """model.storage must be zero_stage's storage over comm (zero.make_storage).
        initial_params: the fp32 host parameters the model was built from (a fresh init, an fp32 model
        file); the master copy starts from them rather than from their bf16 rounding, as an fp32-weights
        PyTorch run does (measured 4x closer to one over the first 100 steps, docs/perf.md)."""
        storage = model.storage
        if storage.zero_stage != zero_stage or storage.comm is not comm:
            raise ValueError(f"the model's storage is ZeRO-{storage.zero_stage} over another communicator; "
                             f"AdamW was asked for ZeRO-{zero_stage} (build it with zero.make_storage)")
        self.backend, self.model, self.comm, self.cfg, self.zero_stage = backend, model, comm, cfg, zero_stage
        self.storage = storage
        n = storage.shard_size
        self.m = backend.zeros((n,), fp32=True)
        self.v = backend.zeros((n,), fp32=True)
        self.master = None
        if master_weights and storage.update_params.dtype != np.float32:
            host = initial_params if initial_params is not None else model.host_params()
            self.master = backend.from_numpy(storage.host_shard(host))  # the shard may run into the padding
        # each tensor's stochastic rounding gets its own dither: the salt is its index in the layout
        self.salts = [model.layout.names.index(seg.name) for seg in storage.segments]
        # one launch per segment every step: captured once as a CUDA graph (the scalars live on the device)
        self._update = backend.graphed(self._update_segments, enabled=graphs)

    @property
    def overlaps_backward(self) -> bool:
        """Whether layer_done can start gradient reductions inside the backward (ZeRO-0, several ranks)."""
        return self.storage.overlaps_backward

    def layer_done(self, layer: int):
        """For model.backward(layer_done=...) on the last micro-step under ZeRO-0: starts the all-reduce of
        a layer's gradients as soon as they are complete, overlapping the rest of the backward."""
        self.storage.layer_done(layer)

    def reduce_gradients(self, extra=()) -> GradientNorm:
        """Averages the gradients over ranks (what the backward has not reduced yet) and returns the
        global gradient norm, left on the device (float() reads it). extra: small float32 gradients updated
        beside the model (RL's value head), whole and already averaged on every rank: their squares join the
        norm on the device."""
        storage, backend = self.storage, self.backend
        storage.reduce_gradients()
        norm_squared = backend.global_norm_squared(storage.grad_shard)
        if storage.sharded:
            self.comm.all_reduce(norm_squared, op="sum")
        with backend.on_stream():
            for grad in extra:
                norm_squared += (grad * grad).sum()
        return GradientNorm(norm_squared, backend)

    def step(self, lr: float, t: int, norm: GradientNorm, seed: int, loss=None):
        """Update number t (from 1) with learning rate lr, the gradients clipped from their global norm
        (reduce_gradients' result) to cfg.grad_clip; then every rank's parameters gathered as its ZeRO stage
        needs. The clip, and the skip of the update when the norm or `loss` (a (1,) array of the backend, the
        same on every rank; None: not checked) is not finite, are decided where the norm is: no host read."""
        c = self.cfg
        # kept: a tensor updated beside the model (RL's value head) takes the same step's values
        self.scalars = self.backend.adamw_scalars_clipped(lr, t, seed, c.beta1, c.beta2, norm.squared, loss,
                                                          c.grad_clip)
        self._update(self.scalars)
        self.gather_params()

    def _update_segments(self, scalars):
        c, b, storage = self.cfg, self.backend, self.storage
        p, g = storage.update_params, storage.update_grads
        for seg, salt in zip(storage.segments, self.salts):
            lo, hi = seg.state_at, seg.state_at + seg.length
            master = self.master[lo:hi] if self.master is not None else None
            b.adamw_update(p[seg.param_at:seg.param_at + seg.length], master, g[seg.grad_at:seg.grad_at + seg.length],
                           self.m[lo:hi], self.v[lo:hi], scalars, c.beta1, c.beta2, c.eps,
                           c.weight_decay if seg.decay else 0.0, salt)

    def gather_params(self):
        """Every rank's parameters made current after an update (a skipped one too, so every rank always
        holds the same parameters)."""
        self.storage.gather_params()

    def state_arrays(self) -> dict:
        arrays = {"m": self.m, "v": self.v}
        if self.master is not None:
            arrays["master"] = self.master
        return arrays

    def load_state(self, host_arrays: dict):
        """Restore moments (and master weights, when both sides keep them) from host float32 arrays."""
        for name, dev in self.state_arrays().items():
            if name not in host_arrays:
                if name == "master":  # a checkpoint without master weights: start them from the params
                    continue
                raise ValueError(f"optimizer state has no {name!r} array")
            host = host_arrays[name]
            if host.shape != dev.shape:
                raise ValueError(f"optimizer state {name!r} has {host.size} elements, this shard needs {dev.size}")
            self.backend.from_numpy(host, out=dev)
        params = self.storage.update_params
        if self.master is None and "master" in host_arrays and params.dtype == np.float32:
            # fp32 parameters are their own master weights: take the checkpoint's exact values
            master = host_arrays["master"]
            for seg in self.storage.segments:
                self.backend.from_numpy(master[seg.state_at:seg.state_at + seg.length],
                                        out=params[seg.param_at:seg.param_at + seg.length])
