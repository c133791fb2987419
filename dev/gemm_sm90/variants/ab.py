"""A/B of gemm_sm90 variants (ctypes libs) at the LM head's shape and fc's, plus torch.matmul in the same process.
    python3 ab.py LIBS [SECTIONS]   LIBS: comma-separated variant names (build.sh); SECTIONS: lm,fc (default) or dgelu"""
import ctypes, os, sys
import torch
libs = {n: ctypes.CDLL(os.path.join(os.environ.get("AB_DIR", "/tmp/gemm_sm90_variants"), f"lib_{n}.so")) for n in sys.argv[1].split(",")}
s = torch.cuda.current_stream()
sp = ctypes.c_void_p(s.cuda_stream)
P = lambda t: ctypes.c_void_p(t.data_ptr())
def timeit(fn, reps=10, rounds=5):
    best = []
    for _ in range(rounds):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); [fn() for _ in range(reps)]; e1.record(); e1.synchronize()
        best.append(e0.elapsed_time(e1) * 1e3 / reps)
    return best
sections = (sys.argv[2] if len(sys.argv) > 2 else "lm,fc").split(",")
def run(label, fns, flops):
    t = {k: [] for k in fns}
    for r in range(4):  # rotate
        for k, fn in fns.items():
            fn(); t[k] += timeit(fn, rounds=2)
    for k in fns:
        us = min(t[k]); print(f"{label:10s} {k:22s} {us:9.1f} us  {flops / us / 1e6:7.1f} TFLOP/s", flush=True)
if "dgelu" in sections:  # fc's shape: each variant's DGelu, without and with the column sums
    M, N, K = 65536, 3072, 768
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16); w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16); pre = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    colsum = torch.empty(M // 128, N, device="cuda")
    fns = {}
    for n, l in libs.items():
        fns[f"dgelu {n}"] = lambda l=l: l.ab_dgelu(P(out), ctypes.c_void_p(0), P(a), P(w), P(pre), M, N, K, sp)
        fns[f"dgelu+sums {n}"] = lambda l=l: l.ab_dgelu(P(out), P(colsum), P(a), P(w), P(pre), M, N, K, sp)
    fns["gelu main"] = lambda: libs["main"].ab_gelu(P(out), P(pre), P(a), P(w), ctypes.c_void_p(0), M, N, K, sp)
    fns["torch.matmul"] = lambda: torch.matmul(a, w.t(), out=out)
    run("fc", fns, 2 * M * N * K)
    del a, w, out, pre, colsum
if "lm" not in sections and "fc" not in sections:
    sys.exit(0)
# LM head shape
M, N, K = 8192, 50304, 768
a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16); w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
shift = torch.randn(M, device="cuda") ; out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
rs = torch.empty(N // 128, M, device="cuda"); pre = torch.empty_like(out)
fns = {f"exp {n}": (lambda l=l: l.ab_exp(P(out), P(rs), P(a), P(w), P(shift), M, N, K, 50257, sp)) for n, l in libs.items()}
fns["gelu main(rowmajor)"] = lambda: libs["main"].ab_gelu(P(out), P(pre), P(a), P(w), ctypes.c_void_p(0), M, N, K, sp)
fns["torch.matmul"] = lambda: torch.matmul(a, w.t(), out=out)
run("LM", fns, 2 * M * N * K)
del out, pre, rs
# fc shape
M, N, K = 65536, 3072, 768
a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16); w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
shift = torch.randn(M, device="cuda"); out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
rs = torch.empty(N // 128, M, device="cuda"); pre = torch.empty_like(out); bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
fns = {f"exp {n}": (lambda l=l: l.ab_exp(P(out), P(rs), P(a), P(w), P(shift), M, N, K, N, sp)) for n, l in libs.items()}
fns["gelu main"] = lambda: libs["main"].ab_gelu(P(out), P(pre), P(a), P(w), P(bias), M, N, K, sp)
fns["dgelu main"] = lambda: libs["main"].ab_dgelu(P(out), ctypes.c_void_p(0), P(a), P(w), P(pre), M, N, K, sp)
fns["torch.matmul"] = lambda: torch.matmul(a, w.t(), out=out)
run("fc", fns, 2 * M * N * K)
