"""Optimizer arithmetic shared by every backend: AdamW hyper-parameters and the float32 reference update,
llm.c's learning-rate schedules (llmc/schedulers.h), gradient clipping, ZeRO-1 shard ranges and llm.c's
outlier detector (llmc/outlier_detector.h) behind -sl/-sg.

Nothing here touches a device: the CUDA backend's AdamW kernel and the numpy backend are both tested
against `adamw_reference`, and every rank derives its ZeRO-1 shard from `zero_shards` alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .layout import Layout

LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")

# ZeRO-1 shards start on multiples of this many elements (256 bytes of fp32: vector loads stay aligned)
SHARD_ALIGN = 64


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


# ---- learning-rate schedules (llmc/schedulers.h) ------------------------------------------------------

def get_lr(kind: str, step: int, max_steps: int, lr: float, warmup: int, final_frac: float) -> float:
    """The learning rate of 0-based `step` out of `max_steps`, as llm.c's get_learning_rate.

    Every schedule but "constant" warms up linearly over the first `warmup` steps (lr*(step+1)/warmup),
    then decays towards lr*final_frac: "cosine" with half a cosine and "linear" linearly over the steps
    after the warmup; "wsd" holds lr until 80% of max_steps and then decays with 1 - sqrt(progress).
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= step <= max_steps:
        raise ValueError(f"step {step} is outside [0, max_steps={max_steps}]")
    if kind == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if kind == "wsd":
        # llm.c: (int)(0.8f * N); the integer form differs only past ~1.7e7 steps (float32 rounding)
        decay_point = 4 * max_steps // 5
        if step < decay_point:
            return lr
        return min_lr + (1.0 - math.sqrt(_progress(step, decay_point, max_steps))) * (lr - min_lr)
    progress = _progress(step, warmup, max_steps)
    if kind == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    return lr - progress * (lr - min_lr)  # linear


def _progress(step: int, start: int, end: int) -> float:
    # a decay phase of zero length (warmup >= max_steps) counts as finished
    return (step - start) / (end - start) if end > start else 1.0


def clip_scale(norm: float, max_norm: float) -> float:
    """llm.c's grad_scale: shrink the gradients to `max_norm` when their global norm exceeds it."""
    return max_norm / norm if norm > max_norm else 1.0


# ---- ZeRO-1 shards ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZeroShards:
    """The flat parameter buffer (`total` elements, zero padded to `padded_size`) cut into `world_size`
    equal shards of `shard_size`; rank r owns the optimizer state of [r*shard_size, (r+1)*shard_size)."""
    total: int
    padded_size: int
    world_size: int
    shard_size: int

    def range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        return rank * self.shard_size, (rank + 1) * self.shard_size


def zero_shards(layout: Layout, world_size: int) -> ZeroShards:
    """Shard ranges as a function of the parameter layout and the world size only, so every rank (and a
    resumed run) agrees on them without communicating. world_size 1: one shard, the whole buffer."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    unit = world_size * SHARD_ALIGN
    padded = -(-layout.total // unit) * unit
    return ZeroShards(layout.total, padded, world_size, padded // world_size)


class Segment(NamedTuple):
    """A piece of one parameter tensor: [begin, end) in flat-buffer elements."""
    name: str
    begin: int
    end: int
    decay: bool


def shard_segments(layout: Layout, start: int, end: int) -> list[Segment]:
    """The tensors intersecting [start, end), clipped to it, in layout order; padding past
    layout.total belongs to no tensor. AdamW runs once per segment with that tensor's weight decay."""
    if not 0 <= start <= end:
        raise ValueError(f"bad range [{start}, {end})")
    return [Segment(t.name, max(t.offset, start), min(t.end, end), t.decay)
            for t in layout.tensors if t.offset < end and t.end > start]


