"""Build-free check and timing of the attention kernels through libattn.so (dev/attn_sm90/build.sh).

    python3 dev/attn_sm90/check.py [--lib dev/attn_sm90/libattn.so] [--no-time] [--bwd]

Correctness: fresh random qkv (and dout) per case, compared with an fp32 torch reference on the upcast
bf16 inputs (||x - ref|| / ||ref||; lse max abs error); outputs poisoned with NaN first; each kernel run twice
and compared bit for bit. Timing: CUDA events, 3 warm-ups, median of --reps; TFLOP/s with causal FLOPs
(fwd 2*B*NH*T*(T+1)*HS, bwd 2.5 times that); cuDNN and FlashAttention-2 through torch SDPA on the same shapes.
--qkv-bias (with --bwd): each backward also with the qkv bias gradient (dqkv_bias +=, onto random values): checked
within one bf16 ulp (+ an fp32 slack) of the float64 column sums of the dqkv it stored, dqkv's bits unchanged; timed
in --rounds rotating rounds: the backward alone, with the fused sums ("+bias"), and followed by bias_backward on dqkv
("+bias_backward": the qkv matmul's bias pass the fused sums replace).
"""
import argparse
import ctypes
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--lib", default="dev/attn_sm90/libattn.so")
ap.add_argument("--no-time", action="store_true")
ap.add_argument("--no-check", action="store_true", help="timing only")
ap.add_argument("--bwd", action="store_true", help="also check/time the backward")
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--kinds", default="sm90v0,sm90v1,auto,fa2",
                help="forward kernels to check and time (sm90vN: attention_forward_sm90 variant N: 0 two consumer "
                     "warpgroups, 1 three (HS 64); fa2: mma.sync, "
                     "auto: the dispatch)")
ap.add_argument("--bwd-kinds", default="fa2,auto", help="backward kernels (fa2 = mma.sync, auto = the dispatch)")
ap.add_argument("--refs", default="cudnn,flash2", help="torch SDPA backends timed beside ours")
ap.add_argument("--qkv-bias", action="store_true", help="with --bwd: also the backward's dqkv_bias (see above)")
ap.add_argument("--rounds", type=int, default=3, help="--qkv-bias's timing rounds")
ap.add_argument("--profile", action="store_true",
                help="only run each --kinds forward (with --bwd, each --bwd-kinds backward too) twice on "
                     "--profile-shape")
ap.add_argument("--profile-shape", default="64,1024,12,64", help="B,T,NH,HS of --profile")
args = ap.parse_args()

lib = ctypes.CDLL(args.lib)
P = ctypes.c_void_p
I = ctypes.c_int
# the harness takes (NH, NKV, HS); this script times multi-head shapes (NKV = NH)
lib.h_fwd.argtypes = [P, P, P, I, I, I, I, I, P]
lib.h_fwd_sm90.argtypes = [P, P, P, I, I, I, I, I, I, P]
lib.h_bwd.argtypes = [P, P, P, P, P, P, ctypes.c_size_t, I, I, I, I, I, P]
lib.h_bwd_bias.argtypes = [P, P, P, P, P, P, ctypes.c_size_t, I, I, I, I, I, P, P]
lib.h_bias_backward.argtypes = [P, P, P, ctypes.c_size_t, I, I, P]
lib.h_bwd_scratch.argtypes = [I, I, I, I]
lib.h_bwd_scratch.restype = ctypes.c_size_t
lib.h_set_backend.argtypes = [I]
lib.h_backend_in_use.argtypes = [I, I, I, I]
dev = torch.device("cuda")
print(torch.cuda.get_device_name(), "torch", torch.__version__, "dispatch code (B=1,T=64,NH=1,HS=64):",
      lib.h_backend_in_use(1, 64, 1, 64), flush=True)


def stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def ck(rc, what):
    if rc != 0:
        raise RuntimeError(what + " failed")


def run_fwd(kind, out, lse, qkv, B, T, NH, HS, NKV=None):
    NKV = NKV or NH
    if kind == "fa2":
        lib.h_set_backend(1)
        ck(lib.h_fwd(out.data_ptr(), lse.data_ptr(), qkv.data_ptr(), B, T, NH, NKV, HS, stream()), "fwd fa2")
        lib.h_set_backend(0)
    elif kind == "auto":
        ck(lib.h_fwd(out.data_ptr(), lse.data_ptr(), qkv.data_ptr(), B, T, NH, NKV, HS, stream()), "fwd auto")
    else:
        v = int(kind[-1])
        ck(lib.h_fwd_sm90(out.data_ptr(), lse.data_ptr(), qkv.data_ptr(), B, T, NH, NKV, HS, v, stream()), kind)


