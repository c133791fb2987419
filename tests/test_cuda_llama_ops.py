"""The LLaMA family's CUDA kernels (kernels/rmsnorm.cu, rope.cu, swiglu.cu, and grouped-query attention in
attention.cu / attention_sm90.cu, through gpt2cu._kernels) against their numpy ops
(gpt2cu/backends/numpy_llama_ops.py, numpy_ops' GQA attention), one kernel at a time. GPU only: the `gpu` marker
(conftest.py) skips every test here, with the reason, where the CUDA backend cannot run.

Method and bounds as test_cuda_ops.py (whose helpers this module uses): fresh inputs each run, with the
seed printed and quoted by failures (GPT2CU_TEST_SEED replays it); inputs rounded to bf16 first, so the
kernel and the float64 reference see the same numbers; overwritten outputs start as NaN, "+=" outputs
at random values; the error is ||out - ref|| / ||ref|| over an output.
  BF16_REL 1e-2  every bf16 output here is fp32 arithmetic rounded once to bf16 (<= 2^-8 relative per
                 element, ~1e-3 RMS): RMSNorm's out and its "+=" dinp and dweight (fp32 sums), RoPE's two-term
                 rotations, SwiGLU's products. A 5-10x margin, while a wrong term or pairing is O(0.1) off.
  FP32_REL 1e-4  RMSNorm's fp32 rstd of bf16 inputs: a sum of at most 2048 squares in fp32 and an rsqrtf;
                 attention's lse (fp32 sums of exp2 of fp32 scores).
  CHAIN_REL 2e-2 attention's outputs, computed through bf16 P and dS (two roundings, compounded through the
                 sums; dK and dV also sum a group's query heads in fp32 before their one rounding).
Exact results are asked for to the bit: the residual sum (two bf16 numbers added and rounded once), the
v heads RoPE copies, a second run of the deterministic RMSNorm backward and of both attention directions.
Sizes divide no block size: N = 111 rows (and 4004), widths 200 and 2048, 8 query and 2 key/value heads;
attention over T = 77, 201, 333 (its kernels tile by 64 and 128).
"""
from __future__ import annotations

import numpy as np
import pytest

from gpt2cu.backends import numpy_llama_ops as ref_ops
from gpt2cu.backends import numpy_ops
from test_cuda_ops import (B, BF16_REL, CHAIN_REL, FP32_REL, T, assert_repeatable, bits_of, case, cp,  # noqa: F401
                           cuda, decode, poisoned, raw, to_host)

pytestmark = pytest.mark.gpu

EPS = 1e-5


def launch(cuda, kernel, *args):
    """gpt2cu._kernels.<kernel>(*args, stream), device arrays passed as their addresses."""
    getattr(cuda.k, kernel)(*(a.data.ptr if isinstance(a, cp.ndarray) else a for a in args), cuda.stream.ptr)


# ---- RMSNorm ------------------------------------------------------------------------------------------
def rmsnorm_reference(x, weight):
    ref = {"out": np.empty(x.shape), "rstd": np.empty(x.shape[:-1])}
    ref_ops.rmsnorm_forward(ref["out"], ref["rstd"], x, weight, EPS)
    return ref


@pytest.mark.parametrize("C", [64, 200, 768, 2048])
def test_rmsnorm_forward(cuda, case, C):
    """Inputs of mean 0.5, as the residual stream."""
    x, x_d = case.bf16((B, T, C), mean=0.5)
    weight, weight_d = case.bf16((C,), mean=1.0, std=0.1)
    out, rstd = poisoned((B, T, C)), poisoned((B, T), fp32=True)
    launch(cuda, "rmsnorm_forward", out, rstd, x_d, weight_d, EPS, B * T, C)
    ref = rmsnorm_reference(x, weight)
    case.check("out", to_host(out), ref["out"], BF16_REL)
    case.check("rstd", to_host(rstd), ref["rstd"], FP32_REL)


@pytest.mark.parametrize("C", [100, 2056])
def test_rmsnorm_rejects_unsupported_widths(cuda, C):
    act, stat, vec = cp.zeros((B, T, C), np.uint16), cp.zeros((B, T), np.float32), cp.zeros(C, np.uint16)
    with pytest.raises(RuntimeError, match="rmsnorm_forward: C must be"):
        launch(cuda, "rmsnorm_forward", act, stat, act, vec, EPS, B * T, C)


