"""The LLaMA family's numpy ops (gpt2cu/backends/numpy_llama_ops.py): every backward against float64 central
finite differences of its forward; forwards against transformers' Llama modules and torch (skipped, with
the reason, where those are not installed); the in-place contract ("+=" outputs accumulate onto random
starting values, overwritten outputs start as NaN); aliasing where an op allows it; and, with as many
key/value heads as query heads, the GQA attention against GPT-2's attention to the bit.

Inputs are drawn fresh each run; the seed is printed (pytest shows it with a failure) and
GPT2CU_TEST_SEED=<seed> replays it. Sizes are odd: no power-of-two or square shapes to hide a transposed or
misindexed axis. Tolerances as test_numpy_ops.py argues them: FD_REL 1e-6 for finite differences in float64,
FP32_REL 1e-5 for float32 results against float32 or float64 references (rounding of ~6e-8 per operation
through at most a few hundred chained or summed terms), 1e-12 where both sides compute the same float64
formula in another order.
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from gpt2cu.backends import numpy_ops
from gpt2cu.backends import numpy_llama_ops as ops
from numeric_checks import assert_close, nans, numeric_grad

B, T = 2, 7
NH, NKV, HS = 6, 2, 4  # three query heads per key/value head
FD_REL, FP32_REL, EXACT_REL = 1e-6, 1e-5, 1e-12
EPS = 1e-5


@pytest.fixture
def rng(request):
    env = os.environ.get("GPT2CU_TEST_SEED")
    seed = int(env) if env else np.random.SeedSequence().entropy
    print(f"{request.node.name}: seed {seed} (GPT2CU_TEST_SEED={seed} replays it)")
    return np.random.default_rng(seed)


def needs(module_name):
    """The module, or a skip that names what is missing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        pytest.skip(f"needs {module_name} (a test-only dependency): {err}")


@pytest.fixture
def torch():
    module = needs("torch")
    module.set_num_threads(1)
    return module


@pytest.fixture
def llama(torch):
    """transformers' Llama modelling module (LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb)."""
    return needs("transformers.models.llama.modeling_llama")


def qkv_width(n_head, n_kv_head, head_dim):
    return (n_head + 2 * n_kv_head) * head_dim


# ---- RMSNorm ------------------------------------------------------------------------------------
C = 13


def rmsnorm_reference(x, w):
    rstd = 1.0 / np.sqrt((x ** 2).mean(-1) + EPS)
    return x * rstd[..., None] * w, rstd


def test_rmsnorm_forward(rng):
    x, w = rng.normal(0.5, 2.0, size=(B, T, C)), rng.normal(1.0, 0.3, size=C)
    out, rstd = nans(B, T, C), nans(B, T)
    ops.rmsnorm_forward(out, rstd, x, w, EPS)
    ref_out, ref_rstd = rmsnorm_reference(x, w)
    assert_close(out, ref_out, EXACT_REL)
    assert_close(rstd, ref_rstd, EXACT_REL)


