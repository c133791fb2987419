"""Norm backward A/B in one process: libraries built from several trees' layernorm.cu + rmsnorm.cu (wrap.cu), called
by ctypes on the same inputs.

  python3 ab.py [--rounds R] main=main.so new=new.so ...   the first library is the reference
    1. bits: every output (dinp, dweight, dbias, dinp_sum) of every library compared as integers with the
       reference's, at GPT-2's shape and at odd ones (rows not a multiple of the 64-row block, a last block shorter
       than the ring, threads that own no channels, C = 2048's 48 KB ring), LayerNorm with and without dinp_sum and
       RMSNorm; scratch poisoned with NaN first;
    2. timings at N = 65536, C = 768: R rounds, the libraries' order rotating each round, per library and round the
       median of 3 CUDA-event timings of 3 calls back to back (us per call); LayerNorm with dinp_sum (as the model calls it) and RMSNorm; also
       the two column sums alone (the same launches as a layernorm call's, from the reference library).
  python3 ab.py --ncu main=... new=...   one LayerNorm call (dinp_sum) of each library at GPT-2's shape, for ncu
  python3 ab.py --ncu-summary raw.csv    the lines of interest of `ncu -i REP --page raw --csv`
"""
import argparse
import csv
import ctypes
import re
import statistics
import sys

GPT2 = (65536, 768)
# (op, N, C, dinp_sum): GPT-2's; a partial last block; a last block of 2 rows (< the ring's 4); 25 of 32 threads own
# channels; C = 2048 (the ring at 48 KB: past the default shared-memory limit); one block of 3 rows
CASES = [("ln", *GPT2, True), ("ln", 4004, 768, True), ("ln", 4004, 768, False), ("ln", 130, 1600, True),
         ("ln", 1000, 200, False), ("ln", 67, 2048, True), ("ln", 3, 64, True),
         ("rms", *GPT2, False), ("rms", 4004, 1024, False), ("rms", 130, 200, False), ("rms", 67, 2048, False)]


