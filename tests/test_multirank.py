"""Several ranks on the CPU, through the same code path a GPU run takes: `mpirun -np N python -m
gpt2cu.train --backend numpy` with -z 0 (all-reduce), -z 1 (ZeRO-1: reduce-scatter, sharded AdamW,
all-gather), -z 2 (gradients reduce-scattered per layer inside every micro-step's backward, kept as a
shard) and -z 3 (parameters sharded too, each layer gathered before its forward and backward) must train
the same model as one rank with the same total batch, and resume per rank.

Tolerance: the ranks' gradients are averaged in a different order than one rank sums its batch, so the
results differ by fp32 reduction rounding (~1e-7 relative per step), amplified a little by Adam over a
few steps: losses within 1e-4 and final weights within 1e-3 relative norm per tensor (Adam divides by
sqrt(v): where the true gradient is ~0, as for the key bias that softmax ignores, rounding noise takes
steps of size ~lr, so those elements differ far more than the rest). ZeRO-2/3 add one more rounding per
micro-step (each micro-step's reduced gradient is added into the shard): the same bounds hold."""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

from gpt2cu import checkpoint
from conftest import write_skewed_shards
from gpt2cu.models.gpt2 import param_layout
from test_dist import clean_env, run_ranks

TIMEOUT = 240
STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_skewed_shards(tmp_path_factory.mktemp("mr_shards"), {"train_000000.bin": 20_000,
                                                                       "val_000000.bin": 4_000})


def train(ranks: int, out, shards, *flags):
    train_glob, val_glob = shards
    # total batch 2 x 4 x 32 tokens: 2 micro-steps of 4 rows, split over the ranks
    argv = [sys.executable, "-m", "gpt2cu.train", "--backend", "numpy", "-e", "d1", "-b", str(4 // ranks), "-t", "32",
            "-d", str(2 * 4 * 32), "-i", train_glob, "-j", val_glob, "-x", str(STEPS), "-l", "3e-3", "-u", "2",
            "-c", "0.1", "-v", "3", "-m", "2", "-s", "0", "-n", "3", "-o", str(out), *flags]
    env = dict(clean_env(), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return run_ranks(ranks, argv, TIMEOUT, env)


def log_values(out, key):
    text = open(os.path.join(out, "main.log")).read()
    return {int(s): float(v) for s, v in re.findall(rf"s:(\d+) {key}:([\d.]+)", text)}


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    code, stdout = train(1, out, shards)
    assert code == 0, stdout
    return out


def assert_same_training(a, b):
    la, lb = log_values(a, "trl"), log_values(b, "trl")
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-4, (s, la[s], lb[s])
    va, vb = log_values(a, "tel"), log_values(b, "tel")
    assert sorted(va) == sorted(vb) and all(abs(va[s] - vb[s]) < 1e-4 for s in va), (va, vb)
    cfg, pa = checkpoint.read_model(checkpoint.model_path(str(a), STEPS))
    _, pb = checkpoint.read_model(checkpoint.model_path(str(b), STEPS))
    layout = param_layout(cfg)
    for name, x in layout.views(pa).items():
        y = layout.views(pb)[name]
        assert np.linalg.norm(x - y) <= 1e-3 * max(np.linalg.norm(x), 1e-6), name


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_ranks_match_one_rank(ranks, zero, shards, single, tmp_path):
    # -z 3 runs with -r 3 (whole-block recompute), which trains bit-identically to -r 1 on one rank
    recompute = ["-r", "3"] if zero == 3 else []
    code, stdout = train(ranks, tmp_path, shards, "-z", str(zero), *recompute)
    assert code == 0, stdout
    assert f"ranks {ranks} | ZeRO-{zero}" in stdout
    assert stdout.count("| val loss") == 3, "only rank 0 prints"
    states = sorted(p.name for p in tmp_path.glob(f"state_{STEPS:08d}_*.bin"))
    assert states == [f"state_{STEPS:08d}_{r:05d}.bin" for r in range(ranks)]
    assert_same_training(single, tmp_path)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_resume_per_rank(zero, shards, single, tmp_path):
    code, stdout = train(2, tmp_path, shards, "-z", str(zero), "--stop-after", "3")
    assert code == 0, stdout
    code, stdout = train(2, tmp_path, shards, "-z", str(zero), "-y", "1")
    assert code == 0, stdout
    assert "resumed from step 3" in stdout
    assert_same_training(single, tmp_path)
    if zero == 1:  # the step-6 checkpoint was written by 2 ranks: resuming it with 4 must say so and stop every rank
        code, stdout = train(4, tmp_path, shards, "-z", "1", "-y", "1")
        assert code != 0
        assert "written by 2 ranks, this run has 4" in stdout


@pytest.mark.parametrize("ranks", [2, 4])
def test_overlapped_all_reduce_is_identical(ranks, shards, tmp_path):
    """--overlap-comm starts each layer's all-reduce from inside the last micro-step's backward; the
    collectives are the same as without it, so the run is bit-identical."""
    runs = {}
    for name, flags in (("plain", []), ("overlap", ["--overlap-comm"])):
        out = tmp_path / name
        code, stdout = train(ranks, out, shards, "-z", "0", *flags)
        assert code == 0, stdout
        runs[name] = out
    assert (runs["plain"] / "main.log").read_text() == (runs["overlap"] / "main.log").read_text()
    a = open(checkpoint.model_path(str(runs["plain"]), STEPS), "rb").read()
    assert a == open(checkpoint.model_path(str(runs["overlap"]), STEPS), "rb").read()
