"""Where a model's parameters and gradients live under each ZeRO stage, and the collectives that move
them. A model family takes its parameter and gradient views (`p`, `g`) from a storage and calls its
hooks around each layer; optim.AdamW updates the storage's shard and never asks which stage it holds.

  FlatStorage        ZeRO-0 and -1: the whole flat buffers in layout order (ZeRO-1's padded so its
                     shards split evenly). ZeRO-0 all-reduces the gradients in per-layer buckets (started from
                     inside the last backward with --overlap-comm); ZeRO-1 reduce-scatters them into this
                     rank's shard and all-gathers the updated shard.
  GradShardStorage   ZeRO-2: parameters whole; gradients held only as this rank's shard. The backward
                     writes a layer's gradients into one layer-sized buffer, which is reduce-scattered
                     (averaged) as soon as the layer is done and added into the shard, then zeroed for
                     the next layer; the tensors outside the layers have a buffer of their own, reduced
                     after the encoder's backward. Gradient accumulation: every micro-step reduces, and
                     the shard accumulates (the price of never holding the whole gradient: grad_accum
                     reduce-scatters per step instead of one).
  ParamShardStorage  ZeRO-3: also the parameters held only as this rank's shard. A layer is all-gathered
                     into one of three fixed slots just before its forward and again before its backward
                     (the next layer's gather is started first: on CUDA it runs on the communication
                     stream, on the host in order); the tensors outside the layers are gathered once at
                     the forward's start and stay until the update changes them.

ZeRO-2/3 buffers are in unit-major order (sharding.zero_units: the tensors outside the layers, then one
unit per layer, each padded to split evenly): rank r's shard is chunk r of every unit, concatenated.
Every buffer is allocated once, at a fixed address (a slot is reused, never reallocated), and its size
comes from buffer_elements(), which the memory planner (memory.py) reads too.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .sharding import gradient_buckets, shard_segments, unit_shard_segments, zero_shards, zero_units

ZERO_STAGES = (0, 1, 2, 3)
PARAM_SLOTS = 3  # ZeRO-3 layer slots: the layer in use, the next one (the fused layernorm), the prefetch


class UpdateSegment(NamedTuple):
    """A piece of one tensor that AdamW updates: `length` elements at param_at in the storage's
    update_params, at grad_at in its update_grads, at state_at in the optimizer's shard state."""
    name: str
    param_at: int
    grad_at: int
    state_at: int
    length: int
    decay: bool


def buffer_elements(layout, n_layer: int, world_size: int, zero_stage: int) -> dict:
    """Element counts of the buffers a storage allocates (parameter dtype), by memory group:
    {"parameters": [...], "gradients": [...], "communication": [...]} plus "shard" (this rank's
    optimizer shard). One source for the storages below and the memory planner."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if zero_stage == 0:
        return {"parameters": [layout.total], "gradients": [layout.total], "communication": [], "shard": layout.total}
    if zero_stage == 1:
        shards = zero_shards(layout, world_size)
        return {"parameters": [shards.padded_size], "gradients": [shards.padded_size], "communication": [],
                "shard": shards.shard_size}
    units = zero_units(layout, n_layer, world_size)
    top, layer = units[0], units[-1]
    full = sum(u.padded_size for u in units)
    shard = sum(u.shard_size for u in units)
    gradient_buffers = [top.padded_size, layer.padded_size]
    if zero_stage == 2:
        return {"parameters": [full], "gradients": [shard], "communication": gradient_buffers, "shard": shard}
    slots = [layer.padded_size] * min(PARAM_SLOTS, n_layer)
    return {"parameters": [shard], "gradients": [shard], "communication": gradient_buffers + [top.padded_size] + slots,
            "shard": shard}


def make_storage(zero_stage: int, backend, layout, n_layer: int, comm):
    """The storage of `zero_stage` for a model of `layout` on this rank (zeros: the model loads them)."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if zero_stage <= 1:
        return FlatStorage(backend, layout, n_layer, comm, zero_stage)
    return (GradShardStorage if zero_stage == 2 else ParamShardStorage)(backend, layout, n_layer, comm)


def allocate(group: str, make):
    """make(), with an out-of-memory error that names the group of buffers it was allocating."""
    try:
        return make()
    except MemoryError as e:  # CuPy's OutOfMemoryError is a MemoryError
        raise MemoryError(f"out of memory allocating the {group}: {str(e).rstrip('.')}. Try a smaller -b, "
                          f"-r 2 or 3 to recompute activations, or a higher -z on more GPUs") from e


