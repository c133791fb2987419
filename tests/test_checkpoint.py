"""gpt2cu/checkpoint.py: the llm.c model file (fp32 and bf16 round trips, header, every error), the state
file (round trip, corruption detection) and the checkpoint directory (DONE markers, newest valid step,
pruning, world-size checks)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from gpt2cu.checkpoint import (CheckpointError, TrainingState, done_path, latest_checkpoint, load_training_state,
                               mark_done, model_path, prune_checkpoints, read_model, read_state, save_checkpoint,
                               state_path, write_model, write_state, write_training_state)
from gpt2cu.formats import HEADER_BYTES
from gpt2cu.models.gpt2 import GPTConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=8, max_seq_len=16, vocab_size=50, padded_vocab_size=64)


def params(seed=0):
    return np.random.default_rng(seed).normal(size=CFG.num_parameters()).astype(np.float32)


# ---- model file -------------------------------------------------------------------------------------

def test_model_round_trip_fp32(tmp_path):
    path = str(tmp_path / "m.bin")
    x = params()
    write_model(path, CFG, x)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:8]) == [20240326, 3, 16, 50, 2, 2, 8, 64] and not header[8:].any()
    assert os.path.getsize(path) == HEADER_BYTES + 4 * x.size
    cfg, y = read_model(path)
    assert cfg == CFG and y.dtype == np.float32 and np.array_equal(x, y)


def test_model_round_trip_bf16(tmp_path):
    path = str(tmp_path / "m.bin")
    x = params()
    write_model(path, CFG, x, dtype="bf16")
    assert np.fromfile(path, dtype=np.int32, count=2)[1] == 5
    assert os.path.getsize(path) == HEADER_BYTES + 2 * x.size
    cfg, y = read_model(path)
    assert cfg == CFG and y.dtype == np.float32
    np.testing.assert_allclose(y, x, rtol=2.0 ** -8, atol=0)


def test_model_write_errors(tmp_path):
    with pytest.raises(ValueError, match="needs"):
        write_model(str(tmp_path / "m.bin"), CFG, params()[:-1])
    with pytest.raises(ValueError, match="dtype"):
        write_model(str(tmp_path / "m.bin"), CFG, params(), dtype="fp16")
    assert os.listdir(tmp_path) == []  # no temporary left behind


def test_model_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_model(str(tmp_path / "missing.bin"))
    good = str(tmp_path / "good.bin")
    write_model(good, CFG, params())
    raw = bytearray(open(good, "rb").read())

    def variant(name, data):
        p = str(tmp_path / name)
        open(p, "wb").write(bytes(data))
        return p

    bad_magic = raw.copy()
    bad_magic[0:4] = np.int32(1234).tobytes()
    with pytest.raises(CheckpointError, match="not an llm.c model file"):
        read_model(variant("magic.bin", bad_magic))
    bad_version = raw.copy()
    bad_version[4:8] = np.int32(4).tobytes()
    with pytest.raises(CheckpointError, match="version 4"):
        read_model(variant("version.bin", bad_version))
    with pytest.raises(CheckpointError, match="truncated"):
        read_model(variant("short.bin", raw[:-4]))
    with pytest.raises(CheckpointError, match="trailing"):
        read_model(variant("long.bin", raw + b"\0" * 4))
    with pytest.raises(CheckpointError, match="not an llm.c model file"):
        read_model(variant("tiny.bin", raw[:100]))


# ---- state file -------------------------------------------------------------------------------------

FIELDS = dict(world_size=4, rank=2, zero_stage=1, step=1234)


def state_arrays(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {"m": rng.normal(size=n).astype(np.float32), "v": rng.random(n).astype(np.float32),
            "master": rng.normal(size=n).astype(np.float32)}


def test_state_round_trip(tmp_path):
    path = str(tmp_path / "s.bin")
    arrays = state_arrays()
    rng_state = np.random.default_rng(7).bit_generator.state  # 128-bit ints: JSON must keep them exact
    extra = {"train_loader": {"shard": 3, "position": 123456789012}, "rng": rng_state, "note": "é"}
    write_state(path, FIELDS, arrays, extra)
    fields, back, extra_back = read_state(path)
    assert fields == dict(FIELDS, has_master=True)
    assert list(back) == ["m", "v", "master"]
    for k in arrays:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], arrays[k])
    assert extra_back == extra
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:7]) == [20240527, 1, 4, 2, 1, 1234, 1]
    # the arrays start on a 64-byte boundary
    assert (os.path.getsize(path) - 3 * 4000) % 64 == 0

    write_state(path, FIELDS, {"m": arrays["m"], "v": arrays["v"]}, {})
    fields, back, _ = read_state(path)
    assert not fields["has_master"] and list(back) == ["m", "v"]


def test_state_corruption_is_detected(tmp_path):
    path = str(tmp_path / "s.bin")
    write_state(path, FIELDS, state_arrays(), {"k": 1})
    raw = open(path, "rb").read()
    size = len(raw)
    # a flipped byte anywhere: header field, JSON blob, array data
    for offset in (5 * 4, HEADER_BYTES + 20, size // 2, size - 1):
        bad = bytearray(raw)
        bad[offset] ^= 0x10
        open(path, "wb").write(bytes(bad))
        with pytest.raises(CheckpointError, match="corrupt|not a gpt2cu"):
            read_state(path)
    open(path, "wb").write(raw[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state(path)


def test_state_write_errors(tmp_path):
    path = str(tmp_path / "s.bin")
    with pytest.raises(ValueError, match="missing"):
        write_state(path, {"rank": 0}, {}, {})
    with pytest.raises(TypeError, match="float32"):
        write_state(path, FIELDS, {"m": np.zeros(3, np.float64)}, {})
    with pytest.raises(TypeError):
        write_state(path, FIELDS, {}, {"not json": object()})
    assert os.listdir(tmp_path) == []


# ---- checkpoint directory ---------------------------------------------------------------------------

def save(out, step, world=2, zero_stage=1, seed=0):
    """Every rank's part of a checkpoint, as the ranks would write it (the barrier is a no-op here since
    the ranks run one after the other; rank 0 goes last so DONE follows every state file)."""
    for rank in reversed(range(world)):
        state = TrainingState(zero_stage, state_arrays(100, seed + rank), {"step": step, "rank": rank})
        save_checkpoint(out, step, rank, world, lambda p: write_model(p, CFG, params(step)), state, lambda: None)


def test_save_and_load(tmp_path):
    out = str(tmp_path / "ckpt")
    save(out, 20)
    assert sorted(os.listdir(out)) == ["DONE_00000020", "model_00000020.bin", "state_00000020_00000.bin",
                                       "state_00000020_00001.bin"]
    assert latest_checkpoint(out) == 20
    for rank in range(2):
        state = load_training_state(out, 20, rank, 2, zero_stage=1)
        assert state.zero_stage == 1 and state.extra == {"step": 20, "rank": rank}
        assert np.array_equal(state.arrays["v"], state_arrays(100, rank)["v"])
    cfg, p = read_model(model_path(out, 20))
    assert cfg == CFG and np.array_equal(p, params(20))


def test_resume_checks(tmp_path):
    out = str(tmp_path)
    save(out, 10, world=2)
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 4"):
        load_training_state(out, 10, 0, 4, zero_stage=1)
    with pytest.raises(CheckpointError, match="ZeRO stage 1, this run uses 0"):
        load_training_state(out, 10, 0, 2, zero_stage=0)


def test_latest_checkpoint_skips_incomplete_steps(tmp_path):
    out = str(tmp_path)
    assert latest_checkpoint(out) is None
    assert latest_checkpoint(str(tmp_path / "nonexistent")) is None
    save(out, 10)
    save(out, 20)
    save(out, 30)
    os.unlink(done_path(out, 30))  # the run died before rank 0 marked step 30
    with open(state_path(out, 20, 1), "r+b") as f:  # and step 20's rank-1 file is torn
        f.truncate(HEADER_BYTES + 16)
    assert latest_checkpoint(out) == 10
    os.unlink(model_path(out, 10))
    assert latest_checkpoint(out) is None


def test_single_rank_checkpoint(tmp_path):
    out = str(tmp_path)
    write_training_state(out, 5, 0, 1, TrainingState(0, {"m": np.zeros(3, np.float32)}, {}))
    write_model(model_path(out, 5), CFG, params())
    assert latest_checkpoint(out) is None  # no DONE yet
    mark_done(out, 5, 1)
    assert latest_checkpoint(out) == 5
    assert load_training_state(out, 5, 0, 1, 0).arrays["m"].tolist() == [0, 0, 0]


def test_prune_keeps_newest_and_major(tmp_path):
    out = str(tmp_path)
    for step in (10, 20, 30, 40, 50):
        save(out, step)
    save(out, 60)
    os.unlink(done_path(out, 60))  # an in-progress save: never touched
    open(os.path.join(out, "model_00000030.bin.abc123.tmp"), "wb").close()  # debris of a crashed write
    open(os.path.join(out, "main.log"), "w").close()
    deleted = prune_checkpoints(out, keep=2, keep_every=20)
    assert deleted == [10, 30]
    left = sorted(os.listdir(out))
    assert not any("00000010" in n or "00000030" in n for n in left)
    assert "main.log" in left and "model_00000060.bin" in left
    assert [s for s in (10, 20, 30, 40, 50) if os.path.exists(done_path(out, s))] == [20, 40, 50]
    assert latest_checkpoint(out) == 50
    assert prune_checkpoints(out, keep=1) == [20, 40]
    assert latest_checkpoint(out) == 50 and os.path.exists(state_path(out, 60, 0))
    with pytest.raises(ValueError):
        prune_checkpoints(out, keep=0)
