"""What every family's model holds, whatever its network: flat parameter and gradient buffers viewed
through the family's parameter table, and activation buffers from its activation table, for a fixed (B, T)
on one backend. A family's Model subclasses FlatModel and adds its schedule."""
from __future__ import annotations

import numpy as np

from ..layout import Layout


def _allocate(group: str, make):
    try:
        return make()
    except MemoryError as e:  # CuPy's OutOfMemoryError is a MemoryError
        raise MemoryError(f"out of memory allocating the {group}: {str(e).rstrip('.')}. Try a smaller -b, "
                          f"or -r 2 to recompute activations") from e


class FlatModel:
    def __init__(self, cfg, backend, B: int, T: int, params: np.ndarray, recompute: int, padded_size: int | None,
                 layout: Layout, activations: Layout, fp32_activations: frozenset):
        if not 1 <= T <= cfg.max_seq_len:
            raise ValueError(f"sequence length {T} must be in [1, {cfg.max_seq_len}] for this model")
        self.cfg, self.ops, self.B, self.T, self.recompute = cfg, backend, B, T, recompute
        self.layout = layout
        # the flat buffers may be longer than the layout (ZeRO shards are padded to align)
        n = padded_size or self.layout.total
        self.params = _allocate("parameters", lambda: backend.upload_params(params, n))
        self.grads = _allocate("gradients", lambda: backend.zeros((n,), param=True))
        self.p = self.layout.views(self.params[:self.layout.total])
        self.g = self.layout.views(self.grads[:self.layout.total])
        self.acts = _allocate("activations", lambda: {
            t.name: backend.zeros(t.shape, fp32=t.name in fp32_activations) for t in activations.tensors})

    def load_params(self, host_params: np.ndarray):
        """Replace the parameters with a host fp32 flat buffer (e.g. a checkpoint's)."""
        self.ops.upload_params(host_params, self.params.shape[0], out=self.params)

    def host_params(self) -> np.ndarray:
        """The parameters as a host fp32 flat buffer of the layout's size."""
        return self.ops.to_numpy(self.params[:self.layout.total])

    def zero_grad(self):
        self.ops.zero_(self.grads)