def gradient_buckets(layout: Layout, n_layer: int) -> list[list[tuple[int, int]]]:
    """The gradient all-reduce, cut into one bucket per layer (its slices of the 12 stacked per-layer
    tensors), last layer first as the backward finishes them, then one bucket for the other tensors
    (embeddings, final layernorm). Reducing bucket by bucket is the same arithmetic whether the buckets
    start during the backward (overlapped) or after it."""
    stacked = [t for t in layout.tensors if t.name not in ("wte", "wpe", "lnfw", "lnfb")]
    buckets = []
    for l in reversed(range(n_layer)):
        buckets.append([(t.offset + l * (t.size // n_layer), t.offset + (l + 1) * (t.size // n_layer))
                        for t in stacked])
    buckets.append([(layout[name].offset, layout[name].end) for name in ("wte", "wpe", "lnfw", "lnfb")])
    return buckets


# ---- AdamW ------------------------------------------------------------------------------------------

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


# ---- outlier detection (-sl / -sg) ------------------------------------------------------------------

class OutlierDetector:
    """z-score of each new value against a sliding window of the last `window` values (the new one
    included), as llm.c's outlier_detector.h: nan until the window is full, 0 when the window is flat.
    Sums are kept in float64 so the running += / -= does not drift."""

    def __init__(self, window: int = 128):
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.window = window
        self.buffer = [0.0] * window
        self.count = 0
        self.index = 0
        self.sum = 0.0
        self.sum_sq = 0.0

    def update(self, x: float) -> float:
        x = float(x)
        if self.count < self.window:
            self.buffer[self.count] = x
            self.count += 1
            self.sum += x
            self.sum_sq += x * x
            return math.nan
        old = self.buffer[self.index]
        self.buffer[self.index] = x
        self.index = (self.index + 1) % self.window
        self.sum += x - old
        self.sum_sq += x * x - old * old
        mean = self.sum / self.window
        variance = self.sum_sq / self.window - mean * mean
        # rounding can leave a flat window with a tiny negative variance
        std = math.sqrt(variance) if variance > 0 else 0.0
        return (x - mean) / std if std > 0 else 0.0


# ---- the optimizer a trainer steps ------------------------------------------------------------------

class AdamW:
    """AdamW over this rank's shard [start, end) of the flat buffers, on any backend: fp32 moments, fp32
    master weights when the backend stores bf16 parameters, one update launch per tensor segment so weight
    decay follows the layout. With ZeRO-1 the gradients are reduce-scattered into the shard and the
    updated shard is all-gathered back into every rank's parameters."""

    def __init__(self, backend, model, shard: tuple[int, int], cfg: AdamWConfig, master_weights: bool = True,
                 graphs: bool = True, initial_params: np.ndarray | None = None):
        """initial_params: the fp32 host parameters the model was built from (a fresh init, an fp32 model
        file); the master copy starts from them rather than from their bf16 rounding, as an fp32-weights
        PyTorch run does (measured 4x closer to one over the first 100 steps, docs/perf.md)."""
        self.backend, self.model, self.cfg = backend, model, cfg
        self.start, self.end = shard
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
        self._pending, self._started = [], set()  # all-reduces started during the backward (-z 0)

    def layer_done_hook(self, comm):
        """For model.backward(layer_done=...) on the last micro-step under -z 0: starts the all-reduce of
        each layer's gradients as soon as they are complete, overlapping the rest of the backward."""
        def start(layer):
            bucket = self.model.cfg.n_layer - 1 - layer
            self._pending += self._start_bucket(comm, bucket)
        return start

    def _start_bucket(self, comm, bucket):
        self._started.add(bucket)
        g = self.model.grads
        return [comm.all_reduce_start(g[b:e], op="avg") for b, e in self.buckets[bucket]]

    def reduce_and_norm(self, comm, zero_stage: int) -> float:
        """Averages the gradients over ranks (all of them, or this rank's shard under ZeRO-1) and returns
        the global gradient norm."""
        grads, shard = self.model.grads, self.model.grads[self.start:self.end]
        if comm.communicates:
            if zero_stage == 1:
                comm.reduce_scatter(grads, shard, op="avg")
            else:  # bucket by bucket, whether or not the backward already started some
                for bucket in range(len(self.buckets)):
                    if bucket not in self._started:
                        self._pending += self._start_bucket(comm, bucket)
                comm.finish(self._pending)
                self._pending, self._started = [], set()
        norm_squared = self.backend.global_norm_squared(shard)
        if zero_stage == 1 and comm.communicates:
            comm.all_reduce(norm_squared, op="sum")
        return float(np.sqrt(self.backend.to_numpy(norm_squared)[0]))

    def step(self, lr: float, t: int, grad_scale: float, seed: int):
        """Update number t (from 1) with learning rate lr and gradients multiplied by grad_scale."""
        c = self.cfg
        self._update(self.backend.adamw_scalars(lr, t, grad_scale, seed, c.beta1, c.beta2))

    def _update_segments(self, scalars):
        c, b = self.cfg, self.backend
        p, g = self.model.params, self.model.grads
        for seg, salt in zip(self.segments, self.salts):
            lo, hi = seg.begin - self.start, seg.end - self.start
            master = self.master[lo:hi] if self.master is not None else None
            b.adamw_update(p[seg.begin:seg.end], master, g[seg.begin:seg.end], self.m[lo:hi], self.v[lo:hi],
                           scalars, c.beta1, c.beta2, c.eps, c.weight_decay if seg.decay else 0.0, salt)

    def gather_params(self, comm, zero_stage: int):
        if zero_stage == 1 and comm.communicates:
            comm.all_gather(self.model.params[self.start:self.end], self.model.params)

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
