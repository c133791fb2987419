"""The numpy ops (gpt2cu/backends/numpy_ops.py), one by one: every backward against float64 central finite
differences of its forward, forwards against independent straightforward implementations (explicit loops,
torch functions), the in-place contract ("+=" outputs accumulate onto what is there, other outputs are
fully overwritten: they start as NaN here), and the backend's memory API.

Tolerances. Finite differences run in float64 with h = 1e-6: truncation error ~h^2 = 1e-12 and cancellation
error ~1e-16/h = 1e-10 relative to the gradient's scale, so 1e-6 relative leaves four orders of margin while
a wrong or missing term is off by O(1). Float32 results are compared to float64 formulas at 1e-5 relative:
float32 rounding is 6e-8 per operation and these ops chain or sum at most a few hundred terms (~1e-6).
Errors are measured against the scale of the whole expected tensor (atol = rel * max|expected|), because
rounding in a sum grows with the magnitude of its terms, not with the (possibly tiny) result.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from gpt2cu.backends import numpy_llama_ops
from gpt2cu.backends import numpy_ops as ops
from gpt2cu.backends.base import Backend, PolicyLoss, ValueLoss
from gpt2cu.backends.numpy_ops import NumpyBackend
from numeric_checks import assert_close, nans, numeric_grad

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, C, H = 2, 5, 12, 3  # odd sizes: no accidental square or power-of-two shapes
FD_REL, FP32_REL = 1e-6, 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def gelu_reference(x):
    return torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()


# ---- encoder ------------------------------------------------------------------------------------
TOKENS = np.array([[1, 3, 1, 1, 0], [3, 5, 2, 1, 7]], dtype=np.int32)  # repeats: 1 four times, 3 twice
VOCAB = 9


def test_encoder_forward(rng):
    wte, wpe = rng.normal(size=(VOCAB, C)), rng.normal(size=(T, C))
    out = nans(B, T, C)
    ops.encoder_forward(out, TOKENS, wte, wpe)
    for b in range(B):
        for t in range(T):
            np.testing.assert_array_equal(out[b, t], wte[TOKENS[b, t]] + wpe[t])


def test_encoder_backward(rng):
    wte, wpe, dout = rng.normal(size=(VOCAB, C)), rng.normal(size=(T, C)), rng.normal(size=(B, T, C))
    out = np.empty((B, T, C))

    def loss():
        ops.encoder_forward(out, TOKENS, wte, wpe)
        return np.sum(dout * out)

    dwte0, dwpe0 = rng.normal(size=wte.shape), rng.normal(size=wpe.shape)
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    ops.encoder_backward(dwte, dwpe, dout, TOKENS)
    assert_close(dwte - dwte0, numeric_grad(loss, wte), FD_REL)
    assert_close(dwpe - dwpe0, numeric_grad(loss, wpe), FD_REL)


# ---- layernorm ----------------------------------------------------------------------------------
def layernorm_reference(x, w, b):
    out = torch.nn.functional.layer_norm(torch.from_numpy(x), (C,), torch.from_numpy(w), torch.from_numpy(b),
                                         eps=1e-5).numpy()
    return out, x.mean(-1), 1.0 / np.sqrt(x.var(-1) + 1e-5)


def test_layernorm_forward(rng):
    x, w, b = rng.normal(1.0, 3.0, size=(B, T, C)), rng.normal(size=C), rng.normal(size=C)
    out, mean, rstd = nans(B, T, C), nans(B, T), nans(B, T)
    ops.layernorm_forward(out, mean, rstd, x, w, b)
    for got, want in zip((out, mean, rstd), layernorm_reference(x, w, b)):
        assert_close(got, want, 1e-12)


def test_layernorm_backward(rng):
    x, w, b = rng.normal(size=(B, T, C)), rng.normal(size=C), rng.normal(size=C)
    dout = rng.normal(size=(B, T, C))
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))

    def loss():
        ops.layernorm_forward(out, mean, rstd, x, w, b)
        return np.sum(dout * out)

    loss()  # mean and rstd of the unperturbed input, as the backward receives them
    starts = [rng.normal(size=a.shape) for a in (x, w, b)]
    dx, dw, db = (s.copy() for s in starts)
    ops.layernorm_backward(dx, dw, db, dout, x, w, mean.copy(), rstd.copy())
    for grad, start, wrt in zip((dx, dw, db), starts, (x, w, b)):
        assert_close(grad - start, numeric_grad(loss, wrt), FD_REL)


# ---- matmul -------------------------------------------------------------------------------------
OC = 7


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_gelu", [False, True])
def test_matmul_forward(rng, with_bias, with_gelu):
    x, w, bias = rng.normal(size=(B, T, C)), rng.normal(size=(OC, C)), rng.normal(size=OC)
    pre = np.einsum("btc,oc->bto", x, w)
    if with_bias:
        pre = pre + bias
    out, gelu_pre = nans(B, T, OC), nans(B, T, OC)
    ops.matmul_forward(out, x, w, bias if with_bias else None, gelu_pre if with_gelu else None)
    if with_gelu:
        assert_close(gelu_pre, pre, 1e-12)
        assert_close(out, gelu_reference(pre), 1e-12)
    else:
        assert_close(out, pre, 1e-12)
        assert np.isnan(gelu_pre).all()


@pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in_place"])
def test_matmul_forward_residual(rng, in_place):
    """out = x @ w^T + bias + residual: a block's residual add; residual may be out itself. With gelu_pre too it
    is refused."""
    x, w, bias = rng.normal(size=(B, T, C)), rng.normal(size=(OC, C)), rng.normal(size=OC)
    residual = rng.normal(size=(B, T, OC))
    want = np.einsum("btc,oc->bto", x, w) + bias + residual
    out = residual if in_place else nans(B, T, OC)
    ops.matmul_forward(out, x, w, bias, residual=residual)
    assert_close(out, want, 1e-12)
    with pytest.raises(ValueError, match="residual and gelu_pre"):
        ops.matmul_forward(nans(B, T, OC), x, w, bias, gelu_pre=nans(B, T, OC), residual=residual)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_gelu", [False, True])
def test_matmul_backward(rng, with_bias, with_gelu):
    """With the GeLU, the input is gelu(x_pre) and dinp is the gradient of x_pre (the model's MLP)."""
    x, w, bias = rng.normal(size=(B, T, C)), rng.normal(size=(OC, C)), rng.normal(size=OC)
    dout = rng.normal(size=(B, T, OC))
    out = np.empty((B, T, OC))

    def inp():
        return gelu_reference(x) if with_gelu else x

    def loss():
        ops.matmul_forward(out, inp(), w, bias if with_bias else None)
        return np.sum(dout * out)

    dx = nans(B, T, C)
    dw0, db0 = rng.normal(size=w.shape), rng.normal(size=bias.shape)
    dw, db = dw0.copy(), db0.copy()
    ops.matmul_backward(dx, dw, db if with_bias else None, dout, inp(), w, x if with_gelu else None)
    assert_close(dx, numeric_grad(loss, x), FD_REL)
    assert_close(dw - dw0, numeric_grad(loss, w), FD_REL)
    if with_bias:
        assert_close(db - db0, numeric_grad(loss, bias), FD_REL)
    else:
        np.testing.assert_array_equal(db, db0)


def test_matmul_backward_dgelu_dbias(rng):
    """dinp_gelu_dbias is the gradient of a bias inside the GeLU's input (fc's bias in the model's MLP: pre = x +
    b), added onto what it held; with it the other outputs are unchanged."""
    x, b, w = rng.normal(size=(B, T, C)), rng.normal(size=C), rng.normal(size=(OC, C))
    dout = rng.normal(size=(B, T, OC))
    out = np.empty((B, T, OC))

    def loss():
        ops.matmul_forward(out, gelu_reference(x + b), w)
        return np.sum(dout * out)

    dx, dx_plain = nans(B, T, C), nans(B, T, C)
    dw, dw_plain = np.zeros_like(w), np.zeros_like(w)
    db0 = rng.normal(size=C)
    db = db0.copy()
    ops.matmul_backward(dx, dw, None, dout, gelu_reference(x + b), w, x + b, dinp_gelu_dbias=db)
    ops.matmul_backward(dx_plain, dw_plain, None, dout, gelu_reference(x + b), w, x + b)
    assert_close(db - db0, numeric_grad(loss, b), FD_REL)
    np.testing.assert_array_equal(db, db0 + dx.reshape(-1, C).sum(axis=0))
    np.testing.assert_array_equal(dx, dx_plain)
    np.testing.assert_array_equal(dw, dw_plain)


# ---- GeLU ---------------------------------------------------------------------------------------
def test_gelu_forward(rng):
    x = rng.normal(0.0, 3.0, size=(B, T, C))
    out = nans(B, T, C)
    ops.gelu_forward(out, x)
    assert_close(out, gelu_reference(x), 1e-12)


def test_gelu_backward_and_aliasing(rng):
    x, dout = rng.normal(0.0, 3.0, size=(B, T, C)), rng.normal(size=(B, T, C))
    out = np.empty_like(x)

    def loss():
        ops.gelu_forward(out, x)
        return np.sum(dout * out)

    dx = nans(B, T, C)
    ops.gelu_backward(dx, dout, x)
    assert_close(dx, numeric_grad(loss, x), FD_REL)
    aliased = dout.copy()
    ops.gelu_backward(aliased, aliased, x)  # dinp is dout, as the CUDA kernel allows
    np.testing.assert_array_equal(aliased, dx)


# ---- attention ----------------------------------------------------------------------------------
def attention_reference(qkv, n_head):
    """One (batch, head, query) at a time, straight from the definition."""
    Bq, Tq, C3 = qkv.shape
    Cq = C3 // 3
    hs = Cq // n_head
    out, lse = np.zeros((Bq, Tq, Cq)), np.zeros((Bq, n_head, Tq))
    for b in range(Bq):
        for h in range(n_head):
            cols = slice(h * hs, (h + 1) * hs)
            q, k, v = (qkv[b, :, i * Cq:(i + 1) * Cq][:, cols] for i in range(3))
            for t in range(Tq):
                s = k[:t + 1] @ q[t] / np.sqrt(hs)
                m = s.max()
                e = np.exp(s - m)
                out[b, t, cols] = e @ v[:t + 1] / e.sum()
                lse[b, h, t] = m + np.log(e.sum())
    return out, lse


@pytest.mark.parametrize("seq", [1, T, 7])
def test_attention_forward(rng, seq):
    qkv = rng.normal(size=(B, seq, 3 * C))
    out, lse = nans(B, seq, C), nans(B, H, seq)
    ops.attention_forward(out, lse, qkv, H)
    ref_out, ref_lse = attention_reference(qkv, H)
    assert_close(out, ref_out, 1e-12)
    assert_close(lse, ref_lse, 1e-12)


def test_attention_forward_is_stable(rng):
    """Adding a vector kb to every key shifts each query's scores by a constant: the output stays, lse
    shifts by q.kb/sqrt(hs). With |kb| ~ 1e4 the scores reach ~1e4, far past exp's float64 range."""
    seq, hs = 7, C // H
    qkv = rng.normal(size=(B, seq, 3 * C))
    out, lse = np.empty((B, seq, C)), np.empty((B, H, seq))
    ops.attention_forward(out, lse, qkv, H)
    kb = rng.normal(0.0, 1e4, size=C)
    shifted = qkv.copy()
    shifted[..., C:2 * C] += kb
    out2, lse2 = nans(B, seq, C), nans(B, H, seq)
    ops.attention_forward(out2, lse2, shifted, H)
    q = qkv[..., :C].reshape(B, seq, H, hs)
    shift = np.einsum("bthd,hd->bht", q, kb.reshape(H, hs)) / np.sqrt(hs)
    assert_close(out2, out, 1e-9)  # the shift costs ~1e4 * 1e-16 of absolute precision in the scores
    assert_close(lse2, lse + shift, 1e-9)


def test_attention_backward(rng):
    seq = 7
    qkv, dout = rng.normal(size=(B, seq, 3 * C)), rng.normal(size=(B, seq, C))
    out, lse = np.empty((B, seq, C)), np.empty((B, H, seq))

    def loss():
        ops.attention_forward(out, lse, qkv, H)
        return np.sum(dout * out)

    loss()
    dqkv = nans(B, seq, 3 * C)
    ops.attention_backward(dqkv, dout, qkv, out.copy(), lse.copy(), H)
    assert_close(dqkv, numeric_grad(loss, qkv), FD_REL)


@pytest.mark.parametrize("n_kv_head", [H, 1], ids=["mha", "gqa"])
def test_attention_backward_qkv_bias(rng, n_kv_head):
    """dqkv_bias += the column sums of dqkv, exactly as matmul_backward's dbias takes them from the same dqkv (the
    GPT-2 backward moved the qkv bias gradient from the one to the other); dqkv itself unchanged by asking."""
    seq, hs = 7, C // H
    width = (H + 2 * n_kv_head) * hs
    qkv, dout = rng.normal(size=(B, seq, width)), rng.normal(size=(B, seq, C))
    out, lse = np.empty((B, seq, C)), np.empty((B, H, seq))
    ops.attention_forward_gqa(out, lse, qkv, H, n_kv_head)
    start = rng.normal(size=width)
    plain, dqkv, dbias = nans(B, seq, width), nans(B, seq, width), start.copy()
    ops.attention_backward_gqa(plain, dout, qkv, out, lse, H, n_kv_head)
    ops.attention_backward_gqa(dqkv, dout, qkv, out, lse, H, n_kv_head, dqkv_bias=dbias)
    np.testing.assert_array_equal(dqkv, plain)
    via_matmul = start.copy()
    ops.matmul_backward(nans(B, seq, C), np.zeros((width, C)), via_matmul, dqkv, rng.normal(size=(B, seq, C)),
                        rng.normal(size=(width, C)))
    np.testing.assert_array_equal(dbias, via_matmul)
    if n_kv_head == H:  # GPT-2's op: the same sums
        gpt2, dbias2 = nans(B, seq, width), start.copy()
        ops.attention_backward(gpt2, dout, qkv, out, lse, H, dqkv_bias=dbias2)
        np.testing.assert_array_equal(dbias2, dbias)


def test_head_dot_from_the_projection_backward(rng):
    """matmul_backward's dinp_head_dot: D[b, h, t] = dinp[b, t, head h] . O[b, t, head h] (explicit loops); the
    attention backward given it equals the one computing D itself."""
    seq = 7
    dout, w, o = rng.normal(size=(B, seq, C)), rng.normal(size=(C, C)), rng.normal(size=(B, seq, C))
    dinp, dot = nans(B, seq, C), nans(B, H, seq)
    ops.matmul_backward(dinp, np.zeros((C, C)), None, dout, o, w, dinp_head_dot=dot, head_dot_with=o)
    hs = C // H
    expected = [[[np.dot(dinp[b, t, h * hs:(h + 1) * hs], o[b, t, h * hs:(h + 1) * hs]) for t in range(seq)]
                 for h in range(H)] for b in range(B)]
    assert_close(dot, np.array(expected), FP32_REL)
    qkv = rng.normal(size=(B, seq, 3 * C))
    out, lse = np.empty((B, seq, C)), np.empty((B, H, seq))
    ops.attention_forward(out, lse, qkv, H)
    own, given = nans(B, seq, 3 * C), nans(B, seq, 3 * C)
    ops.attention_backward(own, dinp, qkv, out, lse, H)
    ops.attention_backward(given, dinp, qkv, out, lse, H, dout_head_dot=ops.head_dot(dinp, out, H))
    np.testing.assert_array_equal(given, own)


# ---- classifier ---------------------------------------------------------------------------------
V, VP = 11, 16


def classifier_inputs(rng):
    logits = rng.normal(0.0, 2.0, size=(B, T, VP))
    logits[..., V:] = rng.normal(0.0, 1e4, size=(B, T, VP - V))  # padded columns: must be ignored
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets[0, 1] = targets[1, 4] = -1  # masked positions
    return logits, targets


def test_fused_classifier_losses_and_masking(rng):
    logits, targets = classifier_inputs(rng)
    logp = torch.log_softmax(torch.from_numpy(logits[..., :V]), dim=-1).numpy()
    valid = targets >= 0
    expected = np.where(valid, -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0], 0.0)
    losses, dlogits = nans(B, T), logits.copy()
    ops.fused_classifier(losses, dlogits, targets, 0.25, V)
    assert_close(losses, expected, 1e-12)
    assert (losses[~valid] == 0).all()
    assert (dlogits[~valid] == 0).all()
    assert (dlogits[..., V:] == 0).all()
    expected_d = 0.25 * (np.exp(logp) - np.eye(V)[np.maximum(targets, 0)])
    assert_close(dlogits[valid][:, :V], expected_d[valid], 1e-12)


