"""Helpers shared by the dataset preparation scripts in dev/data/.

Documents become tokens with gpt2cu's convention (EOT before each document), tokenized in a process
pool, and the token stream is cut into llm.c shards: {name}_val_000000.bin first, then
{name}_train_000001.bin, ... of `shard_size` tokens each (the last one shorter). Documents run across
shard boundaries, as in llm.c, so no token is dropped.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from typing import Iterable, Iterator

import numpy as np

# runnable as a script from a checkout without installing the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gpt2cu.data import write_shard  # noqa: E402
from gpt2cu.tokenizer import encode_documents, get_encoding  # noqa: E402

# documents per pool task: large enough to amortize the inter-process round trip
GROUP_SIZE = 64


def _encode_group(texts: list[str]) -> np.ndarray:
    return encode_documents(texts, num_threads=1)


def tokenize_documents(docs: Iterable[str], processes: int | None = None) -> Iterator[np.ndarray]:
    """Tokens of `docs` (EOT before each), in document order, as a stream of uint16 arrays."""
    docs = iter(docs)
    groups = iter(lambda: list(itertools.islice(docs, GROUP_SIZE)), [])
    processes = processes or os.cpu_count() or 1
    if processes == 1:
        yield from map(_encode_group, groups)
        return
    get_encoding()  # load once here, so forked workers inherit it instead of each building it
    with multiprocessing.Pool(processes) as pool:
        yield from pool.imap(_encode_group, groups)


def write_tokens(path: str, tokens: np.ndarray) -> None:
    write_shard(path, tokens)
    print(f"writing {tokens.size:,} tokens to {path}", flush=True)


def shard_path(output_dir: str, name: str, index: int) -> str:
    split = "val" if index == 0 else "train"
    return os.path.join(output_dir, f"{name}_{split}_{index:06d}.bin")


def write_shards(token_arrays: Iterable[np.ndarray], output_dir: str, name: str, shard_size: int) -> list[str]:
    """Cut the concatenated `token_arrays` into numbered shards of `shard_size` tokens; return their paths."""
    if shard_size < 1:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    os.makedirs(output_dir, exist_ok=True)
    buf = np.empty(shard_size, dtype=np.uint16)
    fill, paths = 0, []
    for tokens in token_arrays:
        pos = 0
        while pos < tokens.size:
            n = min(shard_size - fill, tokens.size - pos)
            buf[fill:fill + n] = tokens[pos:pos + n]
            fill, pos = fill + n, pos + n
            if fill == shard_size:
                paths.append(shard_path(output_dir, name, len(paths)))
                write_tokens(paths[-1], buf)
                fill = 0
    if fill:
        paths.append(shard_path(output_dir, name, len(paths)))
        write_tokens(paths[-1], buf[:fill])
    return paths