class FlatStorage:
    """ZeRO-0 and -1: one flat parameter buffer and one gradient buffer in layout order."""
    collectives_in_backward = False  # the micro-step itself never communicates

    def __init__(self, backend, layout, n_layer: int, comm, zero_stage: int = 0):
        if zero_stage not in (0, 1):
            raise ValueError(f"FlatStorage holds ZeRO-0 and -1, not {zero_stage}")
        self.backend, self.layout, self.comm, self.zero_stage = backend, layout, comm, zero_stage
        sizes = buffer_elements(layout, n_layer, comm.world_size, zero_stage)
        n = sizes["parameters"][0]
        self.params = allocate("parameters", lambda: backend.zeros((n,), param=True))
        self.grads = allocate("gradients", lambda: backend.zeros((n,), param=True))
        self.p = layout.views(self.params[:layout.total])
        self.g = layout.views(self.grads[:layout.total])
        # ZeRO-1 with a communicator (NCCL with one rank too: how that path is tested) shards the update
        self.sharded = zero_stage == 1 and comm.communicates
        self.shard_size = sizes["shard"]
        self.start = comm.rank * self.shard_size if zero_stage == 1 else 0
        self.end = self.start + self.shard_size
        self.grad_shard = self.grads[self.start:self.end]
        self.update_params, self.update_grads = self.params, self.grads
        self.segments = [UpdateSegment(s.name, s.begin, s.begin, s.begin - self.start, s.end - s.begin, s.decay)
                         for s in shard_segments(layout, self.start, self.end)]
        self.buckets = gradient_buckets(layout, n_layer)
        self._pending, self._started = [], set()  # all-reduces started during the backward (ZeRO-0)

    def buffers(self) -> dict:
        return {"parameters": [self.params], "gradients": [self.grads], "communication": []}

    # ---- the model's hooks: nothing moves during the forward and backward --------------------------------
    def gather_top(self):
        pass

    def gather_layer(self, layer: int, prefetch: int):
        pass

    def layer_grads_done(self, layer: int):
        pass

    def top_grads_done(self):
        pass

    # ---- the optimizer's side -------------------------------------------------------------------------
    @property
    def overlaps_backward(self) -> bool:
        """Whether layer_done can start gradient reductions inside the backward (ZeRO-0, several ranks)."""
        return self.comm.communicates and self.zero_stage == 0

    def layer_done(self, layer: int):
        """model.backward(layer_done=...) on the last micro-step under ZeRO-0: starts the all-reduce of a
        layer's gradients as soon as they are complete, overlapping the rest of the backward."""
        self._pending += self._start_bucket(len(self.buckets) - 2 - layer)

    def _start_bucket(self, bucket):
        self._started.add(bucket)
        return [self.comm.all_reduce_start(self.grads[b:e], op="avg") for b, e in self.buckets[bucket]]

    def reduce_gradients(self):
        """Averages the gradients over ranks: all of them (bucket by bucket, whether or not the backward
        already started some), or into this rank's shard under ZeRO-1."""
        if not self.comm.communicates:
            return
        if self.sharded:
            self.comm.reduce_scatter(self.grads, self.grad_shard, op="avg")
            return
        for bucket in range(len(self.buckets)):
            if bucket not in self._started:
                self._pending += self._start_bucket(bucket)
        self.comm.finish(self._pending)
        self._pending, self._started = [], set()

    def gather_params(self):
        """Every rank's parameters from the updated shards (ZeRO-1; nothing to do under ZeRO-0)."""
        if self.sharded:
            self.comm.all_gather(self.params[self.start:self.end], self.params)

    def zero_grad(self):
        self.backend.zero_(self.grads)

    # ---- host copies ------------------------------------------------------------------------------------
    def load_params(self, host):
        self.backend.upload_params(host, self.params.shape[0], out=self.params)

    def host_params(self) -> np.ndarray:
        return self.backend.to_numpy(self.params[:self.layout.total])

    def host_shard(self, host) -> np.ndarray:
        """This rank's optimizer shard of a host fp32 layout-order buffer (zero past the layout)."""
        out = np.zeros(self.shard_size, dtype=np.float32)
        part = np.asarray(host, dtype=np.float32)[self.start:self.end]
        out[:part.size] = part
        return out


