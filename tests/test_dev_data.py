"""The dataset preparation scripts in dev/data/, run as a user would: as subprocesses, on local files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2cu.data import load_shard_tokens
from gpt2cu.tokenizer import EOT, encode, get_encoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "dev", "data")
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


def run_script(name, *args):
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_tinyshakespeare_matches_llmc(tmp_path):
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} is not present")
    proc = run_script("tinyshakespeare.py", "--input", SHAKESPEARE, "--output", tmp_path)
    assert proc.returncode == 0, proc.stderr
    val = load_shard_tokens(tmp_path / "tiny_shakespeare_val.bin")
    train = load_shard_tokens(tmp_path / "tiny_shakespeare_train.bin")
    assert (val.size, train.size) == (32768, 305260)  # llm.c's counts
    # llm.c's method: an EOT string before the text and after every blank line, encoded in one go
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    marked = "<|endoftext|>" + text.replace("\n\n", "\n\n<|endoftext|>")
    expected = get_encoding().encode(marked, allowed_special="all")
    np.testing.assert_array_equal(np.concatenate([val, train]), expected)


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def random_documents(n):
    rng = np.random.default_rng()
    words = np.array(["the", "data", "naïve", "🌍", "shard", "GPT", "\n", "42", "tokens", "über"])
    return [" ".join(rng.choice(words, size=rng.integers(1, 200))) for _ in range(n)]


def test_fineweb_from_local_jsonl(tmp_path):
    docs = random_documents(150)
    write_jsonl(tmp_path / "a.jsonl", docs[:100])
    write_jsonl(tmp_path / "b.jsonl", docs[100:])
    out = tmp_path / "out"
    shard_size = 1000
    proc = run_script("fineweb.py", "--input", tmp_path / "a.jsonl", tmp_path / "b.jsonl",
                      "-s", shard_size, "--output", out, "--processes", 2)
    assert proc.returncode == 0, proc.stderr
    expected = np.concatenate([[EOT, *encode(d)] for d in docs])
    n_shards = -(-expected.size // shard_size)
    names = [f"fineweb_val_{0:06d}.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_shards)]
    assert sorted(os.listdir(out)) == sorted(names)
    shards = [load_shard_tokens(out / name) for name in names]
    assert all(s.size == shard_size for s in shards[:-1])
    np.testing.assert_array_equal(np.concatenate(shards), expected)


def test_fineweb_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    docs = random_documents(40)
    write_jsonl(tmp_path / "d.jsonl", docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=7)
    for ext in ("jsonl", "parquet"):
        proc = run_script("fineweb.py", "--input", tmp_path / f"d.{ext}", "-s", 10**6,
                          "--output", tmp_path / ext, "--processes", 1)
        assert proc.returncode == 0, proc.stderr
    assert ((tmp_path / "jsonl" / "fineweb_val_000000.bin").read_bytes()
            == (tmp_path / "parquet" / "fineweb_val_000000.bin").read_bytes())


def test_fineweb_input_errors(tmp_path):
    proc = run_script("fineweb.py", "--input", tmp_path / "missing.jsonl", "--output", tmp_path)
    assert proc.returncode != 0 and "input file not found" in proc.stderr and "missing.jsonl" in proc.stderr
    (tmp_path / "docs.txt").write_text("hello")
    proc = run_script("fineweb.py", "--input", tmp_path / "docs.txt", "--output", tmp_path)
    assert proc.returncode != 0 and "unsupported input type '.txt'" in proc.stderr
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "no text"}) + "\n")
    proc = run_script("fineweb.py", "--input", tmp_path / "bad.jsonl", "--output", tmp_path / "o")
    assert proc.returncode != 0 and 'bad.jsonl:1: record has no "text" field' in proc.stderr
