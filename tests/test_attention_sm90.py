"""The Hopper attention kernels (kernels/attention_sm90.cu: wgmma + TMA) against the numpy oracle and
against the mma.sync kernels they replace on compute capability 9.x. GPU only (the `gpu` marker of
conftest.py skips every test, with the reason, where the CUDA backend cannot run); on a GPU that is not
9.x, or in a build without sm_90 (GPT2CU_CUDA_ARCHS without 90), they skip with that reason.

Same method as test_cuda_ops.py (fresh random inputs with the seed quoted, NaN-poisoned outputs,
||out - ref|| / ||ref|| against the float64 numpy op on the same bf16 numbers), on sequence lengths that
divide no tile (the kernels tile by 64 and 128), both head sizes, multi-head and grouped key/value heads
(the packed qkv of NH + 2 NKV heads; numpy's GQA ops as the reference), and each launch repeated to ask
for identical bits. The backward is one kernel whose fp32 dQ adds across CTAs are ordered by counters
(deterministic: asked for identical bits too, also with more CTAs than multiprocessors). Its qkv bias gradient
(dqkv_bias, summed by the kernel from the values it stores) is checked against the column sums of the dqkv each run
stored, as is the fallback's (the mma.sync backward, then bias_backward).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_cuda_ops import (CHAIN_REL, FP32_REL, bf16_ulp, bits_of, case, cuda, decode, poisoned, raw,  # noqa: F401
                           to_host)
from gpt2cu.backends import numpy_ops as ref_ops

try:
    import cupy as cp
except ImportError:  # every test here is marked gpu: conftest.py skips them all
    cp = None

pytestmark = pytest.mark.gpu

# (B, NH, NKV, T, HS); NKV < NH: grouped-query attention (groups of 3 and 4)
CASES = [(2, 3, 3, 1, 64), (2, 3, 3, 100, 64), (1, 2, 2, 129, 128), (2, 2, 2, 1000, 64), (1, 2, 2, 1000, 128),
         (1, 1, 1, 2048, 64), (1, 1, 1, 300, 128), (2, 6, 2, 100, 64), (1, 4, 1, 1000, 64), (1, 6, 2, 300, 128)]
IDS = [f"B{b}-NH{nh}-NKV{nkv}-T{t}-HS{hs}" for b, nh, nkv, t, hs in CASES]


@pytest.fixture
def sm90(cuda):
    """The backend, where attention dispatches to the Hopper kernels; the dispatch is restored after."""
    k = cuda.k
    if k.attention_backend_in_use(1, 64, 1, 64) != 9090:
        pytest.skip("the Hopper attention kernels do not run here (not compute capability 9.x, or built "
                    "without 90 in GPT2CU_CUDA_ARCHS)")
    yield cuda
    k.attention_set_backend(0)


def reference(qkv, nh, nkv):
    """float64 out (B, T, NH HS) and lse (B, NH, T) of numpy's GQA forward (GPT-2's when NKV == NH)."""
    b, t, width = qkv.shape
    hs = width // (nh + 2 * nkv)
    out, lse = np.empty((b, t, nh * hs)), np.empty((b, nh, t))
    ref_ops.attention_forward_gqa(out, lse, qkv, nh, nkv)
    return out, lse


def run_forward(cuda, qkv_d, b, t, nh, nkv, hs, backend):
    cuda.k.attention_set_backend(backend)
    out, lse = poisoned((b, t, nh * hs)), poisoned((b, nh, t), fp32=True)
    cuda.attention_forward_gqa(out, lse, qkv_d, nh, nkv)
    cuda.k.attention_set_backend(0)
    return out, lse


def run_backward(cuda, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, backend):
    cuda.k.attention_set_backend(backend)
    dqkv = poisoned(qkv_d.shape)
    cuda.attention_backward_gqa(dqkv, dout_d, qkv_d, out_d, lse_d, nh, nkv)
    cuda.k.attention_set_backend(0)
    return dqkv


def check_forward(cuda, case, b, nh, nkv, t, hs):
    """The Hopper forward on fresh inputs against the float64 oracle, and run twice for identical bits;
    returns (qkv on the device, out, lse)."""
    qkv, qkv_d = case.bf16((b, t, (nh + 2 * nkv) * hs))
    out, lse = run_forward(cuda, qkv_d, b, t, nh, nkv, hs, 0)
    ref_out, ref_lse = reference(qkv, nh, nkv)
    case.check("out", to_host(out), ref_out, CHAIN_REL)
    case.check("lse", to_host(lse), ref_lse, FP32_REL)
    out2, lse2 = run_forward(cuda, qkv_d, b, t, nh, nkv, hs, 0)
    assert np.array_equal(raw(out), raw(out2)) and np.array_equal(raw(lse), raw(lse2)), \
        case.where("forward not bitwise repeatable")
    return qkv_d, out, lse


@pytest.mark.parametrize("b, nh, nkv, t, hs", CASES, ids=IDS)
def test_sm90_forward(sm90, case, b, nh, nkv, t, hs):
    qkv_d, out, lse = check_forward(sm90, case, b, nh, nkv, t, hs)
    # the mma.sync forward on the same inputs: two fp32-accumulating computations of one function
    out_old, lse_old = run_forward(sm90, qkv_d, b, t, nh, nkv, hs, 1)
    case.check("out vs mma.sync", to_host(out), to_host(out_old), CHAIN_REL)
    case.check("lse vs mma.sync", to_host(lse), to_host(lse_old), FP32_REL)


# the forward variants (kernels/attention_sm90.h): 0 (2 consumer warpgroups, 128-query blocks: the HS 128 default)
# and 1 (3 on 192-query blocks: the HS 64 default; HS 128 runs 0), both taking work items dynamically through a
# counter each launch leaves zeroed for the next (every case runs each twice). CASES plus lengths where the 192-row
# blocks, aligned to end at T, start 128 rows (193, 385, 1000) or 64 rows (1025, 2048) before 0, and one with more
# work items than an H200 has multiprocessors (4 x 12 x 6 = 288 blocks of 192 rows, 384 of 128): the persistent
# grid's CTAs take several through one K/V ring and the Q reload
VARIANTS = [0, 1]
VARIANT_CASES = CASES + [(2, 3, 3, 193, 64), (1, 4, 2, 385, 64), (1, 2, 2, 1025, 64), (1, 4, 2, 2048, 64),
                         (4, 12, 4, 1000, 64)]
VARIANT_IDS = [f"B{b}-NH{nh}-NKV{nkv}-T{t}-HS{hs}" for b, nh, nkv, t, hs in VARIANT_CASES]


@pytest.fixture
def sm90_variant(sm90, request):
    """The backend with attention's Hopper forward set to variant request.param; the default restored after."""
    sm90.k.attention_set_sm90_forward_variant(request.param)
    yield sm90, request.param
    sm90.k.attention_set_sm90_forward_variant(-1)


