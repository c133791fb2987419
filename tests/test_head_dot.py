"""The attention backward's D = rowsum(dO * O) per head computed by the output projection's backward
(matmul_backward's dinp_head_dot: gemm_sm90.cu's HeadDot epilogue on Hopper where the shape fits, else cuBLASLt's
dinp and attention.cu's preprocess), and the attention backward given that D. GPU only (the `gpu` marker).

Same method as test_cuda_ops.py (fresh random inputs with the seed quoted, NaN-poisoned outputs, ||out - ref|| /
||ref|| against float64 numpy on the same bf16 numbers). D is checked against numpy's head_dot of the dinp the GPU
stored (bf16) and O: the kernel's products of those bf16 numbers are exact in fp32 and only their 64 or 128-term
fp32 sum rounds (~1e-7 relative), so FP32_REL. Row counts divide no tile (128 rows), both head sizes, and shapes the
Hopper kernel leaves to the fallback (C not a multiple of 128, OC not of 64), each with the Hopper GEMM on and off.
"""
from __future__ import annotations

import numpy as np
import pytest

from test_cuda_ops import (BF16_REL, FP32_REL, SM90_SETTINGS, bits_of, case, cuda, decode, poisoned,  # noqa: F401
                           raw, sm90_setting, to_host)
from gpt2cu.backends import numpy_ops as ref_ops

try:
    import cupy as cp
except ImportError:  # every test here is marked gpu: conftest.py skips them all
    cp = None

pytestmark = pytest.mark.gpu

# (B, T, C, OC, HS): the rows B * T; the last two go to the fallback on Hopper too (C = 192, OC = 200)
SHAPES = [(3, 37, 768, 768, 64), (1, 1000, 256, 512, 128), (5, 201, 384, 192, 64), (2, 129, 256, 64, 128),
          (2, 100, 192, 256, 64), (1, 300, 256, 200, 128)]
IDS = [f"B{b}-T{t}-C{c}-OC{oc}-HS{hs}" for b, t, c, oc, hs in SHAPES]


def projection_inputs(case, b, t, c, oc, out=None):
    """dout (B, T, OC), O (B, T, C) (out, or fresh), x (B, T, C), w (OC, C): {name: (host, device)}."""
    return {"dout": case.bf16((b, t, oc)), "out": case.bf16((b, t, c)) if out is None else out,
            "x": case.bf16((b, t, c)), "w": case.bf16((oc, c), std=oc ** -0.5)}