def test_fused_classifier_gradient(rng):
    """dlogits = dloss * d(sum of losses)/d(logits), masked rows and padded columns included (zero)."""
    logits, targets = classifier_inputs(rng)
    losses, dloss = np.empty((B, T)), 0.37

    def loss():
        ops.fused_classifier(losses, logits, targets, 0.0, V)  # dloss 0: the logits stay as they are
        return dloss * losses.sum()

    dlogits = logits.copy()
    ops.fused_classifier(np.empty((B, T)), dlogits, targets, dloss, V)
    assert_close(dlogits, numeric_grad(loss, logits), FD_REL)


def test_fused_classifier_policy_loss_and_entropy(rng):
    """With policy terms each row's dlogits is the gradient of the policy-gradient loss (numpy_ops.
    policy_weights), written out here and differentiated numerically: ratios start away from the clip
    boundaries on both sides (clipped and unclipped rows, advantages of either sign), half the rows with a
    KL term. Entropy is -sum p log p of each row's softmax over the real columns, 0 for masked rows."""
    logits, targets = classifier_inputs(rng)
    losses, entropy, clip = np.empty((B, T)), nans(B, T), 0.2
    ops.fused_classifier(losses, logits, targets, 0.0, V)
    logp0, ratio0 = -losses.copy(), rng.choice([0.5, 0.9, 1.1, 1.6], size=(B, T))
    adv = rng.normal(0.0, 1.0, (B, T))
    ratio0.flat[2:5], adv.flat[2:5] = (1.6, 0.5, 1.1), (0.7, -0.4, 0.9)  # clipped above, below, not clipped
    terms = np.stack([logp0 - np.log(ratio0), adv, logp0 + rng.normal(0.0, 0.5, (B, T)),
                      np.where(rng.random((B, T)) < 0.5, 0.3, 0.0)], axis=-1)
    old, adv, ref, kl = np.moveaxis(terms, -1, 0)

    def loss():
        ops.fused_classifier(losses, logits, targets, 0.0, V)
        r, q = np.exp(-losses - old), np.exp(ref + losses)
        per_row = -np.minimum(r * adv, np.clip(r, 1 - clip, 1 + clip) * adv) + kl * (q - np.log(q) - 1)
        return 0.5 * per_row[targets >= 0].sum()

    dlogits = logits.copy()
    ops.fused_classifier(np.empty((B, T)), dlogits, targets, 0.5, V, policy=PolicyLoss(terms, clip), entropy=entropy)
    assert_close(dlogits, numeric_grad(loss, logits), FD_REL)
    clipped = ops.policy_weights(logp0, terms, clip)[1][targets >= 0]
    assert clipped.any() and not clipped.all()
    p = torch.softmax(torch.from_numpy(logits[..., :V]), dim=-1).numpy()
    expected = np.where(targets >= 0, -(p * np.log(p)).sum(axis=-1), 0.0)
    assert_close(entropy, expected, 1e-10)


