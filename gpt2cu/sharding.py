"""How the flat parameter/gradient buffers are cut up between ranks and collectives, read off the layout.

- ZeRO shards: the buffers (`total` elements) are zero padded to `padded_size` and cut into `world_size`
  equal shards; rank r owns the optimizer state (and, from ZeRO-2 on, the reduced gradients) of shard r.
  A function of the layout and the world size only, so every rank and every resumed run agree on it
  without communicating.
- Segments: the pieces of parameter tensors inside a shard; AdamW runs once per segment, with that
  tensor's weight decay.
- Gradient buckets: the all-reduce under ZeRO-0, one bucket per layer (its slice of every per-layer
  tensor), last layer first as the backward completes them, then one bucket of the other tensors.
- ZeRO units (ZeRO-2 and -3): the same grouping, one unit per layer plus one of the tensors outside the
  layers, each packed contiguously and padded to split evenly: the unit is what is reduce-scattered
  after its backward and all-gathered before its forward, and rank r owns chunk r of every unit.
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


class Piece(NamedTuple):
    """A layout tensor's slice inside a unit: [begin, end) in the layout's flat buffer, packed at `at`."""
    name: str
    begin: int
    end: int
    at: int


@dataclass(frozen=True)
class Unit:
    """One ZeRO-2/3 unit: `pieces` packed in layout order into `padded_size` elements (zero padded) that
    split into world_size chunks of `shard_size`. In the unit-major buffer (every unit, one after the
    other) it starts at `offset`; in a rank's shard buffer (its chunk of every unit) at `shard_offset`."""
    layer: int | None  # None: the tensors outside the layers (embeddings, final layernorm)
    pieces: tuple
    padded_size: int
    shard_size: int
    offset: int
    shard_offset: int


def zero_units(layout: Layout, n_layer: int, world_size: int) -> tuple[Unit, ...]:
    """The units of `layout` over `world_size` ranks: the tensors outside the layers first, then layer
    0 .. n_layer-1 (forward order). Every layer unit has the same size, so a buffer of one layer unit
    holds any layer."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    groups = [[(t.name, t.offset, t.end) for t in layout.tensors if not t.per_layer]]
    for l in range(n_layer):
        groups.append([(t.name, t.offset + l * (t.size // n_layer), t.offset + (l + 1) * (t.size // n_layer))
                       for t in layout.tensors if t.per_layer])
    unit_align = world_size * SHARD_ALIGN
    units, offset, shard_offset = [], 0, 0
    for index, group in enumerate(groups):
        pieces, at = [], 0
        for name, begin, end in group:
            pieces.append(Piece(name, begin, end, at))
            at += end - begin
        padded = max(unit_align, -(-at // unit_align) * unit_align)
        units.append(Unit(None if index == 0 else index - 1, tuple(pieces), padded, padded // world_size, offset,
                          shard_offset))
        offset += padded
        shard_offset += padded // world_size
    return tuple(units)


class UnitSegment(NamedTuple):
    """A piece of one parameter tensor inside this rank's chunk of a unit: `length` elements at
    `layout_at` in the layout's flat buffer, `unit_at` in the unit (packed), `shard_at` in the rank's
    shard buffer."""
    name: str
    unit: Unit
    layout_at: int
    unit_at: int
    shard_at: int
    length: int


def unit_shard_segments(units, rank: int) -> list[UnitSegment]:
    """The tensor pieces of rank's chunk of every unit, in shard-buffer order; padding belongs to none."""
    segments = []
    for u in units:
        lo, hi = rank * u.shard_size, (rank + 1) * u.shard_size
        for piece in u.pieces:
            begin, end = max(lo, piece.at), min(hi, piece.at + piece.end - piece.begin)
            if begin < end:
                segments.append(UnitSegment(piece.name, u, piece.begin + begin - piece.at, begin,
                                            u.shard_offset + begin - lo, end - begin))
    return segments
