"""The embedded default corpus: Python's standard library sources, tokenized into cached shards.

Training needs data even on a machine with no network and no prepared dataset. Every Python install
carries ~10 MB of real, varied text in its standard library, so that is the default corpus: the *.py
files under sysconfig's "stdlib" path (minus third-party packages, test suites, IDLE, lib2to3 and the
generated codec tables in encodings/), sorted by relative path. Every 20th file in that order (indices
0, 20, 40, ...) goes to the val split, the rest to train. Each file is one document, preceded by EOT
(llm.c's convention).

The shards are built once into <cache>/stdlib-<python version>-<hash of the files' names and
contents>/{train,val}_000000.bin and reused afterwards. Builders take a file lock and write into a
temporary directory that is renamed into place, so concurrent ranks neither corrupt nor duplicate it.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from .data import write_shard
from .tokenizer import encode_documents

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                           "encodings"})
VAL_EVERY = 20
# part of the cache key: bump it when the selection or document convention changes
CORPUS_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPT2CU_CACHE") or Path.home() / ".cache" / "gpt2cu")


def stdlib_sources(max_files: int | None = None) -> tuple[Path, list[str]]:
    """The stdlib directory and the sorted relative paths (POSIX style) of the corpus's files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages is large
        rel_dir = Path(dirpath).relative_to(root)
        rels += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    rels.sort()
    if not rels:
        raise RuntimeError(f"no Python sources found under the standard library directory {root}")
    return root, rels[:max_files]


def default_corpus(cache_dir=None, max_files: int | None = None) -> tuple[str, str]:
    """(train shard path, val shard path) of the stdlib corpus, building the cache on first use.

    max_files keeps only the first files of the sorted list (a small corpus for tests).
    """
    root, rels = stdlib_sources(max_files)
    blobs = [(root / rel).read_bytes() for rel in rels]
    key = hashlib.sha256(f"format {CORPUS_FORMAT}\n".encode())
    for rel, blob in zip(rels, blobs):
        key.update(f"{rel}\n{len(blob)}\n".encode())
        key.update(blob)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"stdlib-{platform.python_version()}-{key.hexdigest()[:16]}"
    paths = str(final / "train_000000.bin"), str(final / "val_000000.bin")
    if final.is_dir():  # only ever created complete, by a rename
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # others wait here, then find the finished directory
        if not final.is_dir():
            _build(final, rels, blobs)
    return paths


def _build(final: Path, rels: list[str], blobs: list[bytes]) -> None:
    start = time.perf_counter()
    texts = [blob.decode("utf-8", errors="replace") for blob in blobs]
    threads = os.cpu_count() or 1
    val = encode_documents([t for i, t in enumerate(texts) if i % VAL_EVERY == 0], num_threads=threads)
    train = encode_documents([t for i, t in enumerate(texts) if i % VAL_EVERY != 0], num_threads=threads)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}.tmp"))
    try:
        write_shard(tmp / "train_000000.bin", train)
        write_shard(tmp / "val_000000.bin", val)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    megabytes = sum(len(b) for b in blobs) / 1e6
    print(f"gpt2cu: built the default corpus from {len(rels)} stdlib files ({megabytes:.1f} MB) in "
          f"{time.perf_counter() - start:.1f} s: {train.size:,} train and {val.size:,} val tokens "
          f"in {final}", flush=True)