class _UnitStorage:
    """What ZeRO-2 and -3 share: the units, this rank's gradient shard, the two gradient buffers the
    backward writes into (the layer in flight, the tensors outside the layers), and the per-unit
    reduce-scatter that empties them into the shard."""
    collectives_in_backward = True
    overlaps_backward = False  # the backward reduces every unit itself, on every micro-step

    def __init__(self, backend, layout, n_layer: int, comm, zero_stage: int):
        self.backend, self.layout, self.comm, self.zero_stage = backend, layout, comm, zero_stage
        self.units = zero_units(layout, n_layer, comm.world_size)
        self.top, self.layers = self.units[0], self.units[1:]
        self.sizes = buffer_elements(layout, n_layer, comm.world_size, zero_stage)
        self.shard_size = self.sizes["shard"]
        self.sharded = comm.communicates  # the gradient norm is a sum over ranks
        zeros = lambda n: backend.zeros((n,), param=True)
        self.grad_shard = allocate("gradients", lambda: zeros(self.shard_size))
        self.top_grads = allocate("communication buffers", lambda: zeros(self.top.padded_size))
        self.layer_grads = allocate("communication buffers", lambda: zeros(self.layers[0].padded_size))
        # every layer's gradient views are the same buffer: one layer is back-propagated at a time
        self.g = {**self._views(self.top, self.top_grads),
                  **{name: [view] * n_layer for name, view in self._views(self.layers[0], self.layer_grads).items()}}
        self.grads = self.update_grads = self.grad_shard  # the gradients this rank holds
        self.unit_segments = unit_shard_segments(self.units, comm.rank)
        self._decay = {t.name: t.decay for t in layout.tensors}

    def _views(self, unit, buf) -> dict:
        """name -> the view of that tensor's piece in a buffer holding `unit` (packed), in the tensor's
        shape (a per-layer tensor's: one layer's)."""
        shape = lambda name: self.layout[name].shape[0 if unit.layer is None else 1:]
        return {p.name: buf[p.at:p.at + p.end - p.begin].reshape(shape(p.name)) for p in unit.pieces}

    def _shard(self, buf, unit):
        """This rank's chunk of `unit` in a shard-order buffer."""
        return buf[unit.shard_offset:unit.shard_offset + unit.shard_size]

    def _reduce_into_shard(self, buf, unit):
        """Averages a unit's gradients over ranks into this rank's slot of buf, adds that into the shard
        (gradient accumulation over micro-steps, in fp32 arithmetic) and zeroes buf for its next use."""
        b, r, s = self.backend, self.comm.rank, unit.shard_size
        mine = buf[r * s:(r + 1) * s]
        self.comm.reduce_scatter(buf, mine, op="avg")
        b.accumulate(self._shard(self.grad_shard, unit), mine)
        b.zero_(buf)

    def layer_grads_done(self, layer: int):
        self._reduce_into_shard(self.layer_grads, self.layers[layer])

    def top_grads_done(self):
        self._reduce_into_shard(self.top_grads, self.top)

    def reduce_gradients(self):
        """Nothing left: every unit was reduced during the backward that completed it."""

    def zero_grad(self):
        self.backend.zero_(self.grad_shard)

    def host_shard(self, host) -> np.ndarray:
        """This rank's shard of a host fp32 layout-order buffer: chunk rank of every unit."""
        out = np.zeros(self.shard_size, dtype=np.float32)
        host = np.asarray(host, dtype=np.float32)
        for seg in self.unit_segments:
            out[seg.shard_at:seg.shard_at + seg.length] = host[seg.layout_at:seg.layout_at + seg.length]
        return out

    def _unit_major(self, host) -> np.ndarray:
        """A host fp32 layout-order buffer rearranged into the unit-major order (zero padded)."""
        out = np.zeros(sum(u.padded_size for u in self.units), dtype=np.float32)
        host = np.asarray(host, dtype=np.float32)
        for u in self.units:
            for p in u.pieces:
                out[u.offset + p.at:u.offset + p.at + p.end - p.begin] = host[p.begin:p.end]
        return out

    def _layout_order(self, unit, unit_host, out):
        """Writes a unit's host values (packed) to their places in a layout-order host buffer."""
        for p in unit.pieces:
            out[p.begin:p.end] = unit_host[p.at:p.at + p.end - p.begin]


