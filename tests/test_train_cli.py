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


def _damage_truncate(out, step):
    path = out / f"state_{step:08d}_00000.bin"
    path.write_bytes(path.read_bytes()[:-100])


def _damage_flip_a_byte(out, step):
    path = out / f"state_{step:08d}_00000.bin"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the AdamW moments: only the checksum can tell
    path.write_bytes(bytes(data))


def _damage_remove_done(out, step):
    (out / f"DONE_{step:08d}").unlink()


def _damage_other_shape(out, step):
    from gpt2cu.checkpoint import write_model
    from gpt2cu.models.gpt2 import GPTConfig, init_params
    cfg = GPTConfig(n_layer=2, n_head=1, n_embd=64)
    write_model(str(out / f"model_{step:08d}.bin"), cfg, init_params(cfg))


@pytest.mark.parametrize("damage, reason", [
    (_damage_truncate, "truncated"),
    (_damage_flip_a_byte, "crc32"),
    (_damage_remove_done, "no DONE_00000004 marker"),
    (_damage_other_shape, "is not the run's"),
], ids=["truncated-state", "crc-mismatch", "no-done-marker", "model-of-another-shape"])
def test_resume_reports_an_unusable_newest_checkpoint(shards, tmp_path, damage, reason):
    train, val = shards
    out = tmp_path / "run"
    common = [*TINY, "-i", train, "-j", val, "-x", "6", "-n", "2", "-v", "0", "-o", str(out)]
    first = run_train(*common, "--stop-after", "4")
    assert first.returncode == 0, first.stderr
    damage(out, 4)
    resumed = run_train(*common, "-y", "1")
    assert resumed.returncode == 0, resumed.stderr
    skipped = [l for l in resumed.stdout.splitlines() if "skipping the checkpoint of step 4" in l]
    assert len(skipped) == 1 and reason in skipped[0], resumed.stdout
    assert "resumed from step 2" in resumed.stdout
    assert sorted(train_losses(resumed.stdout)) == [3, 4, 5, 6]


def test_max_steps_zero_only_evaluates_the_loaded_model(shards, tmp_path):
    """llm.c's -x 0: no optimization step; the step-0 val loss and sample of the model, then exit."""
    train, val = shards
    out = tmp_path / "eval"
    r = run_train(*TINY[:-2], "-i", train, "-j", val, "-x", "0", "-s", "5", "-g", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert train_losses(r.stdout) == {}
    assert "step     0 | val loss" in r.stdout and "step     0 | sample:" in r.stdout, r.stdout
    assert [l.split()[0] for l in (out / "main.log").read_text().splitlines()] == ["s:0"]


def test_learning_rate_zero_is_accepted_and_leaves_the_weights(shards, tmp_path):
    from gpt2cu.checkpoint import read_model
    train, val = shards
    out = tmp_path / "lr0"
    r = run_train(*TINY, "-i", train, "-j", val, "-x", "2", "-n", "2", "-v", "0", "-l", "0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(train_losses(r.stdout)) == [1, 2]
    from gpt2cu.models.gpt2 import GPTConfig
    from gpt2cu.models.gpt2 import init_params
    _, trained = read_model(str(out / "model_00000002.bin"))
    np.testing.assert_array_equal(trained, init_params(GPTConfig.from_descriptor("d1"), seed=42))


# llm.c's train_gpt2cu flags (its error_usage) with a value each, and the setting each must become here
LLMC_FLAGS = [
    ("-i", "train_*.bin", "train_data", "train_*.bin"), ("-j", "val_*.bin", "val_data", "val_*.bin"),
    ("-e", "d12", "model", "d12"), ("-o", "log124M", "output_dir", "log124M"),
    ("-n", "5000", "checkpoint_every", 5000), ("-nk", "3", "checkpoints_keep", 3),
    ("-nm", "10000", "major_checkpoint_every", 10000), ("-y", "1", "resume", 1),
    ("-b", "64", "batch_size", 64), ("-t", "1024", "seq_len", 1024), ("-d", "524288", "total_batch", 524288),
    ("-l", "0.0006", "learning_rate", 6e-4), ("-k", "cosine", "lr_schedule", "cosine"),
    ("-u", "700", "warmup", 700), ("-q", "0.0", "final_lr_frac", 0.0), ("-c", "0.1", "weight_decay", 0.1),
    ("-sl", "5.0", "skip_loss_z", 5.0), ("-sg", "5.0", "skip_norm_z", 5.0), ("-x", "18865", "max_steps", 18865),
    ("-v", "250", "val_every", 250), ("-m", "20", "val_max_steps", 20), ("-s", "20000", "sample_every", 20000),
    ("-g", "144", "gen_tokens", 144), ("-h", "1", "hellaswag", 1), ("-a", "1", "overfit_batch", 1),
    ("-w", "0", "master_weights", 0), ("-r", "0", "recompute", 0), ("-z", "1", "zero_stage", 1),
]


@pytest.mark.parametrize("flag, value, dest, expected", LLMC_FLAGS, ids=[f[0] for f in LLMC_FLAGS])
def test_llmc_flag_means_what_it_means_in_llmc(flag, value, dest, expected):
    from gpt2cu.train import parse_args
    extra = ["-o", "out"] if flag == "-y" else []
    args, _ = parse_args([flag, value, *extra])
    assert getattr(args, dest) == expected


def test_out_of_memory_message_ends_its_sentence_once():
    from gpt2cu.models.gpt2 import GPTConfig
    from gpt2cu.models.gpt2 import GPT, init_params

    class FullDevice:  # what CuPy raises, message ending in a period
        def zeros(self, shape, fp32=False, param=False):
            raise MemoryError("Out of memory allocating 1,024 bytes (allocated so far: 0 bytes).")
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, max_seq_len=8, vocab_size=16, padded_vocab_size=16)
    with pytest.raises(MemoryError) as info:
        GPT(cfg, FullDevice(), 1, 8, init_params(cfg))
    message = str(info.value)
    assert ".." not in message and "bytes). Try" in message, message
    assert "out of memory allocating the parameters" in message and "Try a smaller -b" in message
