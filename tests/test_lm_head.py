"""The LM head and its cross-entropy in one op (backends' lm_head_loss; CUDA: kernels/lm_head.cu), against the numpy
oracle's three ops in float64 (matmul_forward, fused_classifier, matmul_backward) on the same bf16 numbers. GPU only
(the `gpu` marker). Same method as test_cuda_ops.py: fresh inputs with the seed quoted, NaN-poisoned outputs,
||out - ref|| / ||ref||.

Both settings of lm_head_set_fused: 1 runs the Hopper path where it applies (the exp of the logits in gemm_sm90.cu's
epilogue, no dlogits formed: lm_head.cu's header), 0 (and any other GPU) the three CUDA ops. Bounds:
  losses   fused: FP32_REL (the softmax's sums are of fp32 values, from fp32 logits); the three ops: BF16_REL (the
           classifier reads bf16-rounded logits: |x| 2^-9 each, against losses of ~ln V)
  dhidden  CHAIN_REL: dlogits (or E) rounded to bf16, then the GEMM's output rounded (and on the fused path scaled
           and rounded once more)
  dweight  CHAIN_REL: a "+=" onto random bf16 values of a product of rounded dlogits
Masked rows (target -1): loss 0 and a zero gradient row, exactly. Rows whose loss is far past 44 nats (logits of
std ~100) take the fused path's recompute (fixup). A second run gives the same bits.
Shapes: rows that divide no 128-row tile; vocabularies with padded columns, a single 128-column tile, GPT-2's
50257 / 50304; C = 96 (not a multiple of 64) runs the three ops on Hopper too.
"""
from __future__ import annotations

import numpy as np
import pytest

from test_cuda_ops import (BF16_REL, CHAIN_REL, FP32_REL, assert_repeatable, bits_of, case, cuda, decode,  # noqa: F401
                           poisoned, raw, to_host)
from gpt2cu import memory
from gpt2cu.backends import numpy_ops as ref_ops

try:
    import cupy as cp
except ImportError:  # every test here is marked gpu: conftest.py skips them all
    cp = None

pytestmark = pytest.mark.gpu

SHAPES = [(300, 128, 1003, 1024), (1000, 256, 2000, 2048), (129, 64, 100, 128), (517, 768, 50257, 50304),
          (111, 96, 1001, 1024)]  # (N, C, V, Vp)
IDS = [f"N{n}-C{c}-V{v}" for n, c, v, _ in SHAPES]


def reference(hidden, w, targets, dloss, V, dweight_start):
    """float64: (losses, dhidden, dweight) by the numpy oracle's three ops."""
    N, Vp = hidden.shape[0], w.shape[0]
    logits, losses = np.empty((N, Vp)), np.empty(N)
    ref_ops.matmul_forward(logits, hidden, w)
    ref_ops.fused_classifier(losses, logits, targets, dloss, V)
    dhidden, dweight = np.empty_like(hidden), dweight_start.copy()
    if dloss:
        ref_ops.matmul_backward(dhidden, dweight, None, logits, hidden, w)
    return losses, dhidden, dweight


def lm_head_inputs(case, N, C, V, Vp, huge_rows=0):
    """hidden (N, C), w (Vp, C) as (host, device); targets with masked rows; huge_rows rows of logits with std ~100
    (losses of hundreds of nats)."""
    hidden = case.normal((N, C))
    hidden[1:1 + huge_rows] *= 100.0
    hidden = decode(bits_of(hidden))
    w = decode(bits_of(case.normal((Vp, C), std=C ** -0.5)))
    targets = case.rng.integers(0, V, N).astype(np.int32)
    targets[case.rng.random(N) < 0.1] = -1
    targets[0], targets[-1] = -1, V - 1
    targets[1:1 + huge_rows] = np.arange(huge_rows) % V
    return (hidden, cp.asarray(bits_of(hidden))), (w, cp.asarray(bits_of(w))), targets


def fused_applies(fused, C, Vp) -> bool:
    """Whether lm_head_loss takes the Hopper path: the setting on, compute capability 9.x (matmul_set_sm90 on, its
    default), C a multiple of 64 and Vp of 128."""
    return bool(fused) and cp.cuda.Device().compute_capability.startswith("9") and C % 64 == 0 and Vp % 128 == 0


def run_op(cuda, fused, hidden_d, w_d, targets_d, dloss, V, dweight_start):
    """lm_head_loss on fresh outputs: {losses, dhidden, dweight} as stored. fused 2: the fused path with gemm_sm90's
    clusters off (1000 and 129 rows pair up their row tiles: clusters of 2 CTAs with fused 1)."""
    N, Vp = hidden_d.shape[0], w_d.shape[0]
    previous = cuda.k.lm_head_set_fused(1 if fused else 0), cuda.k.matmul_set_sm90_cluster(1 if fused == 2 else 2)
    try:
        losses, dhidden, dweight = poisoned(N, fp32=True), poisoned(hidden_d.shape), dweight_start.copy()
        logits = cp.empty((N, Vp), cp.uint16)
        cuda.lm_head_loss(losses, dhidden, dweight, logits, hidden_d, w_d, targets_d, dloss, V)
        return {"losses": raw(losses), "dhidden": raw(dhidden), "dweight": raw(dweight)}
    finally:
        cuda.k.lm_head_set_fused(previous[0])
        cuda.k.matmul_set_sm90_cluster(previous[1])


