"""Timing and check of the GeLU-epilogue GEMMs (kernels/gemm_sm90.cu) against cuBLASLt's epilogues and torch.

    python3 dev/gemm_sm90/bench.py [--M 65536] [--N 3072] [--K 768] [--reps 20] [--modes 0,1,2] [--no-check]

In one process, at fc's shapes (M = B*T rows, N = 4C, K = C): the forward (pre = a @ w^T + bias, out = gelu(pre))
and the dinp of the projection after it (out = (a @ w) * gelu'(pre), w (K, N)), through matmul_forward /
matmul_backward with matmul_set_sm90(mode): 0 cuBLASLt's GELU_AUX_BIAS / DGELU, 1 and 2 the Hopper kernel's tile
variants; and torch.matmul, plain bf16, of the same shape (the GEMM rate each row is compared with). CUDA events on
torch's stream, 3 warm-ups, median of --reps. Check: each mode's outputs against an fp32 torch reference on the
same bf16 inputs (max |x - ref| / max |ref|, and ||x - ref|| / ||ref||), and each sm90 mode's bits against
cuBLASLt's (the fraction of elements that differ).
"""
import argparse
import statistics

import torch

from gpt2cu._native import load_kernels

ap = argparse.ArgumentParser()
ap.add_argument("--M", type=int, default=65536)
ap.add_argument("--N", type=int, default=3072)
ap.add_argument("--K", type=int, default=768)
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--modes", default="0,1,2")
ap.add_argument("--no-check", action="store_true")
args = ap.parse_args()
M, N, K = args.M, args.N, args.K
modes = [int(m) for m in args.modes.split(",")]
k = load_kernels()
dev = "cuda"
stream = torch.cuda.current_stream().cuda_stream


def median_us(fn, reps=args.reps):
    for _ in range(3):
        fn()
    pairs = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in pairs)


def gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def gelu_grad(x):
    th = torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)


g = torch.Generator(device=dev).manual_seed(0)
a = torch.randn(M, K, device=dev, generator=g).bfloat16()
w = (torch.randn(N, K, device=dev, generator=g) * K ** -0.5).bfloat16()       # fc weight (N, K)
bias = (torch.randn(N, device=dev, generator=g) * 0.5).bfloat16()
dout = torch.randn(M, K, device=dev, generator=g).bfloat16()                  # the projection's output grad
wp = (torch.randn(K, N, device=dev, generator=g) * K ** -0.5).bfloat16()      # projection weight (K, N)
pre_in = torch.randn(M, N, device=dev, generator=g).bfloat16()
out, pre, dinp = (torch.empty(M, N, device=dev, dtype=torch.bfloat16) for _ in range(3))
P = lambda t: t.data_ptr()  # noqa: E731


def fwd():  # matmul_forward(out, gelu_pre, inp, weight, bias, N rows, C = K, OC = N)
    k.matmul_forward(P(out), P(pre), P(a), P(w), P(bias), M, K, N, stream)


def bwd():  # matmul_backward: dinp (rows, C = N) = dout (rows, OC = K) @ weight (OC, C) * gelu'(pre_in)
    k.matmul_backward(P(dinp), 0, 0, P(dout), 0, P(wp), P(pre_in), 0, 0, M, N, K, stream)


flops = 2 * M * N * K
plain_a, plain_b = a, w.t()
torch_us = median_us(lambda: torch.matmul(plain_a, plain_b))
rate = flops / torch_us / 1e6
rows = [("torch.matmul bf16 (plain)", torch_us)]

refs = {}
if not args.no_check:
    ref_pre = a.float() @ w.float().t() + bias.float()
    refs = {"fwd": (gelu(ref_pre), ref_pre), "bwd": ((dout.float() @ wp.float()) * gelu_grad(pre_in.float()),)}
    del ref_pre
checks, bits = [], {}
prev = k.matmul_set_sm90(-1)
for mode in modes:
    k.matmul_set_sm90(mode)
    name = "cuBLASLt" if mode == 0 else f"sm90 v{mode} ({'128x128' if mode == 1 else '64x256'})"
    for what, fn, outs in (("fwd gelu", fwd, (out, pre)), ("bwd dgelu", bwd, (dinp,))):
        for o in outs:
            o.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        if not args.no_check:
            key = what.split()[0]
            for label, got, ref in zip(("out", "pre") if key == "fwd" else ("dinp",), outs, refs[key]):
                d = (got.float() - ref).abs()
                finite = bool(torch.isfinite(got.float()).all())
                checks.append((f"{name} {what} {label}", float(d.max() / ref.abs().max()),
                               float(d.norm() / ref.norm()), finite))
                if mode == 0:
                    bits[(what, label)] = got.clone()
                elif (what, label) in bits:
                    diff = float((got.view(torch.int16) != bits[(what, label)].view(torch.int16)).float().mean())
                    checks[-1] = checks[-1] + (diff,)
        rows.append((f"{name} {what}", median_us(fn)))
k.matmul_set_sm90(prev)

print("\ncheck (fp32 torch reference): max|x-ref|/max|ref|, ||x-ref||/||ref||, all finite, bits != cuBLASLt")
for c in checks:
    print(f"  {c[0]:<40} {c[1]:.2e}  {c[2]:.2e}  {c[3]}" + (f"  {100 * c[4]:.2f}%" if len(c) > 4 else ""))
print(f"\nM={M} N={N} K={K}: {flops / 1e9:.1f} GFLOP per GEMM; torch.matmul plain bf16 = {rate:.0f} TFLOP/s")
print(f"{'GEMM':<44} {'us':>8} {'TFLOP/s':>8} {'% torch':>8}")
for label, us in rows:
    print(f"{label:<44} {us:>8.1f} {flops / us / 1e6:>8.1f} {100 * torch_us / us:>7.1f}%")