def ncu_summary(path):
    rows = list(csv.reader(open(path)))
    head, units, body = rows[0], rows[1], [r for r in rows[2:] if len(r) == len(rows[0])]
    col = {name: i for i, name in enumerate(head)}

    def get(r, name):
        return (r[col[name]] + " " + units[col[name]]).strip() if name in col else "?"
    stall = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")
    for r in body:
        name = get(r, "Kernel Name")
        short = "norm_backward" if "norm_backward" in name else "column_sum_add" if "column_sum" in name else name[:40]
        print(f"NCU {short} (id {get(r, 'ID')}): {get(r, 'gpu__time_duration.sum')}, "
              f"dram {get(r, 'dram__throughput.avg.pct_of_peak_sustained_elapsed')} of peak, "
              f"read {get(r, 'dram__bytes_read.sum')}, write {get(r, 'dram__bytes_write.sum')}, "
              f"regs {get(r, 'launch__registers_per_thread')}, "
              f"blocks/SM limits: regs {get(r, 'launch__occupancy_limit_registers')}, "
              f"smem {get(r, 'launch__occupancy_limit_shared_mem')}; achieved occupancy "
              f"{get(r, 'sm__warps_active.avg.pct_of_peak_sustained_active')}, issue active "
              f"{get(r, 'smsp__issue_active.avg.pct_of_peak_sustained_active')}, SM clock "
              f"{get(r, 'smsp__cycles_elapsed.avg.per_second')}")
        if short != "norm_backward":
            continue
        stalls = []
        for name, i in col.items():
            m = stall.fullmatch(name)
            if m:
                try:
                    stalls.append((float(r[i].replace(",", "")), m.group(1)))
                except ValueError:
                    pass
        stalls.sort(reverse=True)
        print("NCU   top stalls (warps per issued instruction): " + ", ".join(f"{n} {v:.2f}" for v, n in stalls[:6]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ncu-summary")
    ap.add_argument("libs", nargs="*")
    args = ap.parse_args()
    if args.ncu_summary:
        return ncu_summary(args.ncu_summary)
    import cupy as cp

    libs = {a.split("=")[0]: ctypes.CDLL(a.split("=")[1]) for a in args.libs}
    names = list(libs)
    stream = cp.cuda.Stream(non_blocking=True)
    stream.use()  # cupy's own work (inputs, copies) on the libraries' stream: ordered with their launches
    gen = cp.random.default_rng(0)
    P = lambda a: ctypes.c_void_p(a.data.ptr)  # noqa: E731

    def bf16(shape, scale=1.0):  # random bf16 bits (fp32 truncated)
        x = gen.standard_normal(shape, dtype=cp.float32) * scale
        return (x.view(cp.uint32) >> 16).astype(cp.uint16)

    def make(N, C):
        return dict(dout=bf16((N, C)), inp=bf16((N, C)), w=bf16(C), dinp=bf16((N, C), 0.1), dw=bf16(C), db=bf16(C),
                    mean=gen.standard_normal(N, dtype=cp.float32) * 0.1,
                    rstd=cp.abs(gen.standard_normal(N, dtype=cp.float32)) + 0.5,
                    ds=gen.standard_normal(C, dtype=cp.float32))

    def call(lib, op, t, o, N, C, dinp_sum, scratch):
        if op == "ln":
            lib.ab_layernorm_backward(P(o["dinp"]), P(o["dw"]), P(o["db"]), P(t["dout"]), P(t["inp"]), P(t["w"]),
                                      P(t["mean"]), P(t["rstd"]), P(scratch), ctypes.c_size_t(scratch.size), N, C,
                                      ctypes.c_void_p(stream.ptr), P(o["ds"]) if dinp_sum else None)
        else:
            lib.ab_rmsnorm_backward(P(o["dinp"]), P(o["dw"]), P(t["dout"]), P(t["inp"]), P(t["w"]), P(t["rstd"]),
                                    P(scratch), ctypes.c_size_t(scratch.size), N, C, ctypes.c_void_p(stream.ptr))

    outs = ("dinp", "dw", "db", "ds")
    if args.ncu:
        N, C = GPT2
        t = make(N, C)
        scratch = cp.zeros(3 * C * (N // 64 + 1), cp.float32)
        for name in names:
            o = {k: t[k].copy() for k in outs}
            call(libs[name], "ln", t, o, N, C, True, scratch)
            stream.synchronize()
            print(f"ncu call {name} done")
        return

    all_same = True
    for op, N, C, dinp_sum in CASES:
        t = make(N, C)
        res = {}
        for name in names:
            scratch = cp.full(3 * C * (N // 64 + 1), cp.nan, cp.float32)
            o = {k: t[k].copy() for k in outs}
            call(libs[name], op, t, o, N, C, dinp_sum, scratch)
            stream.synchronize()
            res[name] = o
        for name in names[1:]:
            diff = {k: int((res[name][k].view(cp.uint16 if k != "ds" else cp.uint32) !=
                            res[names[0]][k].view(cp.uint16 if k != "ds" else cp.uint32)).sum()) for k in outs}
            same = not any(diff.values())
            all_same &= same
            print(f"BITS {op} N={N} C={C} dinp_sum={int(dinp_sum)} {name} vs {names[0]}: "
                  + ("identical" if same else "DIFF " + str(diff)), flush=True)
        del t, res
    print(f"BITS all {len(CASES)} cases identical: {all_same}")

    N, C = GPT2
    t = make(N, C)
    scratch = cp.zeros(3 * C * (N // 64 + 1), cp.float32)
    o = {name: {k: t[k].copy() for k in outs} for name in names}
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def timed(f):  # us per call: the median of 3 samples of 3 calls back to back (the first launch's latency / 3)
        ts = []
        for _ in range(3):
            start.record(stream)
            for _ in range(3):
                f()
            end.record(stream)
            end.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / 3)
        return statistics.median(ts)

    rows = []
    for op, dinp_sum in (("ln", True), ("rms", False)):
        times = {name: [] for name in names}
        sums = []
        for _ in range(3):  # warm-up
            for name in names:
                call(libs[name], op, t, o[name], N, C, dinp_sum, scratch)
        stream.synchronize()
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timed(lambda: call(libs[name], op, t, o[name], N, C, dinp_sum, scratch)))
            if op == "ln":
                ref = o[names[0]]
                sums.append(timed(lambda: libs[names[0]].ab_layernorm_column_sums(
                    P(ref["dw"]), P(ref["db"]), P(ref["ds"]), P(scratch), N, C, ctypes.c_void_p(stream.ptr))))
        for name in names:
            print(f"ROUNDS {op} {name}: " + " ".join(f"{x:.1f}" for x in times[name]))
        label = "layernorm bwd (dinp_sum)" if op == "ln" else "rmsnorm bwd"
        rows.append((label, [(statistics.median(times[n]), min(times[n])) for n in names]))
        if sums:
            rows.append(("  its 2 column sums alone", [(statistics.median(sums), min(sums))] + [None] * (len(names) - 1)))
    # DRAM floor of the row traffic: dout, inp, dinp read, dinp written (bf16), partials not counted
    print(f"\n== us per call, N={N} C={C}: median (min) over {args.rounds} rounds (each the median of 3 x 3 calls); "
          f"row traffic {4 * N * C * 2 / 1e6:.1f} MB (its floor at 4.24 TB/s: {4 * N * C * 2 / 4.24e6:.1f} us)")
    print("%-26s" % "" + "".join("%18s" % n for n in names) + "".join("%12s" % f"{n}/{names[0]}" for n in names[1:]))
    for label, vals in rows:
        line = "%-26s" % label + "".join("%18s" % (f"{v[0]:.1f} ({v[1]:.1f})" if v else "") for v in vals)
        if vals[1] is not None:
            line += "".join("%12.3f" % (v[0] / vals[0][0]) for v in vals[1:])
        print(line)


if __name__ == "__main__":
    sys.exit(main())
