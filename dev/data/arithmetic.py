"""Synthetic arithmetic for the RL demonstrations (README, "RL fine-tuning"): two-digit additions written
in the character vocabulary of gpt2cu/rl/text.py, one problem per document ("23+58=81", EOT before each).

The problems a+b with 10 <= a, b <= 99 (by default those without carries: "23+51=74", digit by digit,
which a tiny model learns in a few hundred steps on a CPU; --carries for all of them) are split once (fixed seed) into train problems and held-out ones.
The pretraining text is a noisy teacher: a fraction --noise of its answers is off by 1 or 10, so a model
pretrained on it gives wrong answers at about that rate even where it has learned the sum, and an exact-
match reward can remove what the noise taught. It writes into --output:

  arithmetic_train_000000.bin, arithmetic_val_000000.bin   token shards (llm.c's format) of train problems
  prompts_train.jsonl, prompts_heldout.jsonl                {"prompt": "23+58="} for PPO / GRPO
  pairs_train.jsonl, pairs_heldout.jsonl                    preference pairs with a hidden rule: of two
      answers one apart (the sum and a neighbour), the chosen one ends with an even digit
  init_model.bin (with --depth)                             a fresh model of the character vocabulary for
      `python -m gpt2cu.train -e` (llm.c's model file; the dN descriptors have GPT-2's vocabulary)

    python dev/data/arithmetic.py --depth 2 --channels 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from gpt2cu.checkpoint import write_model  # noqa: E402
from gpt2cu.data import write_shard  # noqa: E402
from gpt2cu.models.gpt2 import GPTConfig, init_params  # noqa: E402
from gpt2cu.rl.text import CHAR_PADDED_VOCAB, CHAR_VOCAB, CharCodec  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic")
MAX_SEQ_LEN = 18  # two documents of "<EOT>23+51=74"


def split_problems(heldout_frac: float, digits: int, carries: bool, seed: int = 0):
    """(train, held-out) lists of (a, b) of `digits`-digit operands; without carries, only those whose
    digits add up to at most 9."""
    low, high = (0, 10) if digits == 1 else (10 ** (digits - 1), 10 ** digits)
    problems = [(a, b) for a in range(low, high) for b in range(low, high)
                if carries or all((a // 10 ** i) % 10 + (b // 10 ** i) % 10 <= 9 for i in range(digits))]
    order = np.random.default_rng(seed).permutation(len(problems))
    n_heldout = int(len(problems) * heldout_frac)
    return [problems[i] for i in order[n_heldout:]], [problems[i] for i in order[:n_heldout]]


def noisy_answer(a: int, b: int, noise: float, rng) -> int:
    if rng.random() < noise:
        return max(0, a + b + int(rng.choice([-10, -1, 1, 10])))
    return a + b


def documents_tokens(problems, n_docs: int, noise: float, rng) -> np.ndarray:
    codec, tokens = CharCodec(), []
    for i in rng.integers(0, len(problems), n_docs):
        a, b = problems[i]
        tokens += [codec.eot] + codec.encode(f"{a}+{b}={noisy_answer(a, b, noise, rng)}")
    return np.array(tokens, np.uint16)


def preference_pairs(problems, rng) -> list:
    pairs = []
    for a, b in problems:
        s = a + b
        neighbour = s + int(rng.choice([-1, 1]))
        chosen, rejected = (s, neighbour) if s % 2 == 0 else (neighbour, s)
        pairs.append({"prompt": f"{a}+{b}=", "chosen": str(chosen), "rejected": str(rejected)})
    return pairs


def write_jsonl(path: str, records) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--train-docs", type=int, default=200_000, help="problems in the train shard")
    p.add_argument("--val-docs", type=int, default=2_000)
    p.add_argument("--noise", type=float, default=0.3, help="fraction of pretraining answers that are wrong")
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--digits", type=int, default=2, choices=(1, 2, 3), help="digits of each operand")
    p.add_argument("--carries", action="store_true",
                   help="all two-digit additions (default: those without carries, which a tiny model learns "
                        "in a few hundred CPU steps)")
    p.add_argument("--depth", type=int, default=None, help="also write init_model.bin with this many layers")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not 0 <= args.noise < 1 or not 0 < args.heldout_frac < 1:
        p.error("--noise must be in [0, 1) and --heldout-frac in (0, 1)")
    os.makedirs(args.output, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train, heldout = split_problems(args.heldout_frac, args.digits, args.carries)
    out = lambda name: os.path.join(args.output, name)
    write_shard(out("arithmetic_train_000000.bin"), documents_tokens(train, args.train_docs, args.noise, rng))
    write_shard(out("arithmetic_val_000000.bin"), documents_tokens(train, args.val_docs, args.noise, rng))
    write_jsonl(out("prompts_train.jsonl"), ({"prompt": f"{a}+{b}="} for a, b in train))
    write_jsonl(out("prompts_heldout.jsonl"), ({"prompt": f"{a}+{b}="} for a, b in heldout))
    write_jsonl(out("pairs_train.jsonl"), preference_pairs(train, rng))
    write_jsonl(out("pairs_heldout.jsonl"), preference_pairs(heldout, rng))
    if args.depth is not None:
        cfg = GPTConfig(n_layer=args.depth, n_head=args.heads, n_embd=args.channels, max_seq_len=MAX_SEQ_LEN,
                        vocab_size=CHAR_VOCAB, padded_vocab_size=CHAR_PADDED_VOCAB)
        write_model(out("init_model.bin"), cfg, init_params(cfg, seed=args.seed))
    print(f"wrote {args.output}: {len(train)} train and {len(heldout)} held-out problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