@pytest.mark.parametrize("sm90_variant", VARIANTS, indirect=True, ids=[f"v{v}" for v in VARIANTS])
@pytest.mark.parametrize("b, nh, nkv, t, hs", VARIANT_CASES, ids=VARIANT_IDS)
def test_sm90_forward_variant(sm90_variant, case, b, nh, nkv, t, hs):
    """Each variant against the float64 oracle (tolerances as test_sm90_forward's), on NaN-poisoned outputs (every
    row must be written, whichever block and warpgroup hold it), and twice for identical bits."""
    cuda, _ = sm90_variant
    check_forward(cuda, case, b, nh, nkv, t, hs)


@pytest.mark.parametrize("b, nh, nkv, t, hs", CASES, ids=IDS)
def test_sm90_backward(sm90, case, b, nh, nkv, t, hs):
    """As test_cuda_ops.test_attention_backward (out and lse from the float64 forward), and twice: the same
    bits (deterministic: dK/dV summed over each group in a fixed order, dQ's fp32 adds in key block order). At
    T = 1, dq = dk = 0 exactly, so the whole dqkv is checked there."""
    q_end, k_end = nh * hs, (nh + nkv) * hs
    qkv, qkv_d = case.bf16((b, t, (nh + 2 * nkv) * hs))
    dout, dout_d = case.bf16((b, t, nh * hs))
    out, lse = reference(qkv, nh, nkv)
    out, lse = decode(bits_of(out)), lse.astype(np.float32)
    out_d, lse_d = cp.asarray(bits_of(out)), cp.asarray(lse)
    dqkv = run_backward(sm90, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, 0)
    ref = np.empty(qkv.shape)
    ref_ops.attention_backward_gqa(ref, dout, qkv, out, lse, nh, nkv)
    got = to_host(dqkv)
    parts = ({"dq": slice(0, q_end), "dk": slice(q_end, k_end), "dv": slice(k_end, None)} if t > 1
             else {"dqkv": slice(None)})
    for name, cols in parts.items():
        case.check(name, got[..., cols], ref[..., cols], CHAIN_REL)
    again = run_backward(sm90, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, 0)
    assert np.array_equal(raw(dqkv), raw(again)), case.where("backward not bitwise repeatable")


