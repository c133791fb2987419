"""Timing and check of the GeLU-epilogue GEMMs (kernels/gemm_sm90.cu) against cuBLASLt's and torch.

    python3 dev/gemm_sm90/bench.py [--M 65536] [--N 3072] [--K 768] [--reps 20] [--no-check] [--sustain SECONDS]

In one process, at fc's shape (M = B*T rows, N = 4C, K = C), with matmul_set_sm90(0) (cuBLASLt's epilogues) and
matmul_set_sm90(1) (the Hopper kernel):
  fwd gelu:  pre = a @ w^T + bias, out = gelu(pre) (matmul_forward; cuBLASLt's GELU_AUX_BIAS), w (N, K);
  bwd dgelu: dinp = (dout @ wp) * gelu'(pre) (matmul_backward, dinp only; cuBLASLt's DGELU), the projection after
             the GeLU, wp (K, N); the Hopper path's time includes the transpose of wp into the scratch;
  bwd dgelu + dbias: the same with dinp_gelu_dbias (fc's bias gradient, += colsum(dinp)): on Hopper from the
             epilogue's column sums plus the finishing reduction, with cuBLASLt bias_backward on dinp after it;
the transpose alone (bf16_transpose of wp); bias_backward alone on dinp (M, N), the pass the fused sums replace;
and torch.matmul, plain bf16, of the same shape (the GEMM rate each row is compared with). The last line: what the
fused sums add to the Hopper GEMM against what bias_backward takes. CUDA events on
torch's stream, 3 warm-ups, median of --reps. Check: each path's outputs against an fp32 torch reference on the
same bf16 inputs (max |x - ref| / max |ref|, and ||x - ref|| / ||ref||), and the kernel's bits against cuBLASLt's
(the fraction of elements that differ: rounding-level differences of the fp32 sums' order).
--reps 0: no timing, one launch of each GEMM (ncu -k regex:gemm_sm90 -c 2 then profiles the kernel once each).
--sustain S: each row also run back to back for S seconds while nvidia-smi samples the SM clock and the power
(mean of the samples): whether a GEMM runs at a power-capped clock, and what the epilogue costs in clock.
"""
import argparse
import statistics
import subprocess
import time

from gpt2cu._native import load_kernels

k = load_kernels()  # before torch: gpt2cu's extension (and the cuBLASLt it links) loads first (bench_kernels.py)
import torch  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--M", type=int, default=65536)
ap.add_argument("--N", type=int, default=3072)
ap.add_argument("--K", type=int, default=768)
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--no-check", action="store_true")
ap.add_argument("--sustain", type=float, default=0.0)
args = ap.parse_args()
M, N, K = args.M, args.N, args.K
dev = "cuda"
stream = torch.cuda.current_stream().cuda_stream


def median_us(fn, reps=args.reps, per_event=1):
    """median over reps of the time of per_event back-to-back calls between two events, per call (per_event > 1
    for a kernel of a few us, whose single launch the host's launch latency would dominate)"""
    if reps <= 0:  # --reps 0: one launch of each GEMM (the check's), for a profiler
        return float("nan")
    for _ in range(3):
        fn()
    pairs = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(per_event):
            fn()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in pairs) / per_event


