"""`python -m gpt2cu.plan`: memory per rank of a training run, by group, without a GPU (the table the
trainer prints at start-up, from the same code: memory.plan), and with --gpu-memory the smallest number
of ranks whose share fits.

  python -m gpt2cu.plan -e gpt3:175B -b 1 -t 2048 --ranks 64 -z 3 -r 3 --gpu-memory 141
"""
from __future__ import annotations

import argparse
import sys

from .memory import format_bytes, plan, table
from .models import config_from_descriptor
from .models.gpt2 import RECOMPUTE_LEVELS
from .zero import ZERO_STAGES

MAX_RANKS = 1 << 20


def smallest_fitting_ranks(total_bytes, limit: int) -> int | None:
    """The smallest N in [1, MAX_RANKS] with total_bytes(N) <= limit (memory per rank shrinks as N grows:
    found by doubling, then bisecting), or None."""
    high = 1
    while total_bytes(high) > limit:
        if high >= MAX_RANKS:
            return None
        high *= 2
    low = high // 2  # does not fit (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if total_bytes(mid) <= limit else (mid, high)
    return high


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2cu.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("-e", dest="model", required=True, help="descriptor: dN (GPT-2) or gpt3:SIZE")
    p.add_argument("-b", dest="batch_size", type=int, required=True, help="per-rank micro-batch B")
    p.add_argument("-t", dest="seq_len", type=int, required=True, help="sequence length T")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("-z", dest="zero_stage", type=int, default=0, choices=ZERO_STAGES)
    p.add_argument("-r", dest="recompute", type=int, default=1, choices=RECOMPUTE_LEVELS)
    p.add_argument("-w", dest="master_weights", type=int, default=1, choices=(0, 1))
    p.add_argument("--backend", default="cuda", choices=("cuda", "numpy"))
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="device memory in GB (10^9 bytes; an H200 has 141): the smallest --ranks that fits")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or args.ranks < 1:
        p.error("-b, -t and --ranks must be >= 1")
    try:
        cfg = config_from_descriptor(args.model)
    except ValueError as e:
        p.error(str(e))
    if args.seq_len > cfg.max_seq_len:
        p.error(f"-t {args.seq_len} exceeds the model's max sequence length {cfg.max_seq_len}")

    def groups(ranks):
        return plan(cfg, args.batch_size, args.seq_len, ranks, args.zero_stage, args.recompute, args.backend,
                    bool(args.master_weights))

    print(f"{args.model}: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} params {cfg.num_parameters():,} | "
          f"B={args.batch_size} T={args.seq_len} | ranks {args.ranks} | ZeRO-{args.zero_stage} | "
          f"recompute {args.recompute} | {args.backend}")
    print("memory per rank:")
    print(table(groups(args.ranks)))
    if args.gpu_memory is not None:
        limit = int(args.gpu_memory * 1e9)
        fits = smallest_fitting_ranks(lambda n: sum(groups(n).values()), limit)
        if fits is None:
            print(f"does not fit in {args.gpu_memory:g} GB on up to {MAX_RANKS:,} ranks at ZeRO-{args.zero_stage} "
                  f"(what no rank count shrinks: activations {format_bytes(groups(MAX_RANKS)['activations'])})")
        else:
            print(f"smallest number of ranks that fits {args.gpu_memory:g} GB: {fits} "
                  f"({format_bytes(sum(groups(fits).values()))} per rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