def bias_within_an_ulp(case, what, got, start, dqkv):
    """got (a bf16 "+=" output) within one bf16 ulp of start + the float64 column sums of dqkv (the stored values,
    decoded), plus an fp32 slack of 2^-17 of the column's absolute sum (the kernels' fp32 adds in their own order)."""
    rows = dqkv.reshape(-1, dqkv.shape[-1])
    own = start + rows.sum(axis=0)
    slack = bf16_ulp(own) + 2.0 ** -17 * (np.abs(start) + np.abs(rows).sum(axis=0))
    off = np.abs(got - own) > slack
    assert not off.any(), case.where(f"{what}: off the column sums of its own dqkv by more than one bf16 ulp at "
                                     f"columns {np.argwhere(off).ravel()[:8]} ({got[off][:4]} vs {own[off][:4]})")


@pytest.mark.parametrize("b, nh, nkv, t, hs", CASES, ids=IDS)
def test_sm90_backward_qkv_bias(sm90, case, b, nh, nkv, t, hs):
    """dqkv_bias += dqkv's column sums, summed by the Hopper kernel from the values it stores (dQ's in key block 0's
    items, dK's and dV's per item; per-warp partial rows, then column_sum_add): within one bf16 ulp (+ fp32 order
    slack) of the float64 sums of the dqkv it stored, onto random starting values ("+="), with dqkv's bits the same
    as without the sums, twice to the same bits; and the fallback (the mma.sync backward, then bias_backward on dqkv)
    under the same bound. Every case's T divides no tile or is 1; GQA's key/value columns belong to the kv heads."""
    qkv, qkv_d = case.bf16((b, t, (nh + 2 * nkv) * hs))
    dout, dout_d = case.bf16((b, t, nh * hs))
    out, lse = reference(qkv, nh, nkv)
    out_d, lse_d = cp.asarray(bits_of(out)), cp.asarray(lse.astype(np.float32))
    plain = run_backward(sm90, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, 0)
    start, start_d = case.accumulator(to_host(plain).reshape(-1, qkv.shape[-1]).sum(axis=0))

    def run(backend):
        sm90.k.attention_set_backend(backend)
        dqkv, dbias = poisoned(qkv_d.shape), start_d.copy()
        sm90.attention_backward_gqa(dqkv, dout_d, qkv_d, out_d, lse_d, nh, nkv, dqkv_bias=dbias)
        sm90.k.attention_set_backend(0)
        return raw(dqkv), raw(dbias)

    dqkv, dbias = run(0)
    case.same_bits("dqkv with the bias sums", dqkv, raw(plain))
    bias_within_an_ulp(case, "dqkv_bias (Hopper)", decode(dbias), start, decode(dqkv))
    dqkv2, dbias2 = run(0)
    case.same_bits("dqkv (second run)", dqkv2, dqkv)
    case.same_bits("dqkv_bias (second run)", dbias2, dbias)
    dqkv_mma, dbias_mma = run(1)
    bias_within_an_ulp(case, "dqkv_bias (fallback: mma.sync + bias_backward)", decode(dbias_mma), start,
                       decode(dqkv_mma))


