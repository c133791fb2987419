"""RL on several CPU ranks: `mpirun -np 2 python -m gpt2cu.ppo --backend numpy` (PPO and GRPO) and
`python -m gpt2cu.reward` must train what one rank trains on the same global batch, and resume per rank.

Every rollout row samples from its own generator (seed, step, row), so both runs sample the same
completions; the prompts here have one length, so the prefill covers the same positions whatever rows a
rank decodes together. What differs is the order of the float32 sums (the gradients averaged over the
ranks, each rank's minibatch share summed apart), ~1e-7 relative per step, amplified a little by Adam:
the logged statistics within 1e-4 and the final weights within 1e-3 relative norm per tensor, the
tolerances tests/test_multirank.py justifies for pretraining."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

from gpt2cu import checkpoint
from gpt2cu.checkpoint import write_model
from gpt2cu.models.gpt2 import GPTConfig, init_params, param_layout
from gpt2cu.rl.reward_model import read_reward_model
from gpt2cu.rl.text import CHAR_PADDED_VOCAB, CHAR_VOCAB
from test_dist import clean_env, run_ranks

TIMEOUT = 240
STEPS = 4
TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=18, vocab_size=CHAR_VOCAB,
                 padded_vocab_size=CHAR_PADDED_VOCAB)
# rewards that vary between completions (an untrained policy rarely earns the demonstrations' rewards,
# and a batch of equal rewards updates nothing)
REWARDS = "def varied(prompts, completions):\n    return [sum(map(ord, c)) % 7 / 7.0 for c in completions]\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_ranks")
    write_model(str(d / "policy.bin"), TINY, init_params(TINY, seed=0))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(10, 26)))
    (d / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(30, 37)))
    (d / "ranks_rewards.py").write_text(REWARDS)
    pairs = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10, 40)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:24]))
    (d / "val_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[24:]))
    return d


def launch(ranks: int, cwd, module: str, *flags):
    """(exit status, stdout + stderr) of python -m module on `ranks` ranks (1: no mpirun)."""
    env = clean_env()
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(cwd) + os.pathsep + env["PYTHONPATH"]  # the reward module
    return run_ranks(ranks, [sys.executable, "-m", module, "--backend", "numpy", *flags], TIMEOUT, env, cwd)


ALGO_FLAGS = {
    # PPO with the adaptive KL controller (its mean KL over all rows), whitening and the value head
    "ppo": ["--prompts-per-step", "8", "--minibatch", "4", "--kl-target", "0.05", "--kl-horizon", "40"],
    # GRPO: groups of 2 on one rank, 4 prompts (8 rows) a step
    "grpo": ["--algo", "grpo", "--prompts-per-step", "4", "--group-size", "2", "--minibatch", "4"],
}


def rl(ranks: int, work, out: str, algo: str, *flags):
    return launch(ranks, work, "gpt2cu.ppo", "--policy", "policy.bin", "--prompts", "prompts.jsonl",
                  "--reward", "ranks_rewards:varied", "--eval-prompts", "heldout.jsonl", "--eval-every", "2",
                  "--max-new-tokens", "3", "--epochs", "2", "--lr", "3e-3", "--steps", str(STEPS), "-n", "2",
                  "-o", out, *ALGO_FLAGS[algo], *flags)


def log_values(out) -> dict:
    """{(step, key): value} of a main.log."""
    text = open(os.path.join(out, "main.log")).read()
    return {(int(s), k): float(v) for s, k, v in re.findall(r"s:(\d+) (\w+):(\S+)", text)}


def assert_same_weights(a: str, b: str):
    cfg, pa = checkpoint.read_model(a)
    _, pb = checkpoint.read_model(b)
    layout = param_layout(cfg)
    for name, x in layout.views(pa).items():
        y = layout.views(pb)[name]
        assert np.linalg.norm(x - y) <= 1e-3 * max(np.linalg.norm(x), 1e-6), name


@pytest.fixture(scope="module")
def single(work):
    runs = {}
    for algo in ALGO_FLAGS:
        code, out = rl(1, work, f"single_{algo}", algo)
        assert code == 0, out
        runs[algo] = work / f"single_{algo}"
    return runs


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_ranks_match_one_rank(algo, work, single):
    code, out = rl(2, work, f"two_{algo}", algo)
    assert code == 0, out
    assert "ranks 2" in out and out.count("held-out mean reward:") == 1, "only rank 0 prints"
    two = work / f"two_{algo}"
    assert sorted(p.name for p in two.glob(f"state_{STEPS:08d}_*.bin")) == [
        f"state_{STEPS:08d}_{r:05d}.bin" for r in range(2)]
    one, many = log_values(single[algo]), log_values(two)
    assert sorted(one) == sorted(many)
    keys = {k for _, k in one}
    assert {"rwd", "kl", "ent", "clip", "evr"} <= keys and (algo == "grpo") == ("vloss" not in keys)
    for key, value in one.items():
        if key[1] not in ("rtok", "stok", "utok"):  # timings
            assert abs(value - many[key]) < 1e-4, (key, value, many[key])
    assert_same_weights(checkpoint.model_path(str(single[algo]), STEPS), checkpoint.model_path(str(two), STEPS))
    # the run learned something: the policy moved
    _, start = checkpoint.read_model(str(work / "policy.bin"))
    _, end = checkpoint.read_model(checkpoint.model_path(str(two), STEPS))
    assert np.abs(end - start).max() > 1e-3


def test_resume_on_two_ranks_continues_bit_for_bit(work, single):
    """Two ranks stopped after step 2 and resumed (-y 1) write the same step-4 policy as two ranks that ran
    through (each rank's optimizer state, the shared RNG and the KL coefficient are in its state file);
    one rank refuses their checkpoint with one line."""
    code, out = rl(2, work, "whole", "ppo")
    assert code == 0, out
    code, out = launch(2, work, "gpt2cu.ppo", *rl_args("parts", steps=2))
    assert code == 0, out
    code, out = launch(2, work, "gpt2cu.ppo", *rl_args("parts", steps=STEPS), "-y", "1")
    assert code == 0 and "resumed at step 2" in out, out
    whole = open(checkpoint.model_path(str(work / "whole"), STEPS), "rb").read()
    assert whole == open(checkpoint.model_path(str(work / "parts"), STEPS), "rb").read()
    code, out = launch(1, work, "gpt2cu.ppo", *rl_args("parts", steps=STEPS + 2), "-y", "1")
    assert code == 2 and "written by 2 ranks, this run has 1" in out, out
    assert out.strip().count("\n") == 0, out


def rl_args(out: str, steps: int):
    return ["--policy", "policy.bin", "--prompts", "prompts.jsonl", "--reward", "ranks_rewards:varied",
            "--eval-prompts", "heldout.jsonl", "--eval-every", "2", "--max-new-tokens", "3", "--epochs", "2",
            "--lr", "3e-3", "--steps", str(steps), "-n", "2", "-o", out, *ALGO_FLAGS["ppo"]]


def test_reward_model_on_two_ranks_matches_one_rank(work):
    runs = {}
    for ranks in (1, 2):
        code, out = launch(ranks, work, "gpt2cu.reward", "--init", "policy.bin", "--pairs", "pairs.jsonl",
                           "--val-pairs", "val_pairs.jsonl", "-o", f"rm_{ranks}.bin", "--steps", "6", "--batch", "4",
                           "--lr", "1e-2", "--print-every", "1")
        assert code == 0, out
        runs[ranks] = out
    numbers = {r: [float(x) for x in re.findall(r"(?:loss|accuracy[^\d]*?)\s*(-?\d+\.\d+)", out)]
               for r, out in runs.items()}
    assert len(numbers[1]) == len(numbers[2]) >= 6 * 2 + 2, runs
    np.testing.assert_allclose(numbers[2], numbers[1], atol=1e-4)
    _, trunk1, head1 = read_reward_model(str(work / "rm_1.bin"))
    _, trunk2, head2 = read_reward_model(str(work / "rm_2.bin"))
    for a, b in ((trunk1, trunk2), (head1, head2)):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a)