def sustained(fn, seconds=args.sustain):
    """mean SM clock (MHz) and power (W) that nvidia-smi reports while fn runs back to back"""
    if seconds <= 0:
        return None
    try:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-lms", "50"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    smi.terminate()
    out = smi.communicate()[0].split("\n")
    samples = []
    for line in out[len(out) // 4:]:  # the first samples may predate the load
        try:
            samples.append(tuple(float(v) for v in line.split(",")))
        except ValueError:
            pass
    if not samples:
        return None
    return (statistics.mean(c for c, _ in samples), statistics.mean(p for _, p in samples))


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
dbias = torch.zeros(N, device=dev, dtype=torch.bfloat16)  # fc's bias gradient (+= every call: timing only)
scratch_floats = k.matmul_backward_scratch_floats(M, N, K, False, True, True)
scratch = torch.empty(scratch_floats, device=dev, dtype=torch.float32)
wt = torch.empty(N, K, device=dev, dtype=torch.bfloat16)
P = lambda t: t.data_ptr()  # noqa: E731


def fwd():  # matmul_forward(out, gelu_pre, inp, weight, bias, residual, N rows, C = K, OC = N)
    k.matmul_forward(P(out), P(pre), P(a), P(w), P(bias), 0, M, K, N, stream)


def bwd():  # matmul_backward: dinp (rows, C = N) = dout (rows, OC = K) @ weight (OC, C) * gelu'(pre_in)
    k.matmul_backward(P(dinp), 0, 0, P(dout), 0, P(wp), P(pre_in), 0, P(scratch), scratch_floats, M, N, K, stream)


def bwd_dbias():  # the same, and dbias (N) += colsum(dinp)
    k.matmul_backward(P(dinp), 0, 0, P(dout), 0, P(wp), P(pre_in), P(dbias), P(scratch), scratch_floats, M, N, K,
                      stream)


def bias_pass():  # bias.cu alone on dinp: the pass bwd_dbias's fused sums replace
    k.bias_backward(P(dbias), P(dinp), P(scratch), scratch_floats, M, N, stream)


def transpose():  # wt (N, K) = wp (K, N)^T: the Hopper backward's first step
    k.bf16_transpose(P(wt), P(wp), K, N, stream)


flops = 2 * M * N * K
plain_a, plain_b = a, w.t()
torch_us = median_us(lambda: torch.matmul(plain_a, plain_b))
rate = flops / torch_us / 1e6
rows = [("torch.matmul bf16 (plain)", torch_us, sustained(lambda: torch.matmul(plain_a, plain_b)))]

refs = {}
if not args.no_check:
    ref_pre = a.float() @ w.float().t() + bias.float()
    refs["fwd gelu"] = (gelu(ref_pre), ref_pre)
    del ref_pre
    refs["bwd dgelu"] = ((dout.float() @ wp.float()) * gelu_grad(pre_in.float()),)
    refs["bwd dgelu + dbias"] = refs["bwd dgelu"]
checks, bits = [], {}
times = {}
prev = k.matmul_set_sm90(-1)
for on, name in ((0, "cuBLASLt"), (1, "gemm_sm90")):
    k.matmul_set_sm90(on)
    for what, fn, outs, labels in (("fwd gelu", fwd, (out, pre), ("out", "pre")),
                                   ("bwd dgelu", bwd, (dinp,), ("dinp",)),
                                   ("bwd dgelu + dbias", bwd_dbias, (dinp,), ("dinp",))):
        dbias.zero_()
        for o in outs:
            o.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        if what == "bwd dgelu + dbias":  # dbias against the exact column sums of the dinp just stored
            ref_db = dinp.double().sum(0)
            d = dbias.double() - ref_db
            checks.append([f"{name} {what} dbias (vs colsum of dinp)", float(d.abs().max() / ref_db.abs().max()),
                           float(d.norm() / ref_db.norm()), bool(torch.isfinite(dbias.float()).all())])
        for label, got, r in zip(labels, outs, refs.get(what, ())):
            d = (got.float() - r).abs()
            checks.append([f"{name} {what} {label}", float(d.max() / r.abs().max()), float(d.norm() / r.norm()),
                           bool(torch.isfinite(got.float()).all())])
            if on == 0:
                bits[(what, label)] = got.clone()
            else:
                checks[-1].append(float((got.view(torch.int16) != bits[(what, label)].view(torch.int16))
                                        .float().mean()))
        label = f"{name} {what}" + (" (transpose included)" if on == 1 and what.startswith("bwd") else "")
        rows.append((label, median_us(fn), sustained(fn)))
        times[(on, what)] = rows[-1][1]
# the fused sums' cost, A/B: the Hopper GEMM without and with them, alternating, 7 rounds (clock drift cancels)
k.matmul_set_sm90(1)
ab = {"plain": [], "dbias": []}
for r in range(7 if args.reps > 0 else 0):
    for key, fn in ((("plain", bwd), ("dbias", bwd_dbias)) if r % 2 == 0 else (("dbias", bwd_dbias), ("plain", bwd))):
        ab[key].append(median_us(fn))
k.matmul_set_sm90(prev)
transpose()
torch.cuda.synchronize()
transpose_exact = bool(torch.equal(wt, wp.t()))
transpose_us = median_us(transpose, per_event=50)
bias_us = median_us(bias_pass)

print("\ncheck (fp32 torch reference): max|x-ref|/max|ref|, ||x-ref||/||ref||, all finite, bits != cuBLASLt")
for c in checks:
    print(f"  {c[0]:<40} {c[1]:.2e}  {c[2]:.2e}  {c[3]}" + (f"  {100 * c[4]:.2f}%" if len(c) > 4 else ""))
print(f"\nM={M} N={N} K={K}: {flops / 1e9:.1f} GFLOP per GEMM; torch.matmul plain bf16 = {rate:.0f} TFLOP/s")
print(f"{'GEMM':<44} {'us':>8} {'TFLOP/s':>8} {'% torch':>8}" + ("  sustained: SM MHz, W" if args.sustain else ""))
for label, us, clk in rows:
    print(f"{label:<44} {us:>8.1f} {flops / us / 1e6:>8.1f} {100 * torch_us / us:>7.1f}%"
          + (f"  {clk[0]:6.0f} {clk[1]:6.0f}" if clk else ""))
print(f"{'bf16_transpose (' + str(K) + ', ' + str(N) + ') alone':<44} {transpose_us:>8.1f}   "
      f"{2 * 2 * K * N / transpose_us / 1e3:.0f} GB/s (read + written), exact: {transpose_exact}")
print(f"{'bias_backward (' + str(M) + ', ' + str(N) + ') alone':<44} {bias_us:>8.1f}   "
      f"{2 * M * N / bias_us / 1e3:.0f} GB/s (dinp read)")
if ab["plain"]:
    plain_us, dbias_us = statistics.median(ab["plain"]), statistics.median(ab["dbias"])
    added = dbias_us - plain_us
    print(f"\nA/B, 7 alternating rounds (median of medians): gemm_sm90 DGELU {plain_us:.1f} us, with the fused dbias "
          f"{dbias_us:.1f} us: +{added:.1f} us (epilogue sums + finish) against bias_backward's {bias_us:.1f} us: "
          f"{bias_us - added:+.1f} us saved per call, x12 layers = {12 * (bias_us - added) / 1e3:+.3f} ms per d12 step")
