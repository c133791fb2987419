"""Shard format, header checks, the DataLoader (windows, rank striding, shuffling, resume) and the
default corpus's cache."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2cu.corpus import default_corpus, stdlib_sources
from gpt2cu.data import DataLoader, ShardError, load_shard_tokens, read_shard_header, write_shard
from gpt2cu.formats import HEADER_BYTES, SHARD
from gpt2cu.tokenizer import EOT

VOCAB = 50257


def random_tokens(n):
    return np.random.default_rng().integers(0, VOCAB, size=n, dtype=np.uint16)


def make_shards(tmp_path, sizes):
    """Shards data_000.bin, ... of the given sizes; returns (glob pattern, list of token arrays)."""
    shards = [random_tokens(n) for n in sizes]
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"data_{i:03d}.bin", tokens)
    return str(tmp_path / "data_*.bin"), shards


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_shard_round_trip(tmp_path):
    tokens = random_tokens(1000)
    path = tmp_path / "a.bin"
    write_shard(path, tokens)
    assert os.path.getsize(path) == HEADER_BYTES + 2 * 1000
    assert read_shard_header(path) == 1000
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [SHARD.magic, 1, 1000]
    loaded = load_shard_tokens(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left behind


def test_write_shard_rejects_tokens_outside_uint32(tmp_path):
    for bad in (np.array([1, 2**32]), np.array([-1, 5])):  # 65536 goes to a version-7 shard (test_llama_files)
        with pytest.raises(ValueError, match="uint32"):
            write_shard(tmp_path / "a.bin", bad)
    assert not list(tmp_path.iterdir())


def corrupt(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype="<i4").tobytes())


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, 0, 12345), "bad magic 12345"),
    (lambda p: corrupt(p, 4, 7), "unsupported shard version 7"),
    (lambda p: os.truncate(p, os.path.getsize(p) - 2), "truncated or corrupt"),
    (lambda p: corrupt(p, 8, 99999), "truncated or corrupt"),
    (lambda p: os.truncate(p, 100), "truncated header"),
])
def test_bad_shard_errors_name_the_file(tmp_path, damage, message):
    path = tmp_path / "bad.bin"
    write_shard(path, random_tokens(100))
    damage(path)
    for read in (read_shard_header, load_shard_tokens, lambda p: DataLoader(p, 1, 4)):
        with pytest.raises(ShardError, match=message) as err:
            read(path)
        assert str(path) in str(err.value)


def test_missing_file_and_empty_glob(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_shard_header(missing)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        DataLoader(missing, 1, 4)
    pattern = str(tmp_path / "train_*.bin")
    with pytest.raises(FileNotFoundError, match="no files match") as err:
        DataLoader(pattern, 1, 4)
    assert pattern in str(err.value)


def test_shard_too_short_for_one_batch(tmp_path):
    pattern, _ = make_shards(tmp_path, [200, 64])
    DataLoader(pattern, 3, 21)  # 3*21+1 = 64 tokens: just enough
    with pytest.raises(ShardError, match=r"data_001\.bin: 64 tokens .* 2\*8\*4\+1 = 65"):
        DataLoader(pattern, 2, 8, rank=1, world_size=4)


def test_windows_are_the_expected_slices(tmp_path):
    B, T = 3, 5
    pattern, shards = make_shards(tmp_path, [3 * B * T + 7, 2 * B * T + 1])
    loader = DataLoader(pattern, B, T)
    assert loader.num_tokens == sum(s.size for s in shards)
    assert loader.num_batches_per_epoch == 3 + 2
    for shard, samples in ((shards[0], 3), (shards[1], 2)):
        for s in range(samples):
            x, y = loader.next_batch()
            window = shard[s * B * T:(s + 1) * B * T + 1].astype(np.int32)
            assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (B, T)
            np.testing.assert_array_equal(x, window[:-1].reshape(B, T))
            np.testing.assert_array_equal(y, window[1:].reshape(B, T))
    # epoch wrap: back to the first shard's first window
    x, _ = loader.next_batch()
    np.testing.assert_array_equal(x, shards[0][:B * T].reshape(B, T))
    assert loader.epoch == 1


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_see_the_rows_of_one_big_batch(tmp_path, world_size, shuffle):
    B, T = 2, 8
    pattern, _ = make_shards(tmp_path, [5 * world_size * B * T + 3, 3 * world_size * B * T + 1, 4000])
    single = DataLoader(pattern, world_size * B, T, shuffle=shuffle, seed=7)
    ranks = [DataLoader(pattern, B, T, rank=r, world_size=world_size, shuffle=shuffle, seed=7)
             for r in range(world_size)]
    assert {r.num_batches_per_epoch for r in ranks} == {single.num_batches_per_epoch}
    for _ in range(single.num_batches_per_epoch + 3):  # past an epoch boundary
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_shuffle_is_deterministic_and_a_permutation_per_epoch(tmp_path):
    B, T = 2, 4
    sizes = [10 * B * T + 1, 7 * B * T + 5, 12 * B * T + 1]
    pattern, shards = make_shards(tmp_path, sizes)
    # a window is identified by its tokens; random tokens make every window distinct
    all_windows = sorted(shard[s * B * T:(s + 1) * B * T + 1].tobytes()
                         for shard, n in zip(shards, sizes) for s in range((n - 1) // (B * T)))
    a = DataLoader(pattern, B, T, shuffle=True, seed=1)
    b = DataLoader(pattern, B, T, shuffle=True, seed=1)
    plain = DataLoader(pattern, B, T)
    n = a.num_batches_per_epoch
    assert n == len(all_windows) == 10 + 7 + 12

    def epoch_windows(loader):
        out = []
        for x, y in batches(loader, n):
            out.append(np.append(x.ravel(), y.ravel()[-1]).astype(np.uint16).tobytes())
        return out

    epochs = [epoch_windows(a) for _ in range(3)]
    assert epochs == [epoch_windows(b) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == all_windows  # every sample exactly once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert epochs[0] != epoch_windows(plain)
    other = DataLoader(pattern, B, T, shuffle=True, seed=2)
    assert epoch_windows(other) != epochs[0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_from_state_dict_continues_bit_exactly(tmp_path, shuffle):
    B, T = 2, 4
    pattern, _ = make_shards(tmp_path, [6 * B * T + 1, 5 * B * T + 3])
    loader = DataLoader(pattern, B, T, shuffle=shuffle)
    for steps in (0, 3, 6, 11, 14):  # start, mid-shard, shard boundary, epoch boundary, epoch 1
        loader.reset()
        batches(loader, steps)
        state = loader.state_dict()
        assert all(type(v) is int for v in state.values())
        expected = batches(loader, 15)
        resumed = DataLoader(pattern, B, T, shuffle=shuffle)
        resumed.load_state_dict(dict(state))
        for (x, y), (rx, ry) in zip(expected, batches(resumed, 15)):
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)


def test_load_state_dict_rejects_a_different_batch_shape(tmp_path):
    pattern, _ = make_shards(tmp_path, [500])
    state = DataLoader(pattern, 2, 8).state_dict()
    with pytest.raises(ValueError, match="B\\*T\\*world_size"):
        DataLoader(pattern, 4, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="samples"):
        DataLoader(pattern, 2, 8).load_state_dict({**state, "sample_pos": 999})


def test_reset_restarts_and_targets_do_not_alias_inputs(tmp_path):
    pattern, _ = make_shards(tmp_path, [300])
    loader = DataLoader(pattern, 2, 8)
    first = batches(loader, 5)
    loader.reset()
    x, y = loader.next_batch()
    np.testing.assert_array_equal(x, first[0][0])
    y[:] = -1
    np.testing.assert_array_equal(x, first[0][0])


def test_default_corpus_is_deterministic_and_cached(tmp_path, capsys):
    train, val = default_corpus(tmp_path / "a")
    assert "built the default corpus" in capsys.readouterr().out
    assert Path(train).parent.name.startswith(f"stdlib-{platform.python_version()}-")
    again = default_corpus(tmp_path / "b")
    capsys.readouterr()
    for first, second in zip((train, val), again):
        assert Path(first).read_bytes() == Path(second).read_bytes()
    mtime = os.stat(train).st_mtime_ns
    assert default_corpus(tmp_path / "a") == (train, val)
    assert "built" not in capsys.readouterr().out and os.stat(train).st_mtime_ns == mtime
    # one document per file, each opened by EOT; every 20th file is in val
    _, files = stdlib_sources()
    train_tokens, val_tokens = load_shard_tokens(train), load_shard_tokens(val)
    assert train_tokens[0] == val_tokens[0] == EOT
    assert np.count_nonzero(val_tokens == EOT) == len(files[::20])
    assert np.count_nonzero(train_tokens == EOT) == len(files) - len(files[::20])
    assert train_tokens.size > 10 * val_tokens.size > 10 * 32768
    DataLoader(val, 8, 1024)  # big enough for a default-sized eval batch


def test_concurrent_corpus_builds_agree(tmp_path):
    code = ("import sys; from gpt2cu.corpus import default_corpus; "
            "print(*default_corpus(sys.argv[1], max_files=60))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    results = [out.splitlines()[-1] for out in outs]
    assert results[0] == results[1]
    assert sum("built the default corpus" in out for out in outs) == 1  # the lock kept the second one waiting
    assert sorted(p.name for p in Path(results[0].split()[0]).parent.iterdir()) == ["train_000000.bin",
                                                                                    "val_000000.bin"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