def test_rmsnorm_forward_matches_transformers(rng, torch, llama):
    """In float32: LlamaRMSNorm normalizes in float32 whatever its input."""
    x, w = rng.normal(0.5, 2.0, size=(B, T, C)).astype(np.float32), rng.normal(1.0, 0.3, size=C).astype(np.float32)
    norm = llama.LlamaRMSNorm(C, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        expected = norm(torch.from_numpy(x)).numpy()
    out, rstd = np.full((B, T, C), np.nan, np.float32), np.full((B, T), np.nan, np.float32)
    ops.rmsnorm_forward(out, rstd, x, w, EPS)
    assert out.dtype == np.float32
    assert_close(out, expected, FP32_REL)


def test_rmsnorm_backward(rng):
    x, w, dout = rng.normal(0.5, 2.0, size=(B, T, C)), rng.normal(size=C), rng.normal(size=(B, T, C))
    out, rstd = np.empty((B, T, C)), np.empty((B, T))

    def loss():
        ops.rmsnorm_forward(out, rstd, x, w, EPS)
        return np.sum(dout * out)

    loss()  # the rstd of the unperturbed input, as the backward receives it
    starts = [rng.normal(size=a.shape) for a in (x, w)]
    dx, dw = (s.copy() for s in starts)
    ops.rmsnorm_backward(dx, dw, dout, x, w, rstd.copy())
    for grad, start, wrt in zip((dx, dw), starts, (x, w)):
        assert_close(grad - start, numeric_grad(loss, wrt), FD_REL)


# ---- RoPE ---------------------------------------------------------------------------------------
ROPE_HS, ROPE_THETA = 10, 500000.0


def test_rope_tables_reject_odd_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        ops.rope_tables(7, T, ROPE_THETA)


def test_rope_scaling_bands():
    """Llama 3.1's scaling keeps the frequencies of wavelength < 8192/4 positions, divides those of
    wavelength > 8192 by 8, and interpolates between, so the scaled frequencies never increase."""
    head_dim = 128
    plain = ops._inverse_frequencies(head_dim, ROPE_THETA, None)
    scaled = ops._inverse_frequencies(head_dim, ROPE_THETA, ops.LLAMA31_SCALING)
    wavelen = 2 * np.pi / plain.astype(np.float64)
    short, long = wavelen < 8192 / 4, wavelen > 8192
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_array_equal(scaled[long], plain[long] / np.float32(8))
    assert np.all(np.diff(scaled) <= 0)
    cos, sin = ops.rope_tables(head_dim, 3, ROPE_THETA, ops.LLAMA31_SCALING)
    assert cos.shape == sin.shape == (3, head_dim // 2) and cos.dtype == np.float32
    np.testing.assert_array_equal(cos[0], 1.0)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "llama3.1"])