def bwd_scratch(kind, B, T, NH, HS):
    """the scratch for `kind` (the Hopper backward needs more: attention_backward_scratch_floats asks the dispatch)"""
    lib.h_set_backend(1 if kind == "fa2" else 0)
    n = lib.h_bwd_scratch(B, T, NH, HS)
    lib.h_set_backend(0)
    return torch.empty(n, device=dev)


def run_bwd(kind, dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS, NKV=None, dbias=None):
    lib.h_set_backend(1 if kind == "fa2" else 0)
    ck(lib.h_bwd_bias(dqkv.data_ptr(), dout.data_ptr(), qkv.data_ptr(), out.data_ptr(), lse.data_ptr(),
                      scratch.data_ptr(), scratch.numel(), B, T, NH, NKV or NH, HS,
                      None if dbias is None else dbias.data_ptr(), stream()), "bwd " + kind)
    lib.h_set_backend(0)


def bias_off(dbias, start, dqkv):
    """columns where dbias (bf16, after +=) is off start + the float64 column sums of dqkv (as stored) by more than
    one bf16 ulp of the exact result + 2^-17 of the column's absolute sum (fp32 adds in the kernels' order)"""
    rows = dqkv.double().reshape(-1, dqkv.shape[-1])
    own = start.double() + rows.sum(0)
    ulp = torch.ldexp(torch.ones_like(own), torch.frexp(own).exponent - 8)
    slack = ulp + 2.0 ** -17 * (start.double().abs() + rows.abs().sum(0))
    return int(((dbias.double() - own).abs() > slack).sum())


def heads(x, B, T, NH, HS):
    return x.view(B, T, NH, HS).transpose(1, 2)


