"""Tables of where every tensor lives in a flat buffer: the type every model family's parameter table
and activation table is written in.

Parameters are one flat buffer in the family's file order (so model files are a header plus that
buffer). Backends, checkpoints, ZeRO shards, exporters and the references read the family's table;
nothing else knows an offset. Columns: name, shape, offset, decay (AdamW's weight decay applies) and
per_layer (stacked along dim 0, one slice per block: what the per-layer gradient buckets cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    offset: int  # in elements, into the flat buffer
    decay: bool = False
    per_layer: bool = False

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    tensors: tuple
    total: int

    def __getitem__(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self):
        return [t.name for t in self.tensors]

    def views(self, flat) -> dict:
        """name -> view of `flat` (numpy or cupy) with the tensor's shape."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.total},)")
        return {t.name: flat[t.offset:t.end].reshape(t.shape) for t in self.tensors}


def build_layout(entries) -> Layout:
    """entries: (name, shape[, decay[, per_layer]]) in buffer order."""
    tensors, offset = [], 0
    for name, shape, *columns in entries:
        t = Tensor(name, tuple(shape), offset, *columns)
        tensors.append(t)
        offset = t.end
    return Layout(tuple(tensors), offset)