def test_scalar_head_value_loss_and_backward(rng):
    """scalar_head_forward with a value loss leaves in values the gradient of scale * sum(weighted losses),
    and scalar_head_backward carries any dvalues into inp and head: both against central differences of
    0.5 max((v - R)^2, (v_clipped - R)^2) written out here. The old values sit 0.05 or 0.5 from the values
    (inside and outside the clip range 0.2); some rows weigh 0."""
    b, t, C, clip, scale = 2, 5, 12, 0.2, 0.7
    inp, head = rng.normal(size=(b, t, C)), rng.normal(0.0, 0.3, C + 1)
    values = np.empty((b, t))
    ops.scalar_head_forward(values, None, inp, head)
    assert_close(values, inp @ head[:C] + head[C], 1e-12)
    weight = np.where(rng.random((b, t)) < 0.3, 0.0, rng.random((b, t)))
    terms = np.stack([values + rng.choice([-0.5, -0.05, 0.05, 0.5], size=(b, t)), rng.normal(size=(b, t)), weight],
                     axis=-1)

    def loss():
        v = inp @ head[:C] + head[C]
        v_clipped = terms[..., 0] + np.clip(v - terms[..., 0], -clip, clip)
        return scale * (weight * 0.5 * np.maximum((v - terms[..., 1]) ** 2, (v_clipped - terms[..., 1]) ** 2)).sum()

    dvalues, losses = nans(b, t), nans(b, t)
    ops.scalar_head_forward(dvalues, losses, inp, head, ValueLoss(terms, clip, scale))
    assert_close(scale * losses.sum(), loss(), 1e-12)
    dinp, dhead = np.ones((b, t, C)), np.ones(C + 1)  # "+=" outputs
    ops.scalar_head_backward(dinp, dhead, dvalues, inp, head)
    assert_close(dinp - 1, numeric_grad(loss, inp), FD_REL)
    assert_close(dhead - 1, numeric_grad(loss, head), FD_REL)


