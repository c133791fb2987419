"""The trainer's command line on the numpy backend: flag errors, a short run whose loss falls,
checkpoints, and bit-exact resume. Runs `python -m gpt2cu.train` as a user would."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_skewed_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*flags, cwd=REPO, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gpt2cu.train", "--backend", "numpy", *flags], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_skewed_shards(tmp_path_factory.mktemp("shards"), {
        "train_000000.bin": 40_000, "train_000001.bin": 30_000, "val_000000.bin": 8_000})


TINY = ["-e", "d1", "-b", "2", "-t", "32", "-l", "3e-3", "-u", "2", "-v", "5", "-m", "2", "-s", "0"]


def train_losses(stdout: str) -> dict:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss ([\d.]+)", stdout)}


@pytest.mark.parametrize("flags, needle", [
    (["-b", "0"], "-b must be >= 1"),
    (["-t", "-5"], "-t must be >= 1"),
    (["-k", "triangle"], "-k must be one of"),
    (["-q", "1.5"], "-q must be in [0, 1]"),
    (["-y", "1"], "-y 1 needs -o"),
    (["-r", "7"], "argument -r"),
    (["-e", "gpt5"], "-e gpt5"),
    (["--bogus", "1"], "unrecognized arguments"),
    (["-b", "2", "-t", "32", "-d", "100"], "-d 100 is not divisible"),
    (["-i", "/nonexistent/train_*.bin", "-j", "/nonexistent/val_*.bin"], "/nonexistent/train_*.bin"),
])
def test_bad_flags_exit_2_naming_the_flag(flags, needle):
    r = run_train(*TINY, *flags, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
    assert len([l for l in r.stderr.splitlines() if "error" in l]) == 1, r.stderr


def test_help_lists_llmc_flags():
    r = run_train("--help", timeout=60)
    assert r.returncode == 0
    for flag in ("-i", "-j", "-o", "-e", "-b", "-t", "-d", "-x", "-k", "-l", "-u", "-q", "-c", "-v", "-m", "-s",
                 "-g", "-n", "-nk", "-y", "-r", "-z", "-sl", "-sg", "-h", "-a", "-w", "--backend"):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", r.stdout), flag


def test_short_run_loss_falls_and_logs(shards, tmp_path):
    train, val = shards
    out = tmp_path / "run"
    r = run_train(*TINY, "-i", train, "-j", val, "-x", "30", "-o", str(out))
    assert r.returncode == 0, r.stderr
    losses = train_losses(r.stdout)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 2.0, losses
    log = (out / "main.log").read_text().splitlines()
    assert "s:1 trl:" in log[1] or any(l.startswith("s:1 trl:") for l in log)
    assert any(re.fullmatch(r"s:30 tel:[\d.]+", l) for l in log), log
    assert any(re.fullmatch(r"s:0 tel:[\d.]+", l) for l in log), log


@pytest.mark.parametrize("accumulate", [1, 3], ids=["one-micro-step", "grad-accum-3"])
def test_resume_is_bit_exact(shards, tmp_path, accumulate):
    """The trainer reads each next batch while the current one computes (the next step's first during
    the last micro-step): a checkpoint must save the loader's state from before that read."""
    train, val = shards
    common = [*TINY, "-i", train, "-j", val, "-x", "12", "-n", "6", "-v", "0", "-d", str(2 * 32 * accumulate)]
    full = run_train(*common, "-o", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    # same run, interrupted after the step-6 checkpoint: a run with -x 6 writes it at its last step
    part = tmp_path / "part"
    first = run_train(*common, "-o", str(part), "--stop-after", "6")
    assert first.returncode == 0, first.stderr
    assert (part / "model_00000006.bin").exists()
    resumed = run_train(*common, "-o", str(part), "-y", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 6" in resumed.stdout
    a, b = train_losses(full.stdout), train_losses(resumed.stdout)
    assert sorted(b) == list(range(7, 13))
    for s in range(7, 13):
        assert a[s] == b[s], (s, a[s], b[s])
    # the resumed run keeps appending to main.log
    log = (part / "main.log").read_text()
    assert "s:6 trl:" in log and "s:12 trl:" in log


def test_keep_newest_checkpoints(shards, tmp_path):
    train, val = shards
    out = tmp_path / "keep"
    r = run_train(*TINY, "-i", train, "-j", val, "-x", "8", "-n", "2", "-nk", "2", "-v", "0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    models = sorted(p.name for p in out.glob("model_*.bin"))
    assert models == ["model_00000006.bin", "model_00000008.bin"], models
