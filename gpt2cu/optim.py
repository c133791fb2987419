"""AdamW: its hyper-parameters, the float32 reference update, gradient clipping, and the optimizer a
trainer steps, which owns its communicator and ZeRO stage: it reduces the gradients (all-reduce in
per-layer buckets, or reduce-scatter into its shard), clips them, updates its shard of the parameters and
gathers them back.

The CUDA backend's AdamW kernel and the numpy backend are both tested against `adamw_reference`; every
rank derives its shard from sharding.zero_shards alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sharding import gradient_buckets, shard_segments, zero_shards

ZERO_STAGES = (0, 1)


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


def padded_size(layout, world_size: int, zero_stage: int) -> int:
    """The length of the model's flat parameter and gradient buffers for this ZeRO stage and world size."""
    return zero_shards(layout, world_size if zero_stage >= 1 else 1).padded_size


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
    """AdamW over this rank's shard of the flat buffers, on any backend: fp32 moments, fp32 master weights
    when the backend stores bf16 parameters, one update launch per tensor segment so weight decay follows
    the layout. ZeRO-0: every rank holds the whole optimizer state and all-reduces the gradients; ZeRO-1:
    the gradients are reduce-scattered into this rank's shard and the updated shard is all-gathered back
    into every rank's parameters."""

    def __init__(self, backend, model, comm, cfg: AdamWConfig, zero_stage: int = 0, master_weights: bool = True,
                 graphs: bool = True, initial_params: np.ndarray | None = None):
        """model's flat buffers must have padded_size(model.layout, comm.world_size, zero_stage) elements.
        initial_params: the fp32 host parameters the model was built from (a fresh init, an fp32 model
        file); the master copy starts from them rather than from their bf16 rounding, as an fp32-weights
        PyTorch run does (measured 4x closer to one over the first 100 steps, docs/perf.md)."""
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {zero_stage}")
        self.backend, self.model, self.comm, self.cfg, self.zero_stage = backend, model, comm, cfg, zero_stage
        self.sharded = zero_stage >= 1 and comm.communicates  # NCCL with one rank too: how that path is tested
        shards = zero_shards(model.layout, comm.world_size if zero_stage >= 1 else 1)
        if model.params.shape[0] != shards.padded_size:
            raise ValueError(f"the model's flat buffers have {model.params.shape[0]} elements, ZeRO-{zero_stage} "
                             f"over {comm.world_size} ranks needs {shards.padded_size} (padded_size())")
        self.start, self.end = shards.range(comm.rank if zero_stage >= 1 else 0)
        n = self.end - self.start
        self.m = backend.zeros((n,), fp32=True)
        self.v = backend.zeros((n,), fp32=True)
        self.master = None
        if master_weights and model.params.dtype != np.float32:
            if initial_params is None:
                self.master = backend.fp32_copy(model.params[self.start:self.end])
            else:  # the shard may run past the layout into the zero padding
                host = np.zeros(n, dtype=np.float32)
                part = np.asarray(initial_params, dtype=np.float32)[self.start:self.end]
                host[:part.size] = part
                self.master = backend.from_numpy(host)
        self.segments = shard_segments(model.layout, self.start, self.end)
        # each tensor's stochastic rounding gets its own dither: the salt is its index in the layout
        self.salts = [model.layout.names.index(seg.name) for seg in self.segments]
        # one launch per segment every step: captured once as a CUDA graph (the scalars live on the device)
        self._update = backend.graphed(self._update_segments, enabled=graphs)
        self.buckets = gradient_buckets(model.layout, model.cfg.n_layer)
        self._pending, self._started = [], set()  # all-reduces started during the backward (ZeRO-0)

    @property
    def overlaps_backward(self) -> bool:
        """Whether layer_done can start gradient reductions inside the backward (ZeRO-0, several ranks)."""
        return self.comm.communicates and self.zero_stage == 0

    def layer_done(self, layer: int):
        """For model.backward(layer_done=...) on the last micro-step under ZeRO-0: starts the all-reduce of
        a layer's gradients as soon as they are complete, overlapping the rest of the backward."""
        self._pending += self._start_bucket(self.model.cfg.n_layer - 1 - layer)

    def _start_bucket(self, bucket):
        self._started.add(bucket)
        g = self.model.grads
        return [self.comm.all_reduce_start(g[b:e], op="avg") for b, e in self.buckets[bucket]]

    def reduce_gradients(self) -> float:
        """Averages the gradients over ranks (all of them, or into this rank's shard under ZeRO-1) and
        returns the global gradient norm."""
        comm, grads, shard = self.comm, self.model.grads, self.model.grads[self.start:self.end]
        if comm.communicates:
            if self.sharded:
                comm.reduce_scatter(grads, shard, op="avg")
            else:  # bucket by bucket, whether or not the backward already started some
                for bucket in range(len(self.buckets)):
                    if bucket not in self._started:
                        self._pending += self._start_bucket(bucket)
                comm.finish(self._pending)
                self._pending, self._started = [], set()
        norm_squared = self.backend.global_norm_squared(shard)
        if self.sharded:
            comm.all_reduce(norm_squared, op="sum")
        return float(np.sqrt(self.backend.to_numpy(norm_squared)[0]))

    def step(self, lr: float, t: int, norm: float, seed: int):
        """Update number t (from 1) with learning rate lr, the gradients clipped from their global norm
        `norm` to cfg.grad_clip; then, under ZeRO-1, every rank's parameters gathered."""
        c = self.cfg
        self._update(self.backend.adamw_scalars(lr, t, clip_scale(norm, c.grad_clip), seed, c.beta1, c.beta2))
        self.gather_params()

    def _update_segments(self, scalars):
        c, b = self.cfg, self.backend
        p, g = self.model.params, self.model.grads
        for seg, salt in zip(self.segments, self.salts):
            lo, hi = seg.begin - self.start, seg.end - self.start
            master = self.master[lo:hi] if self.master is not None else None
            b.adamw_update(p[seg.begin:seg.end], master, g[seg.begin:seg.end], self.m[lo:hi], self.v[lo:hi],
                           scalars, c.beta1, c.beta2, c.eps, c.weight_decay if seg.decay else 0.0, salt)

    def gather_params(self):
        """Every rank's parameters from the shards (ZeRO-1; nothing to do otherwise). A skipped update
        gathers too, so every rank always holds the same parameters."""
        if self.sharded:
            self.comm.all_gather(self.model.params[self.start:self.end], self.model.params)

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
        if self.master is None and "master" in host_arrays and self.model.params.dtype == np.float32:
            # fp32 parameters are their own master weights: take the checkpoint's exact values
            self.backend.from_numpy(host_arrays["master"], out=self.model.params[self.start:self.end])