def test_fused_classifier_eval_leaves_logits(rng):
    logits, targets = classifier_inputs(rng)
    kept = logits.copy()
    losses = nans(B, T)
    ops.fused_classifier(losses, kept, targets, 0.0, V)
    np.testing.assert_array_equal(kept, logits)
    assert np.isfinite(losses).all()


def test_fused_classifier_is_stable(rng):
    """Softmax is shift invariant; a shift of 1e4 overflows a naive exp."""
    logits, targets = classifier_inputs(rng)
    losses, shifted_losses = np.empty((B, T)), nans(B, T)
    ops.fused_classifier(losses, logits.copy(), targets, 1.0, V)
    shifted = logits + 1e4
    ops.fused_classifier(shifted_losses, shifted, targets, 1.0, V)
    assert_close(shifted_losses, losses, 1e-9)  # the shift costs ~1e4 * 1e-16 absolute


# ---- optimizer ----------------------------------------------------------------------------------
def test_global_norm_squared(rng):
    grads = rng.normal(size=(1 << 20) + 12345).astype(np.float32)  # more than one accumulation chunk
    got = ops.global_norm_squared(grads)
    assert got.shape == (1,) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], np.sum(grads.astype(np.float64) ** 2), rtol=1e-7)


@pytest.mark.parametrize("with_master", [False, True])
def test_adamw_update_matches_formula(rng, with_master):
    """Three fp32 steps against the float64 formula; grads ~ N(0, 1) keep every update far from the
    eps-dominated regime, where fp32 and float64 would legitimately diverge."""
    n, lr, b1, b2, eps, wd, grad_scale = 301, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
    backend = NumpyBackend()
    p_ref = rng.normal(size=n)
    m_ref, v_ref = np.zeros(n), np.zeros(n)
    params = p_ref.astype(np.float32)
    master = params.copy() if with_master else None
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step in range(1, 4):
        g_ref = rng.normal(size=n)
        ops.adamw_update(params, master, g_ref.astype(np.float32), m, v,
                         backend.adamw_scalars(lr, step, grad_scale, 7, b1, b2), b1, b2, eps, wd)
        g = g_ref * grad_scale
        m_ref = b1 * m_ref + (1 - b1) * g
        v_ref = b2 * v_ref + (1 - b2) * g * g
        p_ref = p_ref - lr * ((m_ref / (1 - b1 ** step)) / (np.sqrt(v_ref / (1 - b2 ** step)) + eps) + wd * p_ref)
        for got, want in zip((params, m, v), (p_ref, m_ref, v_ref)):
            assert_close(got, want, FP32_REL)
        if with_master:
            np.testing.assert_array_equal(params, master)