@pytest.mark.parametrize("b, t, C", [(B, T, 64), (B, T, 200), (B, T, 768), (4, 1001, 768), (B, T, 2048)])
def test_rmsnorm_backward(cuda, case, b, t, C):
    """dinp and dweight accumulate; rstd comes in as fp32, as the forward saved it. 4004 rows span many
    blocks of the dweight reduction; two runs agree to the bit."""
    dout, dout_d = case.bf16((b, t, C))
    x, x_d = case.bf16((b, t, C), mean=0.5)
    weight, weight_d = case.bf16((C,), mean=1.0, std=0.1)
    rstd = rmsnorm_reference(x, weight)["rstd"].astype(np.float32)  # the kernel's input
    rstd_d = cp.asarray(rstd)
    inc = {"dinp": np.zeros((b, t, C)), "dweight": np.zeros(C)}
    ref_ops.rmsnorm_backward(inc["dinp"], inc["dweight"], dout, x, weight, rstd)
    start = {name: case.accumulator(v) for name, v in inc.items()}
    N = b * t
    scratch = cp.empty(cuda.k.rmsnorm_backward_scratch_floats(N, C), np.float32)

    def run():
        acc = {name: dev.copy() for name, (_, dev) in start.items()}
        launch(cuda, "rmsnorm_backward", acc["dinp"], acc["dweight"], dout_d, x_d, weight_d, rstd_d, scratch,
               scratch.size, N, C)
        return {name: raw(a) for name, a in acc.items()}

    first = run()
    for name, (host, _) in start.items():
        case.check(name, decode(first[name]), host + inc[name], BF16_REL)
    assert_repeatable(case, run, first)


# ---- RoPE ---------------------------------------------------------------------------------------------
NH, NKV = 8, 2


def rope_case(case, head_dim, scaled):
    """(host qkv, device qkv, host tables, device tables): tables for T positions, as the model uploads them."""
    qkv, qkv_d = case.bf16((B, T, (NH + 2 * NKV) * head_dim))
    tables = ref_ops.rope_tables(head_dim, T, 500000.0, ref_ops.LLAMA31_SCALING if scaled else None)
    return qkv, qkv_d, tables, tuple(cp.asarray(t) for t in tables)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("head_dim, scaled", [(64, False), (128, True), (32, False)])
def test_rope(cuda, case, head_dim, scaled, in_place, direction):
    """q and k heads rotated (backward: rotated back), v heads copied bit for bit, or left alone in place."""
    qkv, qkv_d, (cos, sin), (cos_d, sin_d) = rope_case(case, head_dim, scaled)
    out = qkv_d if in_place else poisoned(qkv.shape)
    launch(cuda, f"rope_{direction}", out, qkv_d, cos_d, sin_d, B, T, NH, NKV, head_dim)
    ref = np.empty(qkv.shape)
    getattr(ref_ops, f"rope_{direction}")(ref, qkv, cos, sin, NH, NKV)
    got = to_host(out)
    qk = (NH + NKV) * head_dim
    case.check("q", got[..., :NH * head_dim], ref[..., :NH * head_dim], BF16_REL)
    case.check("k", got[..., NH * head_dim:qk], ref[..., NH * head_dim:qk], BF16_REL)
    case.same_bits("v", raw(out)[..., qk:], bits_of(qkv[..., qk:]))


def test_rope_round_trip(cuda, case):
    """backward(forward(x)) rotates by +angle then -angle: x again, up to two bf16 roundings."""
    qkv, qkv_d, _, (cos_d, sin_d) = rope_case(case, 64, False)
    launch(cuda, "rope_forward", qkv_d, qkv_d, cos_d, sin_d, B, T, NH, NKV, 64)
    launch(cuda, "rope_backward", qkv_d, qkv_d, cos_d, sin_d, B, T, NH, NKV, 64)
    case.check("round trip", to_host(qkv_d), qkv, BF16_REL)


def test_rope_rejects_head_size_not_multiple_of_16(cuda):
    head_dim = 40
    qkv = cp.zeros((B, T, (NH + 2 * NKV) * head_dim), np.uint16)
    table = cp.zeros((T, head_dim // 2), np.float32)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        launch(cuda, "rope_forward", qkv, qkv, table, table, B, T, NH, NKV, head_dim)


# ---- SwiGLU -------------------------------------------------------------------------------------------
def swiglu_input(case, hidden, offset):
    """(host, device) (B, T, 2H) gates and ups of std 3 (both regimes of silu), a few gates far past exp's
    range (|g| = 100: silu -> 0 or g, no NaN). offset 1 places the device array one element past a 16-byte
    boundary, which sends the kernels to their one-element path."""
    x = case.normal((B, T, 2 * hidden), std=3.0)
    x[0, :3, :3] = [[-100.0], [100.0], [-60.0]]
    storage = cp.asarray(bits_of(np.concatenate([np.zeros(offset), x.ravel()])))
    return x, storage[offset:].reshape(x.shape)


SWIGLU_CASES = [(200, 0), (100, 0), (200, 1)]  # 8-wide vectors; rows not of whole vectors; misaligned
SWIGLU_IDS = ["vector", "odd_rows", "misaligned"]


@pytest.mark.parametrize("hidden, offset", SWIGLU_CASES, ids=SWIGLU_IDS)
def test_swiglu_forward(cuda, case, hidden, offset):
    x, x_d = swiglu_input(case, hidden, offset)
    out = poisoned((B, T, hidden))
    launch(cuda, "swiglu_forward", out, x_d, B * T, hidden)
    ref = np.empty((B, T, hidden))
    ref_ops.swiglu_forward(ref, x)
    case.check("out", to_host(out), ref, BF16_REL)


@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "in_place"])
@pytest.mark.parametrize("hidden, offset", SWIGLU_CASES, ids=SWIGLU_IDS)
def test_swiglu_backward(cuda, case, hidden, offset, in_place):
    """In place, dinp overwrites the input it reads, as the model may run it on its pre-activation buffer."""
    x, x_d = swiglu_input(case, hidden, offset)
    dout, dout_d = case.bf16((B, T, hidden))
    dinp = x_d if in_place else poisoned(x.shape)
    launch(cuda, "swiglu_backward", dinp, dout_d, x_d, B * T, hidden)
    ref = np.empty(x.shape)
    ref_ops.swiglu_backward(ref, dout, x)
    got = to_host(dinp)
    case.check("dgate", got[..., :hidden], ref[..., :hidden], BF16_REL)
    case.check("dup", got[..., hidden:], ref[..., hidden:], BF16_REL)