@pytest.mark.parametrize("fused", [0, 1, 2], ids=["three-ops", "fused", "fused-nocluster"])
@pytest.mark.parametrize("N, C, V, Vp", SHAPES, ids=IDS)
def test_lm_head_loss(cuda, case, N, C, V, Vp, fused):
    (hidden, hidden_d), (w, w_d), targets = lm_head_inputs(case, N, C, V, Vp)
    dloss = 1.0 / N
    ref_losses, ref_dhidden, ref_dweight = reference(hidden, w, targets, dloss, V, np.zeros((Vp, C)))
    dweight0, dweight0_d = case.accumulator(ref_dweight)
    targets_d = cp.asarray(targets)
    run = lambda: run_op(cuda, fused, hidden_d, w_d, targets_d, dloss, V, dweight0_d)
    first = run()
    losses = decode(first["losses"])
    case.check("losses", losses, ref_losses, FP32_REL if fused_applies(fused, C, Vp) else BF16_REL)
    case.zero("losses of masked rows", losses[targets < 0])
    dhidden = decode(first["dhidden"])
    case.check("dhidden", dhidden, ref_dhidden, CHAIN_REL)
    case.zero("dhidden of masked rows", dhidden[targets < 0])
    case.check("dweight", decode(first["dweight"]), dweight0 + ref_dweight, CHAIN_REL)
    assert_repeatable(case, run, first)


@pytest.mark.parametrize("N, C, V, Vp", [SHAPES[0], SHAPES[3]], ids=[IDS[0], IDS[3]])
def test_lm_head_loss_huge_losses(cuda, case, N, C, V, Vp):
    """Rows whose softmax sum would pass the fused path's 2^64 (losses of hundreds of nats) are recomputed: their
    losses and gradients match the reference like the others'."""
    (hidden, hidden_d), (w, w_d), targets = lm_head_inputs(case, N, C, V, Vp, huge_rows=5)
    dloss = 1.0 / N
    ref_losses, ref_dhidden, ref_dweight = reference(hidden, w, targets, dloss, V, np.zeros((Vp, C)))
    # the fused path's exponent (base 2, from the target's logit) reaches its cap of 64 where the largest logit is
    # 64 ln 2 = 44.4 past the target's, which a loss past 44.4 + ln(Vp) guarantees
    assert (ref_losses[1:6] > 64 * np.log(2) + np.log(Vp)).all(), "the planted rows must reach the exponent cap"
    dweight0, dweight0_d = case.accumulator(ref_dweight)
    got = run_op(cuda, 1, hidden_d, w_d, cp.asarray(targets), dloss, V, dweight0_d)
    losses = decode(got["losses"])
    case.check("losses of the planted rows", losses[1:6], ref_losses[1:6], FP32_REL)
    case.check("losses", losses, ref_losses, FP32_REL)
    case.check("dhidden of the planted rows", decode(got["dhidden"])[1:6], ref_dhidden[1:6], CHAIN_REL)
    case.check("dhidden", decode(got["dhidden"]), ref_dhidden, CHAIN_REL)
    case.check("dweight", decode(got["dweight"]), dweight0 + ref_dweight, CHAIN_REL)


@pytest.mark.parametrize("fused", [0, 1], ids=["three-ops", "fused"])
def test_lm_head_loss_eval(cuda, case, fused):
    """dloss = 0: the losses alone; dhidden and dweight are not touched."""
    N, C, V, Vp = SHAPES[0]
    (hidden, hidden_d), (w, w_d), targets = lm_head_inputs(case, N, C, V, Vp)
    ref_losses = reference(hidden, w, targets, 0.0, V, np.zeros((Vp, C)))[0]
    dweight0, dweight0_d = case.bf16((Vp, C))
    got = run_op(cuda, fused, hidden_d, w_d, cp.asarray(targets), 0.0, V, dweight0_d)
    case.check("losses", decode(got["losses"]), ref_losses, FP32_REL if fused_applies(fused, C, Vp) else BF16_REL)
    case.same_bits("dweight (untouched)", got["dweight"], raw(dweight0_d))
    assert np.isnan(decode(got["dhidden"])).all(), "dhidden must not be written with dloss = 0"


def test_lm_head_scratch_size_mirrored(cuda):
    for N, C, V, Vp in SHAPES:
        assert cuda.k.lm_head_loss_scratch_floats(N, C, Vp) == memory.lm_head_loss_scratch_floats(N, C, Vp)