def test_adamw_scalars_clipped(rng):
    """The scalars from the norm's square: optim.clip_scale's grad_scale of the float32 norm; skip set (and the
    update then a no-op) exactly when the norm or the loss is not finite."""
    be = NumpyBackend()
    for norm_squared, loss, skip in [(0.25, [2.0], 0), (1.0, [2.0], 0), (rng.uniform(1, 100), None, 0),
                                     (np.inf, [2.0], 1), (np.nan, None, 1), (4.0, [np.nan], 1), (4.0, [np.inf], 1)]:
        norm_squared = np.array([norm_squared], np.float32)
        got = be.adamw_scalars_clipped(1e-3, 3, 5, 0.9, 0.95, norm_squared, loss and np.array(loss), 1.0)
        norm = float(np.sqrt(norm_squared[0]))
        want = be.adamw_scalars(1e-3, 3, 1.0 / norm if norm > 1.0 else 1.0, 5, 0.9, 0.95)
        want[5] = skip
        np.testing.assert_array_equal(got, want)
        params, m, v = rng.normal(size=7).astype(np.float32), np.ones(7, np.float32), np.ones(7, np.float32)
        before = [a.copy() for a in (params, m, v)]
        ops.adamw_update(params, None, rng.normal(size=7).astype(np.float32), m, v, got, 0.9, 0.95, 1e-8, 0.1)
        changed = [not np.array_equal(a, b) for a, b in zip((params, m, v), before)]
        assert changed == [not skip] * 3


