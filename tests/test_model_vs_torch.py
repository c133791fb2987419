"""The whole schedule (gpt2cu/model.py over the numpy backend, fp32) against a plain PyTorch GPT-2
(gpt2cu/reference/torch_gpt2.py, float64) from the same flat parameters: logits, loss, every gradient tensor,
all recompute settings, ten AdamW steps with clipping, and the padded GPT-2 vocabulary.

Tolerance: 1e-4 relative to each tensor's scale. The numpy side is fp32 (6e-8 per rounding) through a
few layers of sums over at most a few hundred terms, ~1e-6 to 1e-5 (seen: 3e-7); the float64 side is
exact by comparison. The AdamW test explains its own, looser, parameter tolerance in fp32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2cu.backends.numpy_ops import NumpyBackend
from gpt2cu.models.gpt2 import GPTConfig, param_layout, GPT, init_params
from gpt2cu.reference.torch_gpt2 import TorchGPT

torch.set_num_threads(1)
REL = 1e-4
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, max_seq_len=16, vocab_size=97, padded_vocab_size=128)
B, T = 2, 11  # T < max_seq_len: the wpe rows past T must get no gradient


def assert_close(actual, expected, what, rel=REL):
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max(), err_msg=what)


def batch(cfg, seed):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int32)
    return toks[:, :-1].copy(), toks[:, 1:].copy()


def numpy_step(model, tokens, targets):
    """Forward and backward as the trainer runs them; returns the mean loss."""
    batch = model.ops.set_batch(tokens, targets)
    model.forward(batch, dloss=1.0 / (B * T))
    model.backward(batch)
    return float(model.acts["losses"].mean())


def torch_step(ref, tokens, targets):
    logits, loss = ref(torch.from_numpy(tokens).long(), torch.from_numpy(targets).long())
    loss.backward()
    return logits.detach().numpy(), loss.item()


def test_parameter_round_trip():
    flat = init_params(TINY, seed=1)
    ref = TorchGPT.from_flat(TINY, flat)
    assert sum(p.numel() for p in ref.parameters()) == flat.size  # every parameter is in the layout, once
    np.testing.assert_array_equal(ref.to_flat(), flat)


def test_forward_and_gradients_match_torch():
    flat = init_params(TINY, seed=1)
    tokens, targets = batch(TINY, seed=2)
    model = GPT(TINY, NumpyBackend(), B, T, flat)
    model.forward(model.ops.set_batch(tokens))
    logits = model.logits()
    loss = numpy_step(model, tokens, targets)

    ref = TorchGPT.from_flat(TINY, flat).double()
    ref_logits, ref_loss = torch_step(ref, tokens, targets)
    V = TINY.vocab_size
    assert_close(logits[..., :V], ref_logits, "logits")
    assert (logits[..., V:] == 0).all()  # the padded wte rows are zero at init
    assert abs(loss - ref_loss) <= REL * ref_loss
    grads, ref_grads = model.layout.views(model.grads), model.layout.views(ref.grads_to_flat(np.float64))
    for name in model.layout.names:
        assert_close(grads[name], ref_grads[name], name)
    assert not grads["wpe"][T:].any()
    assert not grads["wte"][V:].any()


def test_recompute_settings_give_identical_gradients():
    """Recomputation reruns the same ops on the same inputs, so the results are bit-identical."""
    flat = init_params(TINY, seed=3)
    tokens, targets = batch(TINY, seed=4)
    results = []
    for recompute in (0, 1, 2):
        model = GPT(TINY, NumpyBackend(), B, T, flat, recompute=recompute)
        results.append((numpy_step(model, tokens, targets), model.grads))
    for loss, grads in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grads, results[0][1])


class Float64Backend(NumpyBackend):
    """The same ops on float64 buffers (they compute in their inputs' dtype): the schedule's algebra
    checked to float64 precision."""

    def zeros(self, shape, fp32=False, param=False):
        return np.zeros(shape, dtype=np.float64)

    def upload_params(self, host_fp32, n, out=None):
        out = np.zeros(n, dtype=np.float64) if out is None else out
        out[:host_fp32.size] = host_fp32
        out[host_fp32.size:] = 0
        return out


@pytest.mark.parametrize("backend, loss_rel, param_rel", [(NumpyBackend(), REL, 2e-3), (Float64Backend(), 1e-9, 1e-9)],
                         ids=["fp32", "float64"])
def test_adamw_training_matches_torch(backend, loss_rel, param_rel):
    """Ten steps of AdamW (decay only on the layout's decay tensors) with clipping to norm 1, on fresh
    batches: numpy's ops per tensor segment vs torch.optim.AdamW and clip_grad_norm_.

    In float64 every parameter tensor must agree to 1e-9 of its norm: the same algorithm. In fp32 the
    losses agree to 1e-4 (seen: ~1e-6), but the parameters only to ~4e-4 of their norm, so 2e-3 is
    asked: Adam's m / (sqrt(v) + eps) turns a rounding error in a gradient near eps into an O(lr) step.
    The key bias is the sure case: softmax ignores it, so its exact gradient is zero and fp32 computes
    ~1e-11 of rounding noise that Adam steps on. Such elements then shift the function slightly, which
    moves other small-gradient elements."""
    lr, betas, eps, wd, steps = 3e-3, (0.9, 0.95), 1e-8, 0.1, 10
    flat = init_params(TINY, seed=5)
    model = GPT(TINY, backend, B, T, flat)
    m, v = backend.zeros(model.params.shape), backend.zeros(model.params.shape)
    ref = TorchGPT.from_flat(TINY, flat).double()
    opt = ref.configure_optimizer(weight_decay=wd, lr=lr, betas=betas, eps=eps, fused=False)
    clipped = 0
    for step in range(1, steps + 1):
        tokens, targets = batch(TINY, seed=100 + step)
        loss = numpy_step(model, tokens, targets)
        norm = float(np.sqrt(backend.global_norm_squared(model.grads)[0]))
        grad_scale = min(1.0, 1.0 / (norm + 1e-6))  # clip_grad_norm_'s coefficient, to compare like with like
        clipped += grad_scale < 1.0
        scalars = backend.adamw_scalars(lr, step, grad_scale, step, *betas)
        for t in model.layout.tensors:
            seg = slice(t.offset, t.end)
            backend.adamw_update(model.params[seg], None, model.grads[seg], m[seg], v[seg], scalars, *betas, eps,
                                 wd if t.decay else 0.0)
        model.zero_grad()

        _, ref_loss = torch_step(ref, tokens, targets)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert abs(loss - ref_loss) <= loss_rel * ref_loss, (step, loss, ref_loss)
    assert clipped, "the clipping path was never taken"
    params, ref_params = model.layout.views(model.params), model.layout.views(ref.to_flat(np.float64))
    for name in model.layout.names:
        err = np.linalg.norm(params[name] - ref_params[name]) / np.linalg.norm(ref_params[name])
        assert err <= param_rel, (name, err)


def test_real_padded_vocab():
    """GPT-2's 50257 tokens padded to 50304 rows. The padded wte rows are made nonzero so their logits
    are too: the loss must ignore them and they must still get exactly zero gradient."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=T)
    V = cfg.vocab_size
    flat = init_params(cfg, seed=6)
    wte = param_layout(cfg).views(flat)["wte"]
    wte[V:] = np.random.default_rng(7).normal(0.0, 0.02, size=wte[V:].shape)
    tokens, targets = batch(cfg, seed=8)
    model = GPT(cfg, NumpyBackend(), B, T, flat)
    model.forward(model.ops.set_batch(tokens))
    assert model.logits()[..., V:].any()
    loss = numpy_step(model, tokens, targets)
    assert not model.acts["logits"][..., V:].any()  # dlogits: zero in the padded columns

    ref = TorchGPT.from_flat(cfg, flat).double()
    _, ref_loss = torch_step(ref, tokens, targets)
    assert abs(loss - ref_loss) <= REL * ref_loss
    grads, ref_grads = model.layout.views(model.grads), model.layout.views(ref.grads_to_flat(np.float64))
    assert not grads["wte"][V:].any()
    for name in model.layout.names:
        assert_close(grads[name], ref_grads[name], name)


@pytest.mark.parametrize("chunk_rows", [1, 5, B * T - 1])
def test_lm_head_in_chunks_matches_whole_logits(monkeypatch, chunk_rows):
    """The LM head runs chunk by chunk (logits, loss, dlogits and its backward per chunk); chunks that
    do not divide B*T give the logits, losses and every gradient of the one-chunk model."""
    from gpt2cu.models import gpt2
    flat = init_params(TINY, seed=3)
    tokens, targets = batch(TINY, seed=4)
    whole = GPT(TINY, NumpyBackend(), B, T, flat)
    monkeypatch.setattr(gpt2, "LM_HEAD_CHUNK_ROWS", chunk_rows)
    chunked = GPT(TINY, NumpyBackend(), B, T, flat)
    assert chunked.acts["logits"].shape[0] == chunk_rows < whole.acts["logits"].shape[0]
    for model in (whole, chunked):
        model.forward(model.ops.set_batch(tokens))
    np.testing.assert_allclose(chunked.logits(), whole.logits(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked.logits(1, T - 2), whole.logits()[1, T - 2], rtol=1e-6, atol=1e-6)
    losses = [numpy_step(model, tokens, targets) for model in (whole, chunked)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    np.testing.assert_allclose(chunked.grads, whole.grads, rtol=1e-5, atol=1e-7)