class GradShardStorage(_UnitStorage):
    """ZeRO-2: the whole parameters (unit-major), the gradients as this rank's shard."""

    def __init__(self, backend, layout, n_layer: int, comm):
        super().__init__(backend, layout, n_layer, comm, 2)
        self.params = allocate("parameters", lambda: backend.zeros((self.sizes["parameters"][0],), param=True))
        self.p = {**self._views(self.top, self._unit(self.top)),
                  **{p.name: [self._views(u, self._unit(u))[p.name] for u in self.layers] for p in self.layers[0].pieces}}
        self.update_params = self.params
        self.segments = [UpdateSegment(s.name, s.unit.offset + s.unit_at, s.shard_at, s.shard_at, s.length,
                                       self._decay[s.name]) for s in self.unit_segments]

    def _unit(self, unit):
        return self.params[unit.offset:unit.offset + unit.padded_size]

    def buffers(self) -> dict:
        return {"parameters": [self.params], "gradients": [self.grad_shard],
                "communication": [self.top_grads, self.layer_grads]}

    def gather_top(self):
        pass

    def gather_layer(self, layer: int, prefetch: int):
        pass

    def gather_params(self):
        """Each unit all-gathered in place from the ranks' updated chunks."""
        r = self.comm.rank
        for u in self.units:
            unit = self._unit(u)
            self.comm.all_gather(unit[r * u.shard_size:(r + 1) * u.shard_size], unit)

    def load_params(self, host):
        self.backend.upload_params(self._unit_major(host), self.params.shape[0], out=self.params)

    def host_params(self) -> np.ndarray:
        unit_major = self.backend.to_numpy(self.params)
        out = np.zeros(self.layout.total, dtype=np.float32)
        for u in self.units:
            self._layout_order(u, unit_major[u.offset:u.offset + u.padded_size], out)
        return out


class ParamShardStorage(_UnitStorage):
    """ZeRO-3: parameters and gradients as this rank's shard; layers gathered into fixed slots."""

    def __init__(self, backend, layout, n_layer: int, comm):
        super().__init__(backend, layout, n_layer, comm, 3)
        zeros = lambda n: backend.zeros((n,), param=True)
        self.shard_params = allocate("parameters", lambda: zeros(self.shard_size))
        self.top_params = allocate("communication buffers", lambda: zeros(self.top.padded_size))
        self.slots = allocate("communication buffers", lambda: [zeros(self.layers[0].padded_size)
                                                                  for _ in range(min(PARAM_SLOTS, n_layer))])
        slot_views = [self._views(self.layers[0], slot) for slot in self.slots]
        self.p = {**self._views(self.top, self.top_params),
                  **{p.name: [slot_views[l % len(self.slots)][p.name] for l in range(n_layer)]
                     for p in self.layers[0].pieces}}
        self.params = self.update_params = self.shard_params
        self.segments = [UpdateSegment(s.name, s.shard_at, s.shard_at, s.shard_at, s.length, self._decay[s.name])
                         for s in self.unit_segments]
        self._in_slot = [None] * len(self.slots)  # the layer each slot holds (None: stale)
        self._top_gathered = False
        self._pending = {}  # layer -> its gather, started but not yet waited for

    def buffers(self) -> dict:
        return {"parameters": [self.shard_params], "gradients": [self.grad_shard],
                "communication": [self.top_grads, self.layer_grads, self.top_params, *self.slots]}

    def gather_top(self):
        """The tensors outside the layers, for the forward's encoder and LM head and the backward's."""
        if not self._top_gathered:
            self.comm.all_gather(self._shard(self.shard_params, self.top), self.top_params)
            self._top_gathered = True

    def gather_layer(self, layer: int, prefetch: int):
        """Layer `layer` gathered (waited for) before its first use; then the gather of `prefetch` (the
        next layer in this pass's order) started, into the slot of a layer the pass is done with."""
        if self._in_slot[layer % len(self.slots)] != layer:
            self._start_gather(layer)
        if layer in self._pending:
            self.comm.finish([self._pending.pop(layer)])
        if 0 <= prefetch < len(self.layers) and self._in_slot[prefetch % len(self.slots)] != prefetch:
            self._start_gather(prefetch)

    def _start_gather(self, layer: int):
        slot = layer % len(self.slots)
        self._in_slot[slot] = layer
        self._pending[layer] = self.comm.all_gather_start(self._shard(self.shard_params, self.layers[layer]),
                                                          self.slots[slot])

    def gather_params(self):
        """The update changed the shards: every gathered copy is stale."""
        self._in_slot = [None] * len(self.slots)
        self._top_gathered = False

    def load_params(self, host):
        self.backend.upload_params(self.host_shard(host), self.shard_size, out=self.shard_params)
        self.gather_params()

    def host_params(self) -> np.ndarray:
        """Every unit gathered through the slots (a collective: every rank must call it)."""
        out = np.zeros(self.layout.total, dtype=np.float32)
        self.gather_top()
        self._layout_order(self.top, self.backend.to_numpy(self.top_params), out)
        for layer, unit in enumerate(self.layers):
            self.gather_layer(layer, -1)
            self._layout_order(unit, self.backend.to_numpy(self.slots[layer % len(self.slots)]), out)
        return out