@pytest.mark.parametrize("hs", [64, 128])
def test_sm90_backward_qkv_bias_many_blocks(sm90, case, hs):
    """The fused qkv bias gradient on more work items than multiprocessors (each CTA takes several through the
    partial-row buffers' ring; GQA groups of 2, T dividing no tile): as test_sm90_backward_qkv_bias's check, and
    dqkv_bias "+=" twice = the sums of two calls."""
    b, nh, nkv, t = 3, 8, 4, 1900
    _, qkv_d = case.bf16((b, t, (nh + 2 * nkv) * hs))
    _, dout_d = case.bf16((b, t, nh * hs))
    out_d, lse_d = run_forward(sm90, qkv_d, b, t, nh, nkv, hs, 0)
    width = (nh + 2 * nkv) * hs
    start, start_d = case.bf16((width,), std=8.0)
    dqkv, dbias = poisoned(qkv_d.shape), start_d.copy()
    sm90.attention_backward_gqa(dqkv, dout_d, qkv_d, out_d, lse_d, nh, nkv, dqkv_bias=dbias)
    once = to_host(dbias)
    bias_within_an_ulp(case, "dqkv_bias", once, start, to_host(dqkv))
    sm90.attention_backward_gqa(dqkv, dout_d, qkv_d, out_d, lse_d, nh, nkv, dqkv_bias=dbias)
    bias_within_an_ulp(case, "dqkv_bias after a second call", to_host(dbias), once, to_host(dqkv))


@pytest.mark.parametrize("hs", [64, 128])
def test_sm90_backward_many_blocks(sm90, case, hs):
    """The backward on more CTAs than a GPU has multiprocessors, so key blocks of a head run in different waves
    and wait on each other's dQ adds (ordered by counters: a wrong order would hang or change bits; a key block
    waiting on a later-launched one would deadlock): against the mma.sync backward (two fp32-accumulating
    computations of one function, CHAIN_REL apart), and twice to the same bits. GQA groups of 2, T dividing no
    tile."""
    b, nh, nkv, t = 3, 8, 4, 1900
    _, qkv_d = case.bf16((b, t, (nh + 2 * nkv) * hs))
    _, dout_d = case.bf16((b, t, nh * hs))
    out_d, lse_d = run_forward(sm90, qkv_d, b, t, nh, nkv, hs, 0)  # the inputs the backward gets in training
    mma = run_backward(sm90, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, 2)
    one = run_backward(sm90, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, 0)
    case.check("dqkv Hopper vs mma.sync backward", to_host(one), to_host(mma), CHAIN_REL)
    again = run_backward(sm90, dout_d, qkv_d, out_d, lse_d, b, t, nh, nkv, hs, 0)
    assert np.array_equal(raw(one), raw(again)), case.where("Hopper backward not bitwise repeatable")


def test_sm90_forward_variant_setter(sm90):
    """-1, 0 and 1 are the variants (-1: the default per head size); others are refused."""
    k = sm90.k
    with pytest.raises(Exception):
        k.attention_set_sm90_forward_variant(2)
    with pytest.raises(Exception):
        k.attention_set_sm90_forward_variant(-2)
    k.attention_set_sm90_forward_variant(-1)


def test_sm90_dispatch_switch(sm90):
    """attention_set_backend: 1 keeps everything on the mma.sync kernels, 2 only the backward, 0 restores."""
    k = sm90.k
    k.attention_set_backend(1)
    assert k.attention_backend_in_use(2, 1000, 3, 128) == 8080
    k.attention_set_backend(2)
    assert k.attention_backend_in_use(2, 1000, 3, 128) == 8090
    k.attention_set_backend(0)
    assert k.attention_backend_in_use(2, 1000, 3, 128) == 9090
    with pytest.raises(Exception):
        k.attention_set_backend(3)


@pytest.mark.parametrize("b, t, nh, hs", [(64, 1024, 12, 64), (3, 1000, 6, 128), (1, 1, 1, 64)])
def test_planner_mirrors_the_attention_scratch(sm90, b, t, nh, hs):
    """gpt2cu.memory's copy of the attention backward's scratch size (the planner's workspace) equals the
    extension's, on Hopper (the one-kernel backward's fp32 dQ tiles included), and the layernorm's."""
    from gpt2cu import memory
    k = sm90.k
    assert memory.attention_backward_scratch_floats(b, t, nh, hs) == k.attention_backward_scratch_floats(b, t, nh, hs)
    assert memory.layernorm_backward_scratch_floats(b * t, 768) == k.layernorm_backward_scratch_floats(b * t, 768)
