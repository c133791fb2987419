"""Energy per FLOP of gemm_sm90's variants (ctypes libs from build.sh) against torch.matmul (cuBLAS, plain) at the LM
head's shape (the Exp epilogue) and fc's (the GeLU forward's): each run back to back for a few seconds, so at the clock the power limit sets, with
the board's energy over that window (gpt2cu.energy, NVML). Variant "main" runs with clusters of 2 CTAs and of 1.
    python3 energy.py LIBS [SECONDS [all]]   LIBS: comma-separated variant names (build.sh), e.g. main,plain,nostore"""
import ctypes, os, sys, time
import torch
from gpt2cu.energy import EnergyMeter

libs = {n: ctypes.CDLL(os.path.join(os.environ.get("AB_DIR", "/tmp/gemm_sm90_variants"), f"lib_{n}.so"))
        for n in sys.argv[1].split(",")}
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
meter = EnergyMeter.open_cuda(torch.cuda.current_device())
if meter is None:
    sys.exit(f"energy.py: {EnergyMeter.why_not}")
sp = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
P = lambda t: ctypes.c_void_p(t.data_ptr())


def sustained(fn):
    """(us a call, J a call, W, SM MHz) over `seconds` of back-to-back calls after 0.5 s of them"""
    t0 = time.time()
    while time.time() - t0 < 0.5:
        [fn() for _ in range(10)]
        torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    meter.start()
    e0.record()
    calls, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        [fn() for _ in range(10)]
        calls += 10
        torch.cuda.synchronize()
    e1.record()
    e1.synchronize()
    r = meter.stop()
    return e0.elapsed_time(e1) * 1e3 / calls, r.joules / calls, r.watts, r.sm_mhz


def run(label, fns, flops):
    rows = {k: [] for k in fns}
    for order in (list(fns), list(fns)[::-1]):  # two rounds, the second reversed: drift hits both ends alike
        for k in order:
            cluster = 1 if k.endswith("cluster 1") else 2
            for lib in libs.values():
                lib.ab_set_cluster(cluster)
            rows[k].append(sustained(fns[k]))
    for k, rs in rows.items():
        for us, j, w, mhz in rs:
            print(f"{label:3s} {k:24s} {us:8.1f} us {flops / us / 1e6:6.0f} TFLOP/s {j / flops * 1e12:6.3f} pJ/FLOP "
                  f"{w:4.0f} W {mhz:5.0f} MHz", flush=True)


# the LM head's shape with the Exp epilogue (its M-inner tile order), fc's with the GeLU forward's (row-major);
# with "all" as the third argument also fcproj's backward (DGelu with fc's column sums) and attproj's forward
# (Residual) and backward (HeadDot, head size 64)
shapes = {"LM": (8192, 50304, 768), "fc": (65536, 3072, 768)}
if sys.argv[3:4] == ["all"]:
    shapes.update({"dgelu": (65536, 3072, 768), "res": (65536, 768, 768), "hdot": (65536, 768, 768)})
for label, (M, N, K) in shapes.items():
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    shift, bias = torch.randn(M, device="cuda"), torch.randn(N, device="cuda", dtype=torch.bfloat16)
    out, pre = torch.empty(M, N, device="cuda", dtype=torch.bfloat16), torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    rs, sums = torch.empty(N // 64, M, device="cuda"), torch.empty(-(-M // 128), N, device="cuda")  # (hdot: N / 64 heads)
    calls = {  # the kernel's call for one lib
        "LM": lambda l: l.ab_exp(P(out), P(rs), P(a), P(w), P(shift), M, N, K, 50257, sp),
        "fc": lambda l: l.ab_gelu(P(out), P(pre), P(a), P(w), P(bias), M, N, K, sp),
        "dgelu": lambda l: l.ab_dgelu(P(out), P(sums), P(a), P(w), P(pre), M, N, K, sp),
        "res": lambda l: l.ab_residual(P(out), P(a), P(w), P(bias), P(pre), M, N, K, sp),
        "hdot": lambda l: l.ab_head_dot(P(out), P(rs), P(a), P(w), P(pre), M, N, K, 1024, 64, sp),
    }[label]
    kind = {"LM": "exp", "fc": "gelu"}.get(label, label)
    fns = {f"{kind} {n}": (lambda l=l: calls(l)) for n, l in libs.items()}
    if "main" in libs:
        fns[f"{kind} main, cluster 1"] = fns[f"{kind} main"]
    fns["torch.matmul"] = lambda: torch.matmul(a, w.t(), out=out)
    run(label, fns, 2 * M * N * K)
    del a, w, out, pre, rs, sums
