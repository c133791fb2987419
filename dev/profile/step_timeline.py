"""The trainer's step as it runs (graphs replayed, the GPU at its own clocks): every kernel's time from a
CUPTI trace (torch.profiler), per step the wall time, the kernels' busy time and the idle gaps, then the
kernels of one step summed by name. ncu's per-kernel table times each kernel alone; this one shows what
the step itself spends.

    python dev/profile/step_timeline.py [--model d12] [--batch-size 64] [--recompute 0] [--out DIR] [--tuning]

torch is imported only after the warm-up steps (the kernels' plans and graphs are made first).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from bench_train import random_batches  # noqa: E402

from gpt2cu.backends import get_backend  # noqa: E402
from gpt2cu.data import InMemoryBatches  # noqa: E402
from gpt2cu.dist import SingleProcess  # noqa: E402
from gpt2cu.models import config_from_descriptor, family_of  # noqa: E402
from gpt2cu.optim import AdamWConfig  # noqa: E402
from gpt2cu.trainer import TrainConfig, Trainer  # noqa: E402

STEP_START = "encoder_forward"  # the first kernel of a step (wte_* kernels are the encoder's backward)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--recompute", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the kernels (start us, end us, name) as JSON here")
    ap.add_argument("--tuning", action="store_true",
                    help="also print the cuBLASLt tuner's log: each GEMM shape's candidates timed and the one run")
    args = ap.parse_args()
    cfg = config_from_descriptor(args.model)
    backend = get_backend("cuda")
    config = TrainConfig(batch_size=args.batch_size, seq_len=args.T, max_steps=args.steps + 5,
                         recompute=args.recompute, adamw=AdamWConfig(lr=6e-4, weight_decay=0.1),
                         lr_schedule="constant", seed=0)
    trainer = Trainer(cfg, family_of(cfg).init_params(cfg, seed=0), backend, SingleProcess(), config,
                      InMemoryBatches(random_batches(cfg, args.batch_size, args.T, 4)))
    for _ in range(5):
        trainer.step()
    backend.synchronize()
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        unread = []  # as python -m gpt2cu.train steps: a step's result read once the next one is queued
        for _ in range(args.steps):
            unread.append(trainer.step_async())
            if len(unread) > 1:
                unread.pop(0).result()
        for pending in unread:
            pending.result()
        backend.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "timeline.json"), "w") as f:
            json.dump(kernels, f)
    starts = [i for i, k in enumerate(kernels) if STEP_START in k[2]] + [len(kernels)]
    steps = [kernels[a:b] for a, b in zip(starts, starts[1:])]
    for s, ks in enumerate(steps):
        wall = ks[-1][1] - ks[0][0]
        period = (f", {(steps[s + 1][0][0] - ks[0][0]) / 1e3:.2f} ms to the next step's first kernel"
                  if s + 1 < len(steps) else "")
        busy = sum(e - b for b, e, _ in ks)
        gaps = [ks[i + 1][0] - ks[i][1] for i in range(len(ks) - 1)]
        print(f"step {s}: {len(ks)} kernels and copies, {wall / 1e3:.2f} ms first to last, busy {busy / 1e3:.2f} ms, "
              f"idle {sum(g for g in gaps if g > 0) / 1e3:.2f} ms ({sum(g > 5 for g in gaps)} gaps > 5 us){period}")
    middle = steps[len(steps) // 2]
    total = collections.defaultdict(lambda: [0.0, 0])
    for b, e, name in middle:
        total[name[:100]][0] += e - b
        total[name[:100]][1] += 1
    print(f"step {len(steps) // 2} by kernel: ms, calls, us a call")
    for name, (us, calls) in sorted(total.items(), key=lambda x: -x[1][0]):
        if us >= 20:
            print(f"{us / 1e3:8.3f} {calls:5d} {us / calls:9.1f}  {name}")
    if args.tuning:
        print("cuBLASLt's choices (matmul_tuning_report):")
        sys.stdout.write(backend.k.matmul_tuning_report())


if __name__ == "__main__":
    main()
