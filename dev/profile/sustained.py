"""Kernel time and energy cold against sustained: each op once after an idle pause (the GPU at its boost clock, as
ncu times a kernel alone) and back to back for a few seconds (the clock the power limit allows, as in a training
step), with the board's energy per call, mean power and SM clock over the sustained run's second half
(gpt2cu.energy, NVML). Tells whether an op runs slower in the step because of the clock (power) or because of what
runs around it, and what each op costs in energy per FLOP at the limit.

    python dev/profile/sustained.py [--B 64] [--T 1024] [--seconds 3]

Ops at GPT-2 124M's shapes (C = 768, 12 heads): attention forward and backward, fc's GEMM with the GeLU epilogue
and with the bias only (cuBLASLt), the projection's dinp with the DGELU epilogue and plain (cuBLASLt), the plain qkv
GEMM and fc's weight gradient (cuBLASLt), one 8192-row chunk of the LM head
(lm_head_loss) and its forward product alone (cuBLASLt).
"""
from __future__ import annotations

import argparse
import statistics
import time

import cupy as cp
import numpy as np

from gpt2cu.backends import get_backend
from gpt2cu.energy import EnergyMeter


def timed(fn, stream):
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record(stream)
    fn()
    e.record(stream)
    e.synchronize()
    return cp.cuda.get_elapsed_time(s, e) * 1e3


def measure(fn, stream, seconds, meter):
    """(cold us, sustained median us, J a call, W, SM MHz); the last three nan without a meter"""
    for _ in range(3):
        fn()
    stream.synchronize()
    time.sleep(1.0)
    cold = timed(fn, stream)
    t0, times, calls, reading = time.time(), [], 0, None
    while time.time() - t0 < seconds:
        second_half = time.time() - t0 > seconds / 2
        if second_half and meter and calls == 0:
            meter.start()
        events = [cp.cuda.Event() for _ in range(21)]
        events[0].record(stream)
        for i in range(20):
            fn()
            events[i + 1].record(stream)
        events[-1].synchronize()
        if second_half:
            times += [cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in zip(events, events[1:])]
            calls += 20
    if meter and calls:
        reading = meter.stop()
    if reading is None:
        return cold, statistics.median(times), float("nan"), float("nan"), float("nan")
    return cold, statistics.median(times), reading.joules / calls, reading.watts, reading.sm_mhz


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    be = get_backend("cuda")
    stream = be.stream
    B, T, C, NH = args.B, args.T, 768, 12
    N = B * T
    rng = np.random.default_rng(0)

    def bf16(shape, scale=1.0):
        x = (rng.standard_normal(shape, dtype=np.float32) * scale).view(np.uint32)
        return cp.asarray(((x + 0x8000) >> 16).astype(np.uint16))

    qkv, dout, out, dqkv = bf16((B, T, 3 * C)), bf16((B, T, C)), bf16((B, T, C)), bf16((B, T, 3 * C))
    lse = cp.zeros((B, NH, T), dtype=cp.float32)
    x, w_fc, b_fc = bf16((N, C)), bf16((4 * C, C), C ** -0.5), bf16((4 * C,), 0.5)
    h, pre, dh = bf16((N, 4 * C)), bf16((N, 4 * C)), bf16((N, 4 * C))
    w_proj, dy, w_qkv = bf16((C, 4 * C), C ** -0.5), bf16((N, C)), bf16((3 * C, C), C ** -0.5)
    y_qkv, db_fc = bf16((N, 3 * C)), bf16((4 * C,))
    dw_fc = bf16((4 * C, C))
    V, Vp, rows = 50257, 50304, 8192  # the LM head: one chunk of the trainer's
    hid, wte, dhid, dwte, logits = bf16((rows, C)), bf16((Vp, C), 0.02), bf16((rows, C)), bf16((Vp, C)), bf16((rows, Vp))
    targets, losses = cp.asarray(rng.integers(0, V, rows, dtype=np.int32)), cp.zeros(rows, cp.float32)
    head = 2 * rows * Vp * C
    be.attention_forward(out, lse, qkv, NH)
    attn = 2 * B * NH * T * T * (C // NH)  # causal: half of 4 B NH T^2 hs
    fc = 2 * N * 4 * C * C
    ops = [  # name, call, FLOPs
        ("attention forward", lambda: be.attention_forward(out, lse, qkv, NH), attn),
        ("attention backward", lambda: be.attention_backward(dqkv, dout, qkv, out, lse, NH), 2.5 * attn),
        ("fc forward, GeLU epilogue", lambda: be.matmul_forward(h, x, w_fc, b_fc, gelu_pre=pre), fc),
        ("fc forward, bias (cuBLASLt)", lambda: be.matmul_forward(h, x, w_fc, b_fc), fc),
        ("fcproj dinp, DGELU + fc's dbias", lambda: be.matmul_backward(dh, None, None, dy, h, w_proj,
                                                                       dinp_gelu_pre=pre, dinp_gelu_dbias=db_fc), fc),
        ("fcproj dinp, plain (cuBLASLt)", lambda: be.matmul_backward(dh, None, None, dy, h, w_proj), fc),
        ("qkv forward, plain (cuBLASLt)", lambda: be.matmul_forward(y_qkv, x, w_qkv, None), 3 * fc / 4),
        ("fc dweight (cuBLASLt)", lambda: be.matmul_backward(None, dw_fc, None, dh, x, w_fc), fc),
        ("LM head chunk: Exp, dX, dW", lambda: be.lm_head_loss(losses, dhid, dwte, logits, hid, wte, targets,
                                                               1.0 / rows, V), 3 * head),
        ("LM head forward, plain (cuBLASLt)", lambda: be.matmul_forward(logits, hid, wte, None), head),
    ]
    meter = EnergyMeter.open_cuda()
    if meter is None:
        print(f"energy not measured: {EnergyMeter.why_not}")
    rows = [(name, flops, *measure(fn, stream, args.seconds, meter)) for name, fn, flops in ops]
    print(f"\n{be.device_name()}, B={B} T={T}: one call after 1 s idle, then back-to-back calls for {args.seconds:g} s: "
          f"the median time, the energy a call, power and clock over the second half")
    print(f"{'op':<32} | {'cold us':>8} | {'sustained us':>12} | {'ratio':>5} | {'TFLOP/s':>7} | {'mJ':>6} | "
          f"{'pJ/FLOP':>7} | {'SM MHz':>6} | {'W':>5}")
    for name, flops, cold, hot, joules, watts, mhz in rows:
        print(f"{name:<32} | {cold:8.1f} | {hot:12.1f} | {hot / cold:5.2f} | {flops / hot / 1e6:7.0f} | "
              f"{joules * 1e3:6.1f} | {joules / flops * 1e12:7.3f} | {mhz:6.0f} | {watts:5.0f}")

if __name__ == "__main__":
    main()
