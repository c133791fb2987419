"""Rewards of completions: a Python function `module:function(prompts, completions) -> list[float]`, or
a reward model file (reward_model.py). Either way the rewards are checked (one per completion, finite)
and any problem is one InputError line. Two functions for the synthetic demonstrations are here too.
"""
from __future__ import annotations

import importlib
import math
import re
import sys

import numpy as np

from .reward_model import ScalarHeadModel, read_reward_model, sequence_scores
from .text import InputError, codec_for, document_tokens


def load_reward_function(spec: str):
    """The callable named by 'module:function' (the module importable from the current directory too)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise InputError(f"--reward {spec!r}: expected module:function")
    if "" not in sys.path:  # as `python -m` does: the user's module beside the command
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # whatever the import raised, the user's line is the same
        raise InputError(f"--reward {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--reward {spec!r}: {module_name} has no function {name}")
    return fn


def checked_rewards(reward_fn, prompts: list, completions: list) -> np.ndarray:
    """reward_fn's rewards as float64, after checking there is one finite number per completion."""
    try:
        rewards = [float(r) for r in reward_fn(prompts, completions)]
    except (TypeError, ValueError) as e:
        raise InputError(f"the reward function did not return a list of numbers ({e})") from None
    if len(rewards) != len(completions):
        raise InputError(f"the reward function returned {len(rewards)} rewards for {len(completions)} completions")
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise InputError(f"the reward function returned a non-finite reward ({rewards[bad[0]]}) for completion "
                         f"{bad[0]}: {completions[bad[0]]!r}")
    return np.array(rewards)


class RewardModelReward:
    """A reward model file as a reward function: the score of EOT + prompt + completion + EOT."""

    def __init__(self, path: str, policy_cfg, backend, rows: int, max_tokens: int):
        cfg, trunk, head = read_reward_model(path)
        if cfg.vocab_size != policy_cfg.vocab_size:
            raise InputError(f"{path}: the reward model's vocabulary has {cfg.vocab_size} tokens, the policy's "
                             f"{policy_cfg.vocab_size}")
        self.codec = codec_for(cfg)
        self.model = ScalarHeadModel(cfg, backend, rows, min(cfg.max_seq_len, max_tokens), trunk, head)

    def __call__(self, prompts, completions):
        eot = self.codec.eot
        seqs = [document_tokens(self.codec, p + c) + [eot] for p, c in zip(prompts, completions)]
        return sequence_scores(self.model, seqs, eot).tolist()


# ---- the synthetic tasks' rewards (dev/data/arithmetic.py) ----------------------------------------------

def arithmetic_exact_match(prompts, completions):
    """1 when the completion is exactly the sum the prompt asks for ("23+58=" -> "81"), else 0."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
        rewards.append(1.0 if completion == str(int(a) + int(b)) else 0.0)
    return rewards


def even_last_digit(prompts, completions):
    """The preference demonstration's hidden rule: 1 when the completion ends with an even digit."""
    return [1.0 if c and c[-1] in "02468" else 0.0 for c in completions]