def reference(qkv, dout, B, T, NH, HS, NKV):
    """out, lse and d(qkv) of causal attention in fp32; NKV < NH: grouped-query (key/value head h // (NH // NKV))"""
    C = NH * HS
    x = qkv.float().requires_grad_()
    xq, xk, xv = x.split([C, NKV * HS, NKV * HS], dim=-1)
    q = heads(xq, B, T, NH, HS)
    k, v = (heads(t, B, T, NKV, HS).repeat_interleave(NH // NKV, dim=1) for t in (xk, xv))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(HS)
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).triu(1)
    s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v
    o = o.transpose(1, 2).reshape(B, T, C)
    dq = None
    if dout is not None:
        (dq,) = torch.autograd.grad(o, x, dout.float())
    return o.detach(), lse.detach(), dq


def rel(a, b):
    """||a - b|| / ||b||, or max |a - b| where b is all zeros (T = 1: dq = dk = 0 exactly)"""
    n = b.float().norm()
    if n == 0:
        return (a.float() - b.float()).abs().max().item()
    return ((a.float() - b.float()).norm() / n).item()


def poison(*ts):
    for t in ts:
        if t.dtype == torch.bfloat16:
            t.view(torch.int16).fill_(-1)  # 0xffff: a NaN
        else:
            t.fill_(float("nan"))


fails = []
rows = []
# (B, T, NH, HS[, NKV]); NKV < NH: grouped-query attention; (8, 1000, 12, 64) and the last ones: more work items
# than multiprocessors (the persistent grids' CTAs take several)
CASES = [(2, 1024, 3, 64), (2, 1000, 3, 64), (1, 77, 2, 64), (1, 1, 1, 64), (2, 129, 2, 64), (1, 2048, 2, 64),
         (2, 193, 2, 64), (8, 1000, 12, 64),
         (2, 1024, 2, 128), (3, 1000, 2, 128), (1, 77, 2, 128), (2, 200, 1, 128), (1, 1, 1, 128),
         (2, 1000, 6, 64, 2), (1, 300, 4, 128, 1), (4, 2048, 8, 64, 4), (3, 1900, 8, 128, 2), (4, 1000, 12, 64, 4)]
FWD_KINDS = args.kinds.split(",")
BWD_KINDS = args.bwd_kinds.split(",")
if args.profile:
    B, T, NH, HS = (int(x) for x in args.profile_shape.split(","))
    qkv = torch.randn(B, T, 3 * NH * HS, device=dev).to(torch.bfloat16)
    out = torch.empty(B, T, NH * HS, device=dev, dtype=torch.bfloat16)
    lse = torch.empty(B, NH, T, device=dev)
    for kind in FWD_KINDS:
        for _ in range(2):
            run_fwd(kind, out, lse, qkv, B, T, NH, HS)
    if args.bwd:
        dout = torch.randn_like(out)
        dqkv = torch.empty_like(qkv)
        for kind in BWD_KINDS:
            scratch = bwd_scratch(kind, B, T, NH, HS)
            for _ in range(2):
                run_bwd(kind, dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS)
    torch.cuda.synchronize()
    sys.exit(0)
torch.manual_seed(1234)
for case in [] if args.no_check else CASES:
    B, T, NH, HS = case[:4]
    NKV = case[4] if len(case) > 4 else NH
    C = NH * HS
    qkv = torch.randn(B, T, (NH + 2 * NKV) * HS, device=dev).to(torch.bfloat16)
    dout = torch.randn(B, T, C, device=dev).to(torch.bfloat16) if args.bwd else None
    ro, rl, rdq = reference(qkv, dout, B, T, NH, HS, NKV)
    for kind in FWD_KINDS:
        out = torch.empty(B, T, C, device=dev, dtype=torch.bfloat16)
        lse = torch.empty(B, NH, T, device=dev)
        res = []
        try:
            for rep in range(2):
                poison(out, lse)
                run_fwd(kind, out, lse, qkv, B, T, NH, HS, NKV)
                torch.cuda.synchronize()
                res.append((out.clone(), lse.clone()))
        except Exception as e:  # noqa: BLE001
            print(f"FWD {kind} {case} EXCEPTION {e}", flush=True)
            fails.append(("fwd", kind, case))
            torch.cuda.synchronize()
            continue
        eo, el = rel(out, ro), (lse - rl).abs().max().item()
        finite = bool(torch.isfinite(out.float()).all() and torch.isfinite(lse).all())
        det = bool(torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1]))
        ok = finite and eo < 1e-2 and el < 1e-2 and det
        print(f"FWD {kind:7s} B={B} T={T} NH={NH} NKV={NKV} HS={HS}: out rel {eo:.2e} lse max {el:.2e} finite {finite} "
              f"bitwise-repeat {det} -> {'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            fails.append(("fwd", kind, case))
            if finite:
                err = (out.float() - ro).abs().amax(dim=-1)  # (B, T)
                bad = (err > 0.05).nonzero()
                print("   bad rows (b, t) first 10:", bad[:10].tolist(), "count", bad.shape[0])
    if args.bwd:
        out = ro.to(torch.bfloat16)
        lse = rl.clone()
        run_fwd("fa2", out, lse, qkv, B, T, NH, HS, NKV)
        for kind in BWD_KINDS:
            dqkv = torch.empty_like(qkv)
            scratch = bwd_scratch(kind, B, T, NH, HS)
            res = []
            try:
                for rep in range(2):
                    poison(dqkv)
                    run_bwd(kind, dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS, NKV)
                    torch.cuda.synchronize()
                    res.append(dqkv.clone())
            except Exception as e:  # noqa: BLE001
                print(f"BWD {kind} {case} EXCEPTION {e}", flush=True)
                fails.append(("bwd", kind, case))
                continue
            widths = [C, NKV * HS, NKV * HS]
            parts = [rel(a, r) for a, r in zip(dqkv.split(widths, -1), rdq.split(widths, -1))]
            finite = bool(torch.isfinite(dqkv.float()).all())
            det = torch.equal(res[0], res[1])
            ok = finite and max(parts) < 2e-2 and det
            print(f"BWD {kind:7s} B={B} T={T} NH={NH} NKV={NKV} HS={HS}: dq/dk/dv rel {parts[0]:.2e} {parts[1]:.2e} "
                  f"{parts[2]:.2e} finite {finite} bitwise-repeat {det} -> {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                fails.append(("bwd", kind, case))
            if args.qkv_bias:
                start = torch.randn(qkv.shape[-1], device=dev).to(torch.bfloat16)
                got = []
                for rep in range(2):
                    dbias = start.clone()
                    poison(dqkv)
                    run_bwd(kind, dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS, NKV, dbias)
                    torch.cuda.synchronize()
                    got.append((dqkv.clone(), dbias))
                same = torch.equal(got[0][0], res[0])
                det = torch.equal(got[0][1], got[1][1]) and torch.equal(got[1][0], res[0])
                off = bias_off(got[0][1], start, got[0][0])
                ok = same and det and off == 0
                print(f"BIAS {kind:7s} B={B} T={T} NH={NH} NKV={NKV} HS={HS}: columns off {off} of {qkv.shape[-1]}, "
                      f"dqkv bits as without {same}, bitwise-repeat {det} -> {'ok' if ok else 'FAIL'}", flush=True)
                if not ok:
                    fails.append(("bias", kind, case))
    del qkv
torch.cuda.empty_cache()
print("correctness failures:", fails, flush=True)


def median_us(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in ev)


if not args.no_time:
    table = []
    for (B, T, NH, HS) in [(64, 1024, 12, 64), (64, 1024, 6, 128), (16, 2048, 32, 64)]:
        C = NH * HS
        flops = 2.0 * B * NH * T * (T + 1) * HS
        qkv = torch.randn(B, T, 3 * C, device=dev).to(torch.bfloat16)
        out = torch.empty(B, T, C, device=dev, dtype=torch.bfloat16)
        lse = torch.empty(B, NH, T, device=dev)
        q, k, v = (heads(t, B, T, NH, HS).contiguous() for t in qkv.split(C, dim=-1))
        res = {}
        for kind in FWD_KINDS:
            if any(f[0] == "fwd" and f[1] == kind for f in fails):
                continue
            res["fwd " + kind] = median_us(lambda: run_fwd(kind, out, lse, qkv, B, T, NH, HS), args.reps)
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
            if name not in args.refs.split(","):
                continue
            def f():
                with sdpa_kernel(be), torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                res["fwd " + name] = median_us(f, args.reps)
            except Exception as e:  # noqa: BLE001
                print(name, "fwd failed", e)
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(qg)

            def fb():
                with sdpa_kernel(be):
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                    return torch.autograd.grad(o, (qg, kg, vg), do)
            try:
                res["fwd+bwd " + name] = median_us(fb, args.reps)
                res["bwd " + name] = res["fwd+bwd " + name] - res["fwd " + name]
            except Exception as e:  # noqa: BLE001
                print(name, "fwd+bwd failed", e)
        if args.bwd:
            dout = torch.randn(B, T, C, device=dev).to(torch.bfloat16)
            dqkv = torch.empty_like(qkv)
            run_fwd("fa2", out, lse, qkv, B, T, NH, HS)
            for kind in BWD_KINDS:
                if any(f[0] == "bwd" and f[1] == kind for f in fails):
                    continue
                scratch = bwd_scratch(kind, B, T, NH, HS)
                res["bwd " + kind] = median_us(
                    lambda: run_bwd(kind, dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS), args.reps)
        if args.bwd and args.qkv_bias:
            dbias = torch.zeros(3 * C, device=dev, dtype=torch.bfloat16)
            scratch = bwd_scratch("auto", B, T, NH, HS)
            bscratch = torch.empty(-(-B * T // 256) * 3 * C, device=dev)
            ways = {
                "bwd auto (rounds)": lambda: run_bwd("auto", dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS),
                "bwd auto +bias": lambda: run_bwd("auto", dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS, None,
                                                  dbias),
                "bwd auto +bias_backward": lambda: (
                    run_bwd("auto", dqkv, dout, qkv, out, lse, scratch, B, T, NH, HS),
                    ck(lib.h_bias_backward(dbias.data_ptr(), dqkv.data_ptr(), bscratch.data_ptr(), bscratch.numel(),
                                           B * T, 3 * C, stream()), "bias_backward"))}
            times = {name: [] for name in ways}
            names = list(ways)
            for r in range(args.rounds):
                for name in names[r % 3:] + names[:r % 3]:
                    times[name].append(median_us(ways[name], args.reps))
            for name, ts in times.items():
                print(f"ROUNDS B={B} T={T} NH={NH} HS={HS} {name}: " + " ".join(f"{x:.1f}" for x in ts), flush=True)
                res[name] = statistics.median(ts)
        for key, us in res.items():
            fl = flops * (2.5 if key.startswith("bwd") else 3.5 if key.startswith("fwd+bwd") else 1.0)
            table.append((f"B={B} T={T} NH={NH} HS={HS}", key, us, fl / us / 1e6))
        del qkv, q, k, v
        torch.cuda.empty_cache()
    print("\n%-28s %-16s %10s %8s" % ("shape", "kernel", "us", "TFLOP/s"))
    for shape, key, us, tf in table:
        print("%-28s %-16s %10.1f %8.1f" % (shape, key, us, tf))
print("correctness failures:", fails)
sys.exit(1 if fails else 0)
