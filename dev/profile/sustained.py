"""Kernel time cold against sustained: each op once after an idle pause (the GPU at its boost clock, as ncu
times a kernel alone) and back to back for a few seconds (the clock the power limit allows, as in a training
step), with nvidia-smi's SM clock and board power sampled during the sustained run. Tells whether an op runs
slower in the step because of the clock (power) or because of what runs around it.

    python dev/profile/sustained.py [--B 64] [--T 1024] [--seconds 3]

Ops at GPT-2 124M's shapes (C = 768, 12 heads): attention forward and backward, fc's GEMM with the GeLU epilogue,
the projection's backward with the DGELU epilogue, and the plain qkv GEMM (cuBLASLt).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import cupy as cp
import numpy as np

from gpt2cu.backends import get_backend


def smi_start():
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                 "-lms", "50"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None


def smi_mean(proc):
    """mean (MHz, W) over the second half of the samples (the first may predate the load)"""
    if proc is None:
        return float("nan"), float("nan")
    proc.terminate()
    lines = proc.communicate()[0].split("\n")
    samples = []
    for line in lines[len(lines) // 2:]:
        try:
            samples.append(tuple(float(v) for v in line.split(",")))
        except ValueError:
            pass
    if not samples:
        return float("nan"), float("nan")
    return statistics.mean(c for c, _ in samples), statistics.mean(p for _, p in samples)


def timed(fn, stream):
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record(stream)
    fn()
    e.record(stream)
    e.synchronize()
    return cp.cuda.get_elapsed_time(s, e) * 1e3


def measure(fn, stream, seconds):
    for _ in range(3):
        fn()
    stream.synchronize()
    time.sleep(1.0)
    cold = timed(fn, stream)
    smi = smi_start()
    t0, times = time.time(), []
    while time.time() - t0 < seconds:
        events = [cp.cuda.Event() for _ in range(21)]
        events[0].record(stream)
        for i in range(20):
            fn()
            events[i + 1].record(stream)
        events[-1].synchronize()
        if time.time() - t0 > seconds / 2:
            times += [cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in zip(events, events[1:])]
    mhz, watts = smi_mean(smi)
    return cold, statistics.median(times), mhz, watts


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
    be.attention_forward(out, lse, qkv, NH)
    ops = [
        ("attention forward", lambda: be.attention_forward(out, lse, qkv, NH)),
        ("attention backward", lambda: be.attention_backward(dqkv, dout, qkv, out, lse, NH)),
        ("fc forward, GeLU epilogue", lambda: be.matmul_forward(h, x, w_fc, b_fc, gelu_pre=pre)),
        ("fcproj dinp, DGELU + fc's dbias", lambda: be.matmul_backward(dh, None, None, dy, h, w_proj,
                                                                       dinp_gelu_pre=pre, dinp_gelu_dbias=db_fc)),
        ("qkv forward, plain (cuBLASLt)", lambda: be.matmul_forward(y_qkv, x, w_qkv, None)),
    ]
    rows = [(name, *measure(fn, stream, args.seconds)) for name, fn in ops]
    print(f"\n{be.device_name()}, B={B} T={T}: one call after 1 s idle, then the median of back-to-back calls in "
          f"the second half of {args.seconds:g} s")
    print(f"{'op':<32} | {'cold us':>8} | {'sustained us':>12} | {'ratio':>5} | {'SM MHz':>6} | {'W':>5}")
    for name, cold, hot, mhz, watts in rows:
        print(f"{name:<32} | {cold:8.1f} | {hot:12.1f} | {hot / cold:5.2f} | {mhz:6.0f} | {watts:5.0f}")


if __name__ == "__main__":
    main()