# ---- grouped-query attention ----------------------------------------------------------------------------
# (B, NH, NKV, T, HS): groups of NH / NKV = 1 (GPT-2's layout), 3 and 4 query heads, both head sizes
GQA_CASES = [(2, 4, 4, 77, 64), (2, 6, 2, 201, 64), (1, 8, 2, 333, 64),
             (2, 4, 4, 201, 128), (1, 6, 2, 333, 128), (2, 8, 2, 77, 128)]
GQA_IDS = [f"B{b}-NH{nh}-NKV{nkv}-T{t}-HS{hs}" for b, nh, nkv, t, hs in GQA_CASES]


@pytest.fixture(params=[0, 1], ids=["dispatched", "mma_sync"])
def attention_kernels(request, cuda):
    """The backend with attention on the kernels attention.cu dispatches to (the Hopper ones on compute
    capability 9.x) or forced onto its mma.sync kernels (attention_set_backend(1)); restored after."""
    cuda.k.attention_set_backend(request.param)
    yield cuda
    cuda.k.attention_set_backend(0)


@pytest.mark.parametrize("b, nh, nkv, t, hs", GQA_CASES, ids=GQA_IDS)
def test_attention_gqa(attention_kernels, case, b, nh, nkv, t, hs):
    """The kernels read the packed qkv (B, T, (NH + 2 NKV) HS) directly: forward out and lse, and backward
    dq, dk, dv (dK and dV summed over each group) against numpy's GQA ops in float64; each direction run
    twice for identical bits (the sums over a group run in a fixed order, no atomics). The backward takes the
    float64 forward's out and lse, stored as the kernel gets them (bf16, fp32), on both sides."""
    ops = attention_kernels
    q_end, k_end = nh * hs, (nh + nkv) * hs
    qkv, qkv_d = case.bf16((b, t, (nh + 2 * nkv) * hs))
    dout, dout_d = case.bf16((b, t, nh * hs))
    ref_out, ref_lse = np.empty((b, t, nh * hs)), np.empty((b, nh, t))
    numpy_ops.attention_forward_gqa(ref_out, ref_lse, qkv, nh, nkv)

    def forward():
        out, lse = poisoned((b, t, nh * hs)), poisoned((b, nh, t), fp32=True)
        ops.attention_forward_gqa(out, lse, qkv_d, nh, nkv)
        return {"out": raw(out), "lse": raw(lse)}

    first = forward()
    case.check("out", decode(first["out"]), ref_out, CHAIN_REL)
    case.check("lse", decode(first["lse"]), ref_lse, FP32_REL)
    assert_repeatable(case, forward, first)

    out, lse = decode(bits_of(ref_out)), ref_lse.astype(np.float32)
    out_d, lse_d = cp.asarray(bits_of(out)), cp.asarray(lse)
    ref = np.empty(qkv.shape)
    numpy_ops.attention_backward_gqa(ref, dout, qkv, out, lse, nh, nkv)

    def backward():
        dqkv = poisoned(qkv.shape)
        ops.attention_backward_gqa(dqkv, dout_d, qkv_d, out_d, lse_d, nh, nkv)
        return {"dqkv": raw(dqkv)}

    first = backward()
    got = decode(first["dqkv"])
    for name, cols in {"dq": slice(0, q_end), "dk": slice(q_end, k_end), "dv": slice(k_end, None)}.items():
        case.check(name, got[..., cols], ref[..., cols], CHAIN_REL)
    assert_repeatable(case, backward, first)


def test_attention_rejects_kv_heads_not_dividing_heads(cuda):
    qkv = cp.zeros((1, 64, (6 + 2 * 4) * 64), np.uint16)
    out, lse = cp.zeros((1, 64, 6 * 64), np.uint16), cp.zeros((1, 6, 64), np.float32)
    with pytest.raises(RuntimeError, match="NKV must divide NH"):
        cuda.attention_forward_gqa(out, lse, qkv, 6, 4)
