"""What every PyTorch reference model shares: its parameters loaded from and exported to gpt2cu's flat fp32
buffer through its family's param_layout (so both implementations start from the same init_params and
their gradients compare tensor by tensor), and torch's AdamW split by the layout's decay column."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import family_of


class FlatParams(nn.Module):
    """A reference model over a family config self.cfg; a subclass defines layout_tensors(): layout name ->
    the parameters that make it up, one per layer for the stacked (L, ...) tensors."""

    def lm_head_loss(self, hidden, head, targets):
        """(logits over the real vocabulary V, mean cross-entropy over the targets that are not -1, or None
        without targets): the head over all Vp rows (a well-tiled GEMM, as gpt2cu's), the padding dropped."""
        V = self.cfg.vocab_size
        logits = F.linear(hidden, head)[..., :V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _layout(self):
        return family_of(self.cfg).param_layout(self.cfg)

    def _views(self, flat: np.ndarray):
        """(parameter, matching view of flat) pairs over the whole layout."""
        views = self._layout().views(flat)
        for name, params in self.layout_tensors().items():
            yield from zip(params, views[name].reshape(len(params), *params[0].shape))

    @classmethod
    def from_flat(cls, cfg, flat: np.ndarray, **kwargs):
        model = cls(cfg, **kwargs)
        with torch.no_grad():
            for p, src in model._views(np.asarray(flat, dtype=np.float32)):
                p.copy_(torch.from_numpy(np.ascontiguousarray(src)))
        return model

    def _export(self, pick, dtype) -> np.ndarray:
        flat = np.zeros(self._layout().total, dtype=dtype)
        for p, dst in self._views(flat):
            t = pick(p)
            if t is not None:
                torch.from_numpy(dst).copy_(t.detach())  # any device, any dtype
        return flat

    def to_flat(self, dtype=np.float32) -> np.ndarray:
        """The parameters as gpt2cu's flat host buffer (fp32; float64 keeps a float64 model's precision)."""
        return self._export(lambda p: p, dtype)

    def grads_to_flat(self, dtype=np.float32) -> np.ndarray:
        """The gradients as a flat host buffer (zero where a parameter has no gradient)."""
        return self._export(lambda p: p.grad, dtype)

    def configure_optimizer(self, weight_decay, lr, betas, eps, fused):
        """torch's AdamW with gpt2cu's split: weight decay on the layout's decay tensors only."""
        params = self.layout_tensors()
        groups = [{"params": [p for t in self._layout().tensors if t.decay == decay for p in params[t.name]],
                   "weight_decay": weight_decay if decay else 0.0} for decay in (True, False)]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