def projection_backward(cuda, inputs, hs, on, dweight=None):
    """matmul_backward with dinp_head_dot, the Hopper GEMM on or off: (dinp, D) on the device."""
    (dout, dout_d), (out, out_d), (x, x_d), (w, w_d) = (inputs[k] for k in ("dout", "out", "x", "w"))
    b, t, c = x.shape
    dinp, dot = poisoned((b, t, c)), poisoned((b, c // hs, t), fp32=True)
    with sm90_setting(cuda, on):
        cuda.matmul_backward(dinp, dweight, None, dout_d, x_d, w_d, dinp_head_dot=dot, head_dot_with=out_d)
    return dinp, dot


@pytest.mark.parametrize("on", **SM90_SETTINGS)
@pytest.mark.parametrize("b, t, c, oc, hs", SHAPES, ids=IDS)
def test_matmul_head_dot(cuda, case, b, t, c, oc, hs, on):
    """dinp within BF16_REL of float64 (one rounding), dweight too; D within FP32_REL of numpy's head_dot of the
    stored dinp and O; a second run gives the same bits."""
    inputs = projection_inputs(case, b, t, c, oc)
    dweight = cp.zeros((oc, c), cp.uint16)
    dinp, dot = projection_backward(cuda, inputs, hs, on, dweight)
    host = {k: v[0] for k, v in inputs.items()}
    ref_dinp, ref_dweight = np.empty((b, t, c)), np.zeros((oc, c))
    ref_ops.matmul_backward(ref_dinp, ref_dweight, None, host["dout"], host["x"], host["w"])
    got_dinp = to_host(dinp)
    case.check("dinp", got_dinp, ref_dinp, BF16_REL)
    case.check("dweight", to_host(dweight), ref_dweight, BF16_REL)
    case.check("dinp_head_dot", to_host(dot), ref_ops.head_dot(got_dinp, host["out"], c // hs), FP32_REL)
    dinp2, dot2 = projection_backward(cuda, inputs, hs, on)
    case.same_bits("dinp (second run)", raw(dinp2), raw(dinp))
    case.same_bits("dinp_head_dot (second run)", raw(dot2), raw(dot))


def test_matmul_head_dot_refuses_bad_arguments(cuda):
    """A head size that does not divide C, and D together with the DGELU epilogue: clear errors."""
    rows, C, OC = 64, 192, 128
    dinp, x, w, dout = (cp.zeros(s, cp.uint16) for s in ((rows, C), (rows, C), (OC, C), (rows, OC)))
    with pytest.raises(ValueError, match="dinp_head_dot"):
        cuda.matmul_backward(dinp, None, None, dout, x, w, dinp_head_dot=cp.zeros((1, 5, rows), cp.float32),
                             head_dot_with=x)
    with pytest.raises(RuntimeError, match="dinp_head_dot needs"):
        cuda.matmul_backward(dinp, None, None, dout, x, w, dinp_gelu_pre=x,
                             dinp_head_dot=cp.zeros((1, 3, rows), cp.float32), head_dot_with=x)


# (B, NH, T, HS): C = NH HS 192 (the fallback's D), 256 (Hopper's fused D)
ATTENTION = [(2, 3, 100, 64), (2, 4, 77, 64), (1, 2, 300, 128)]


@pytest.mark.parametrize("backend", [0, 1], ids=["auto", "mma"])
@pytest.mark.parametrize("b, nh, t, hs", ATTENTION, ids=[f"B{b}-NH{nh}-T{t}-HS{hs}" for b, nh, t, hs in ATTENTION])
def test_attention_backward_given_head_dot(cuda, case, b, nh, t, hs, backend):
    """The attention backward (the Hopper kernel or the mma.sync ones) given D from matmul_backward against the same
    backward computing D itself from the same dO: with the preprocess's D (matmul_backward's fallback, the Hopper
    GEMM off) the same bits; with the Hopper GEMM's fused D within BF16_REL (D differs by fp32 rounding, which can
    flip a bf16 rounding of dS; the same D where the shape leaves the GEMM to the fallback)."""
    c = nh * hs
    qkv, qkv_d = case.bf16((b, t, 3 * c))
    out, lse = np.empty((b, t, c)), np.empty((b, nh, t))
    ref_ops.attention_forward(out, lse, qkv, nh)
    out = decode(bits_of(out))  # as the forward stores it
    out_d, lse_d = cp.asarray(bits_of(out)), cp.asarray(lse.astype(np.float32))
    inputs = projection_inputs(case, b, t, c, 3 * 64, out=(out, out_d))
    cuda.k.attention_set_backend(backend)
    try:
        for on, name in ((0, "the preprocess's D"), (1, "the fused D")):
            dinp, dot = projection_backward(cuda, inputs, hs, on)
            runs = []
            for given in (None, dot):
                dqkv = poisoned((b, t, 3 * c))
                cuda.attention_backward(dqkv, dinp, qkv_d, out_d, lse_d, nh, dout_head_dot=given)
                runs.append(raw(dqkv))
            if on == 0:
                case.same_bits(f"dqkv given {name}", runs[1], runs[0])
            else:
                case.check(f"dqkv given {name}", decode(runs[1]), decode(runs[0]), BF16_REL)
    finally:
        cuda.k.attention_set_backend(0)
