"""Train a reward model on preference pairs: `python -m gpt2cu.reward`.

    python -m gpt2cu.reward --init model.bin --pairs pairs_train.jsonl --val-pairs pairs_heldout.jsonl \
        -o reward_model.bin --steps 300

A GPT-2 trunk (started from --init: an llm.c model file or a Hugging Face directory) with a scalar head,
trained with the Bradley-Terry loss -log sigmoid(r(prompt + chosen) - r(prompt + rejected)) on JSONL
records {"prompt", "chosen", "rejected"}; held-out pairwise accuracy before and after. The file it writes
(formats.REWARD_MODEL_FILE) is what `python -m gpt2cu.ppo --reward-model` takes.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .optim import AdamWConfig
from .rl.reward_model import (ModelOptimizer, ScalarHeadModel, bradley_terry_step, encode_pairs, pairwise_accuracy,
                              write_reward_model)
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
    from .export import load_weights
    try:
        cfg, params = load_weights(args.init)
        codec = codec_for(cfg)
        pairs = encode_pairs(read_jsonl(args.pairs, PAIR_FIELDS), codec)
        val_pairs = encode_pairs(read_jsonl(args.val_pairs, PAIR_FIELDS), codec)
        backend = get_backend(args.backend)
    except (InputError, OSError, ValueError, RuntimeError, ImportError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    T = max(len(s) for pair in pairs + val_pairs for s in pair)
    if T > cfg.max_seq_len:
        p.exit(2, f"{p.prog}: error: a pair of {T} tokens exceeds the model's {cfg.max_seq_len} positions\n")
    model = ScalarHeadModel(cfg, backend, 2 * args.batch, T, params)
    optimizer = ModelOptimizer(backend, model.trunk, params, AdamWConfig(lr=args.lr), head=model.scalar_head)
    rng = np.random.default_rng(args.seed)
    before = pairwise_accuracy(model, val_pairs, codec.eot)
    print(f"{len(pairs)} train pairs, {len(val_pairs)} held-out; held-out pairwise accuracy before: {before:.4f}")
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in rng.choice(len(pairs), args.batch, replace=len(pairs) < args.batch)]
        loss, acc = bradley_terry_step(model, optimizer, batch, codec.eot, args.lr)
        if step % args.print_every == 0 or step == args.steps:
            print(f"step {step:5d}/{args.steps} | loss {loss:.4f} | batch accuracy {acc:.3f}", flush=True)
    after = pairwise_accuracy(model, val_pairs, codec.eot)
    write_reward_model(args.out, cfg, model.trunk.host_params(), model.host_head())
    print(f"held-out pairwise accuracy: {before:.4f} -> {after:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
