"""Train a reward model on preference pairs: `python -m gpt2cu.reward`.

    python -m gpt2cu.reward --init model.bin --pairs pairs_train.jsonl --val-pairs pairs_heldout.jsonl \
        -o reward_model.bin --steps 300

A GPT-2 trunk (started from --init: an llm.c model file or a Hugging Face directory) with a scalar head,
trained with the Bradley-Terry loss -log sigmoid(r(prompt + chosen) - r(prompt + rejected)) on JSONL
records {"prompt", "chosen", "rejected"}; held-out pairwise accuracy before and after. The file it writes
(formats.REWARD_MODEL_FILE) is what `python -m gpt2cu.ppo --reward-model` takes.

Data-parallel under mpirun (`mpirun -np 2 python -m gpt2cu.reward ...`): every rank holds the whole model,
the --batch pairs of a step (the same draw on every rank) are split over the ranks, the gradients averaged
(ZeRO-0), the loss and the accuracies summed over the ranks; rank 0 prints and writes the file.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .optim import AdamWConfig
from .rl.reward_model import (ModelOptimizer, ScalarHeadModel, bradley_terry_step, encode_pairs, pairwise_accuracy,
                              rank_share, write_reward_model)
from .rl.text import InputError, codec_for, read_jsonl

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2cu.reward", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the trunk's starting weights: llm.c model file or HF directory")
    p.add_argument("--pairs", required=True, help="JSONL preference pairs to train on")
    p.add_argument("--val-pairs", required=True, help="held-out JSONL preference pairs")
    p.add_argument("-o", dest="out", required=True, help="the reward model file to write")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--print-every", type=int, default=25)
    p.add_argument("--backend", default="auto", choices=("auto", "numpy", "cuda"))
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or not args.lr > 0:
        p.error("--steps and --batch must be >= 1 and --lr > 0")

    from .backends import get_backend
    from .dist import abort_on_failure, init_distributed, install_abort_on_exception
    try:
        backend = get_backend(args.backend)
        comm = init_distributed(backend.name)
    except (RuntimeError, ValueError, ImportError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    install_abort_on_exception(comm)
    with abort_on_failure(comm):  # a rank that exits alone would leave the others waiting in a collective
        return train(args, p, backend, comm)


def train(args, p, backend, comm) -> int:
    from .export import load_weights
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    fail = lambda message: p.exit(2, f"{p.prog}: error: {message}\n" if comm.rank == 0 else None)
    if args.batch % comm.world_size:
        fail(f"--batch {args.batch} does not split over {comm.world_size} ranks")
    backend.select_device(comm.local_rank)
    comm.use_stream(backend.stream)  # NCCL collectives queue behind the backend's work
    try:
        cfg, params = load_weights(args.init)
        codec = codec_for(cfg)
        pairs = encode_pairs(read_jsonl(args.pairs, PAIR_FIELDS), codec)
        val_pairs = encode_pairs(read_jsonl(args.val_pairs, PAIR_FIELDS), codec)
    except (InputError, OSError, ValueError, RuntimeError, ImportError) as e:
        fail(e)
    T = max(len(s) for pair in pairs + val_pairs for s in pair)
    if T > cfg.max_seq_len:
        fail(f"a pair of {T} tokens exceeds the model's {cfg.max_seq_len} positions")
    local = args.batch // comm.world_size
    model = ScalarHeadModel(cfg, backend, 2 * local, T, params, comm=comm)
    optimizer = ModelOptimizer(backend, model.trunk, params, AdamWConfig(lr=args.lr), head=model.scalar_head)
    rng = np.random.default_rng(args.seed)  # the same draws on every rank
    before = pairwise_accuracy(model, val_pairs, codec.eot)
    say(f"{len(pairs)} train pairs, {len(val_pairs)} held-out; held-out pairwise accuracy before: {before:.4f}")
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in rng.choice(len(pairs), args.batch, replace=len(pairs) < args.batch)]
        loss, acc = bradley_terry_step(model, optimizer, batch[rank_share(args.batch, comm)], codec.eot, args.lr)
        if step % args.print_every == 0 or step == args.steps:
            say(f"step {step:5d}/{args.steps} | loss {loss:.4f} | batch accuracy {acc:.3f}", flush=True)
    after = pairwise_accuracy(model, val_pairs, codec.eot)
    trunk, head = model.trunk.host_params(), model.host_head()
    if comm.rank == 0:
        write_reward_model(args.out, cfg, trunk, head)
    comm.barrier()  # the file is complete when any rank returns
    say(f"held-out pairwise accuracy: {before:.4f} -> {after:.4f}; wrote {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
