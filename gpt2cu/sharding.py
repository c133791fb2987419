"""How the flat parameter/gradient buffers are cut up between ranks and collectives, read off the layout.

- ZeRO shards: the buffers (`total` elements) are zero padded to `padded_size` and cut into `world_size`
  equal shards; rank r owns the optimizer state (and, from ZeRO-2 on, the reduced gradients) of shard r.
  A function of the layout and the world size only, so every rank and every resumed run agree on it
  without communicating.
- Segments: the pieces of parameter tensors inside a shard; AdamW runs once per segment, with that
  tensor's weight decay.
- Gradient buckets: the all-reduce under ZeRO-0, one bucket per layer (its slice of every per-layer
  tensor), last layer first as the backward completes them, then one bucket of the other tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .layout import Layout

# shards start on multiples of this many elements (256 bytes of fp32: vector loads stay aligned)
SHARD_ALIGN = 64


@dataclass(frozen=True)
class ZeroShards:
    """The flat buffer (`total` elements, zero padded to `padded_size`) cut into `world_size` equal shards
    of `shard_size`; rank r owns [r*shard_size, (r+1)*shard_size)."""
    total: int
    padded_size: int
    world_size: int
    shard_size: int

    def range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        return rank * self.shard_size, (rank + 1) * self.shard_size


def zero_shards(layout: Layout, world_size: int) -> ZeroShards:
    """Shard ranges of `layout` over `world_size` ranks (1: one shard, the whole buffer)."""
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
    layout.total belongs to no tensor."""
    if not 0 <= start <= end:
        raise ValueError(f"bad range [{start}, {end})")
    return [Segment(t.name, max(t.offset, start), min(t.end, end), t.decay)
            for t in layout.tensors if t.offset < end and t.end > start]


def gradient_buckets(layout: Layout, n_layer: int) -> list[list[tuple[int, int]]]:
    """[(begin, end), ...] per bucket: one per layer (the layer's slice of every per-layer tensor), last
    layer first, then one bucket of the tensors that belong to no layer. Reducing bucket by bucket is
    the same arithmetic whether the buckets start during the backward (overlapped) or after it."""
    per_layer = [t for t in layout.tensors if t.per_layer]
    buckets = []
    for l in reversed(range(n_layer)):
        buckets.append([(t.offset + l * (t.size // n_layer), t.offset + (l + 1) * (t.size // n_layer))
                        for t in per_layer])
    buckets.append([(t.offset, t.end) for t in layout.tensors if not t.per_layer])
    return buckets