def test_rope_tables_match_transformers(llama, torch, head_dim, scaled):
    """Against LlamaRotaryEmbedding (whose cos/sin repeat our (T, HS/2) tables in both halves) up to T = 3001.
    The inverse frequencies are the same float32 numbers (the angles, products of those with positions,
    are then the same too), and cos/sin differ only by numpy's and torch's float32 cos/sin (1 ulp, 6e-8)."""
    from transformers import LlamaConfig
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    if scaled:
        s = ops.LLAMA31_SCALING
        rope = {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope,
                         max_position_embeddings=131072)
    embedding = llama.LlamaRotaryEmbedding(config)
    seq = 3001
    expected_cos, expected_sin = (a[0].numpy() for a in embedding(torch.zeros(1), torch.arange(seq)[None]))
    scaling = ops.LLAMA31_SCALING if scaled else None
    np.testing.assert_array_equal(ops._inverse_frequencies(head_dim, ROPE_THETA, scaling), embedding.inv_freq.numpy())
    cos, sin = ops.rope_tables(head_dim, seq, ROPE_THETA, scaling)
    for ours, theirs in ((cos, expected_cos), (sin, expected_sin)):
        np.testing.assert_array_equal(theirs[:, :head_dim // 2], theirs[:, head_dim // 2:])
        np.testing.assert_allclose(ours, theirs[:, :head_dim // 2], rtol=0, atol=2e-7)


def rope_inputs(rng, dtype=np.float64):
    width = qkv_width(NH, NKV, ROPE_HS)
    qkv = rng.normal(size=(B, T, width)).astype(dtype)
    cos, sin = ops.rope_tables(ROPE_HS, T, 10000.0)  # theta 10^4: large angles at T = 7 with HS = 10
    return qkv, cos, sin


def heads_of(qkv, head_dim):
    """(B, T, (NH + 2 NKV) HS) -> q (B, NH, T, HS), k and v (B, NKV, T, HS)."""
    q, k, v = np.split(qkv, [NH * head_dim, (NH + NKV) * head_dim], axis=-1)
    return tuple(x.reshape(B, T, -1, head_dim).transpose(0, 2, 1, 3) for x in (q, k, v))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rope_forward_matches_transformers(rng, torch, llama, dtype):
    """apply_rotary_pos_emb on the q and k heads with our tables duplicated into its (T, HS) layout: the same
    rotation, pair for pair; v is copied. float64 checks the convention exactly, float32 the op's dtype."""
    qkv, cos, sin = rope_inputs(rng, dtype)
    out = np.full_like(qkv, np.nan)
    ops.rope_forward(out, qkv, cos, sin, NH, NKV)
    assert out.dtype == dtype
    q, k, v = heads_of(qkv, ROPE_HS)
    full = lambda t: torch.from_numpy(np.concatenate([t, t], axis=-1).astype(dtype))[None]  # noqa: E731
    q_rot, k_rot = llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), full(cos), full(sin))
    got_q, got_k, got_v = heads_of(out, ROPE_HS)
    rel = EXACT_REL if dtype == np.float64 else FP32_REL
    assert_close(got_q, q_rot.numpy(), rel)
    assert_close(got_k, k_rot.numpy(), rel)
    np.testing.assert_array_equal(got_v, v)


def test_rope_forward_in_place(rng):
    qkv, cos, sin = rope_inputs(rng)
    out = nans(*qkv.shape)
    ops.rope_forward(out, qkv, cos, sin, NH, NKV)
    rotated = qkv.copy()
    ops.rope_forward(rotated, rotated, cos, sin, NH, NKV)
    np.testing.assert_array_equal(rotated, out)


def test_rope_backward(rng):
    """Also in place (dinp is dout), as the model runs it on its dqkv buffer."""
    qkv, cos, sin = rope_inputs(rng)
    dout = rng.normal(size=qkv.shape)
    out = np.empty_like(qkv)

    def loss():
        ops.rope_forward(out, qkv, cos, sin, NH, NKV)
        return np.sum(dout * out)

    dqkv = nans(*qkv.shape)
    ops.rope_backward(dqkv, dout, cos, sin, NH, NKV)
    assert_close(dqkv, numeric_grad(loss, qkv), FD_REL)
    in_place = dout.copy()
    ops.rope_backward(in_place, in_place, cos, sin, NH, NKV)
    np.testing.assert_array_equal(in_place, dqkv)


# ---- SwiGLU -------------------------------------------------------------------------------------
HIDDEN = 11


def test_swiglu_forward(rng, torch):
    x = rng.normal(0.0, 3.0, size=(B, T, 2 * HIDDEN))
    out = nans(B, T, HIDDEN)
    ops.swiglu_forward(out, x)
    gate, up = torch.from_numpy(x).chunk(2, dim=-1)
    assert_close(out, (torch.nn.functional.silu(gate) * up).numpy(), EXACT_REL)


def test_swiglu_backward_and_aliasing(rng):
    x, dout = rng.normal(0.0, 3.0, size=(B, T, 2 * HIDDEN)), rng.normal(size=(B, T, HIDDEN))
    out = np.empty((B, T, HIDDEN))

    def loss():
        ops.swiglu_forward(out, x)
        return np.sum(dout * out)

    dx = nans(B, T, 2 * HIDDEN)
    ops.swiglu_backward(dx, dout, x)
    assert_close(dx, numeric_grad(loss, x), FD_REL)
    aliased = x.copy()
    ops.swiglu_backward(aliased, dout, aliased)  # dinp is inp, as the CUDA kernel allows
    np.testing.assert_array_equal(aliased, dx)


# ---- attention with grouped key/value heads -----------------------------------------------------
GQA_SHAPES = [(NH, NKV), (NH, 1), (5, 5)]  # groups of 3, one key/value head for all, plain multi-head


def attention_inputs(rng, n_head, n_kv_head, seq=T):
    qkv = rng.normal(size=(B, seq, qkv_width(n_head, n_kv_head, HS)))
    return qkv, nans(B, seq, n_head * HS), nans(B, n_head, seq)


def sdpa_reference(torch, qkv, n_head, n_kv_head):
    """torch's SDPA with each key/value head repeat_interleave'd over its group, as transformers' repeat_kv
    does; lse from the masked scores. Returns (out (B, T, NH HS), lse (B, NH, T), the torch qkv leaf)."""
    leaf = torch.from_numpy(qkv.copy()).requires_grad_(True)
    seq = qkv.shape[1]
    q, k, v = leaf.split([n_head * HS, n_kv_head * HS, n_kv_head * HS], dim=-1)
    q, k, v = (x.reshape(B, seq, -1, HS).transpose(1, 2) for x in (q, k, v))
    k, v = (x.repeat_interleave(n_head // n_kv_head, dim=1) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = (q @ k.transpose(-1, -2)) / HS ** 0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    lse = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return out.transpose(1, 2).reshape(B, seq, n_head * HS), lse, leaf


@pytest.mark.parametrize("n_head, n_kv_head", GQA_SHAPES)
def test_attention_forward_gqa_matches_sdpa(rng, torch, n_head, n_kv_head):
    qkv, out, lse = attention_inputs(rng, n_head, n_kv_head)
    numpy_ops.attention_forward_gqa(out, lse, qkv, n_head, n_kv_head)
    ref_out, ref_lse, _ = sdpa_reference(torch, qkv, n_head, n_kv_head)
    assert_close(out, ref_out.detach().numpy(), EXACT_REL)
    assert_close(lse, ref_lse.detach().numpy(), EXACT_REL)


@pytest.mark.parametrize("n_head, n_kv_head", GQA_SHAPES)
def test_attention_backward_gqa(rng, torch, n_head, n_kv_head):
    """Against finite differences, and against torch's autograd through SDPA, where dK and dV of a shared
    head come out summed over the group by repeat_interleave's backward."""
    qkv, out, lse = attention_inputs(rng, n_head, n_kv_head)
    dout = rng.normal(size=out.shape)

    def loss():
        numpy_ops.attention_forward_gqa(out, lse, qkv, n_head, n_kv_head)
        return np.sum(dout * out)

    loss()
    dqkv = nans(*qkv.shape)
    numpy_ops.attention_backward_gqa(dqkv, dout, qkv, out.copy(), lse.copy(), n_head, n_kv_head)
    assert_close(dqkv, numeric_grad(loss, qkv), FD_REL)
    ref_out, _, leaf = sdpa_reference(torch, qkv, n_head, n_kv_head)
    (ref_out * torch.from_numpy(dout)).sum().backward()
    assert_close(dqkv, leaf.grad.numpy(), EXACT_REL)


@pytest.mark.parametrize("seq", [1, T, 12])
def test_attention_gqa_with_all_heads_is_gpt2_attention(rng, seq):
    """n_kv_head == n_head: the packed layout is GPT-2's [q | k | v] and every output equals
    numpy_ops.attention_forward/backward's to the bit, in float32 as in use."""
    n_head = 3
    qkv = rng.normal(size=(B, seq, 3 * n_head * HS)).astype(np.float32)
    dout = rng.normal(size=(B, seq, n_head * HS)).astype(np.float32)
    results = {}
    for name, forward, backward, heads in (
            ("gqa", numpy_ops.attention_forward_gqa, numpy_ops.attention_backward_gqa, (n_head, n_head)),
            ("gpt2", numpy_ops.attention_forward, numpy_ops.attention_backward, (n_head,))):
        out, lse = np.empty((B, seq, n_head * HS), np.float32), np.empty((B, n_head, seq), np.float32)
        dqkv = np.empty_like(qkv)
        forward(out, lse, qkv, *heads)
        backward(dqkv, dout, qkv, out, lse, *heads)
        results[name] = (out, lse, dqkv)
    for gqa, gpt2 in zip(results["gqa"], results["gpt2"]):
        assert gqa.dtype == np.float32
        np.testing.assert_array_equal(gqa, gpt2)


def test_attention_gqa_rejects_kv_heads_not_dividing_heads(rng):
    qkv, out, lse = attention_inputs(rng, 6, 4)
    with pytest.raises(ValueError, match="does not divide"):
        numpy_ops.attention_forward_gqa(out, lse, qkv, 6, 4)