# ---- the backend object -------------------------------------------------------------------------
def test_backend_memory_api():
    be = NumpyBackend()
    assert be.name == "numpy"
    for flags in ({}, {"fp32": True}, {"param": True}):
        z = be.zeros((3, 4), **flags)
        assert z.dtype == np.float32 and z.shape == (3, 4) and not z.any()
    host = np.arange(5, dtype=np.float32)
    up = be.upload_params(host, 8)
    np.testing.assert_array_equal(up, [0, 1, 2, 3, 4, 0, 0, 0])
    host[0] = 9  # a copy, not a view of the host buffer
    assert up[0] == 0
    for copy in (be.to_numpy(up), be.from_numpy(up)):
        copy[1] = 7
        assert up[1] == 1
    tokens, targets = np.zeros((2, 3), np.int32), np.ones((2, 3), np.int32)
    batch = be.set_batch(tokens, targets)
    assert batch.tokens is tokens and batch.targets is targets
    np.testing.assert_allclose(be.adamw_scalars(1e-3, 2, 0.5, 42, 0.9, 0.95),
                               [1e-3, 0.5, 1 - 0.9 ** 2, 1 - 0.95 ** 2, 42, 0])
    be.synchronize()


def test_backend_exposes_every_contract_op():
    """The op names of docs/architecture.md's table are the Backend interface's ops; the numpy backend
    runs this module's functions (or numpy_llama_ops') for them (the batch-taking embedding backwards
    through their tokens)."""
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        table = f.read().split("## The ops contract")[1].split("\n## ")[0]
    names = set(re.findall(r"`(\w+)\(", table))
    assert len(names) >= 14
    be = NumpyBackend()
    assert names | {"zero_"} <= Backend.__abstractmethods__
    for name in names | {"zero_"}:
        implementation = getattr(ops, name, None) or getattr(numpy_llama_ops, name)
        assert getattr(be, name) is implementation or name in ("encoder_backward", "embedding_backward"), name
    z = np.ones(3)
    be.zero_(z)
    assert not z.any()
