"""`python -m gpt2cu.train -e llama:dN` on the numpy backend, as a user runs it: a short run whose loss
falls, with val loss, sampling over the KV cache and checkpoints; bit-exact resume with gradient
accumulation and recompute; ZeRO-1 on two MPI ranks training the model one rank trains; the model file
exported to Hugging Face and sampled; bad input refused with one line and exit code 2."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_skewed_shards
from gpt2cu import checkpoint
from gpt2cu.models.llama import LlamaConfig, init_params
from test_train_cli import run_train, train_losses

TINY = ["-e", "llama:d2", "-b", "2", "-t", "32", "-l", "3e-3", "-u", "2", "-v", "0", "-s", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_skewed_shards(tmp_path_factory.mktemp("llama_shards"), {
        "train_000000.bin": 30_000, "val_000000.bin": 6_000})


def test_short_run_trains_evaluates_samples_and_exports(shards, tmp_path):
    train, val = shards
    out = tmp_path / "run"
    r = run_train(*TINY, "-i", train, "-j", val, "-x", "20", "-v", "10", "-m", "2", "-s", "20", "-g", "8",
                  "-n", "20", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "L=2 H=2 C=128" in r.stdout
    losses = train_losses(r.stdout)
    assert sorted(losses) == list(range(1, 21))
    assert np.mean([losses[s] for s in range(16, 21)]) < losses[1] - 2.0, losses
    assert "val loss" in r.stdout and "sample:" in r.stdout
    from gpt2cu.export import main as export_main
    from gpt2cu.sample import main as sample_main
    assert export_main([str(out / "model_00000020.bin"), str(tmp_path / "hf")]) == 0
    assert sample_main([str(tmp_path / "hf"), "-n", "4", "--backend", "numpy", "--temperature", "0"]) == 0


@pytest.mark.parametrize("accumulate, recompute", [(1, 0), (3, 2)], ids=["plain", "grad-accum-3-recompute-2"])
def test_resume_is_bit_exact(shards, tmp_path, accumulate, recompute):
    train, val = shards
    common = [*TINY, "-i", train, "-j", val, "-x", "8", "-n", "4", "-r", str(recompute),
              "-d", str(2 * 32 * accumulate)]
    full = run_train(*common, "-o", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part"
    assert run_train(*common, "-o", str(part), "--stop-after", "4").returncode == 0
    resumed = run_train(*common, "-o", str(part), "-y", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 4" in resumed.stdout
    a, b = train_losses(full.stdout), train_losses(resumed.stdout)
    assert sorted(b) == list(range(5, 9))
    assert all(a[s] == b[s] for s in range(5, 9)), (a, b)


def test_zero1_and_zero3_on_two_ranks_train_what_one_rank_trains(shards, tmp_path):
    from test_multirank import train as multirank_train, log_values
    pytest.importorskip("mpi4py")
    runs = {}
    settings = {"one rank": (1, "0", "1"), "ZeRO-1": (2, "1", "1"), "ZeRO-3 -r 3": (2, "3", "3")}
    for name, (ranks, zero, recompute) in settings.items():
        out = tmp_path / name.replace(" ", "_")
        code, stdout = multirank_train(ranks, out, shards, "-e", "llama:d2", "-z", zero, "-r", recompute)
        assert code == 0, stdout
        runs[name] = out
    cfg, pa = checkpoint.read_model(checkpoint.model_path(str(runs["one rank"]), 6))
    assert isinstance(cfg, LlamaConfig)
    la = log_values(runs["one rank"], "trl")
    for name in ("ZeRO-1", "ZeRO-3 -r 3"):
        lb = log_values(runs[name], "trl")
        assert sorted(la) == sorted(lb) and all(abs(la[s] - lb[s]) < 1e-4 for s in la), (name, la, lb)
        _, pb = checkpoint.read_model(checkpoint.model_path(str(runs[name]), 6))
        assert np.linalg.norm(pa - pb) <= 1e-3 * np.linalg.norm(pa), name


def bad_model_file(path, **shape):
    """An llm.c LLaMA model file whose header carries `shape` (checks a reader cannot skip)."""
    cfg = LlamaConfig(**{**dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=64), **shape})
    checkpoint.write_model(str(path), cfg, init_params(cfg))
    return cfg


def patch_header(path, **slots):
    ints = np.fromfile(path, dtype="<i4")
    for slot, value in slots.items():
        ints[int(slot.removeprefix("s"))] = value
    ints.tofile(path)


@pytest.mark.parametrize("case, needle", [
    ("kv_heads", "n_kv_head=2 does not divide n_head=3"),
    ("odd_head", "RoPE needs an even head dimension"),
    ("vocab", "vocabulary of 70,000 tokens is larger than -i's token shards can hold (65,536 ids"),
    ("descriptor", "unknown LLaMA descriptor"),
])
def test_bad_input_is_one_line_and_exit_2(shards, tmp_path, case, needle):
    train, val = shards
    model = tmp_path / "model.bin"
    if case == "kv_heads":  # [5] n_head, [6] n_kv_head, [7] n_embd: 3 heads of 16 channels, 2 kv heads
        bad_model_file(model, n_embd=48, n_head=3, n_kv_head=1)
        patch_header(model, s6=2)
    elif case == "odd_head":  # 16 channels over 16 heads: head size 1
        bad_model_file(model)
        patch_header(model, s5=16, s6=16)
    elif case == "vocab":
        bad_model_file(model, vocab_size=70_000, padded_vocab_size=70_016)
    flags = ["-e", "llama:x2"] if case == "descriptor" else ["-e", str(model)]
    r = run_train(*TINY, *flags, "-i", train, "-j", val, "-x", "2", timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
    assert len([l for l in r.stderr.splitlines() if "error" in l]) == 1, r.stderr  # after argparse's usage


@pytest.mark.parametrize("source", ["hf", "llmc"])
def test_training_starts_from_a_hugging_face_directory_or_an_llmc_file(shards, tmp_path, source):
    """-e with a LlamaForCausalLM directory or an llm.c LLaMA model file: its weights are step 0's (the val
    loss before any step equals the numpy model's on them)."""
    from gpt2cu.export import export_hf
    train, val = shards
    cfg = LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64, tied_embeddings=True)
    params = init_params(cfg, seed=7)
    path = tmp_path / "model"
    if source == "hf":
        export_hf(str(path), cfg, params)
    else:
        checkpoint.write_model(str(path), cfg, params)
    r = run_train(*TINY, "-e", str(path), "-i", train, "-j", val, "-x", "2", "-v", "2", "-m", "1",
                  "-o", str(tmp_path / "out"), "-n", "2")
    assert r.returncode == 0, r.stderr
    assert "L=1 H=4 C=64" in r.stdout
    written, _ = checkpoint.read_model(checkpoint.model_path(str(tmp_path / "out"), 2))
    assert written == cfg
    from gpt2cu.backends.numpy_ops import NumpyBackend
    from gpt2cu.data import DataLoader
    from gpt2cu.models.llama import Llama
    backend = NumpyBackend()
    model = Llama(cfg, backend, 2, 32, params)
    model.forward(backend.set_batch(*DataLoader(val, 2, 32).next_batch()))
    assert f"step     0 | val loss {backend.mean_loss(model.acts['losses']):.4f}" in r.stdout, r.stdout
