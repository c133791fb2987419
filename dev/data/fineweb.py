"""FineWeb (or FineWeb-Edu) into llm.c shards, as llm.c's dev/data/fineweb.py writes them.

Each document is preceded by EOT; the token stream is cut into shards of -s tokens: the first shard is
val ({name}_val_000000.bin), the rest train ({name}_train_000001.bin, ...), name being "fineweb" or
"edu_fineweb".

    python dev/data/fineweb.py -v 10B                         # from the Hugging Face hub (`datasets`)
    python dev/data/fineweb.py --input a.parquet b.jsonl      # local files, each document's "text"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

from data_common import tokenize_documents, write_shards

# type -> (hub dataset, name of the shards and the default output directory)
TYPES = {
    "classic": ("HuggingFaceFW/fineweb", "fineweb"),
    "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb"),
}
HERE = os.path.dirname(os.path.abspath(__file__))


def hub_documents(dataset: str, version: str) -> Iterator[str]:
    from datasets import load_dataset
    for row in load_dataset(dataset, name=f"sample-{version}T", split="train"):
        yield row["text"]


def parquet_documents(path: str) -> Iterator[str]:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
        yield from batch.column(0).to_pylist()


def jsonl_documents(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{lineno}: record has no \"text\" field")
                yield record["text"]


READERS = {".parquet": parquet_documents, ".jsonl": jsonl_documents, ".json": jsonl_documents}


def local_documents(paths: list[str]) -> Iterator[str]:
    for path in paths:
        yield from READERS[os.path.splitext(path)[1]](path)


def check_sources(args) -> str | None:
    """Why the documents cannot be read (None if they can). Checked up front: the documents are read
    lazily inside the tokenizing pool, where a missing module would only surface mid-run."""
    if args.input is None:
        if not _importable("datasets"):
            return ("downloading FineWeb needs the `datasets` package (pip install datasets); "
                    "or pass local parquet/jsonl files with --input")
        return None
    for path in args.input:
        ext = os.path.splitext(path)[1]
        if not os.path.isfile(path):
            return f"input file not found: {path}"
        if ext not in READERS:
            return f"{path}: unsupported input type {ext!r}; expected one of {', '.join(READERS)}"
        if ext == ".parquet" and not _importable("pyarrow"):
            return f"{path}: reading parquet needs the `pyarrow` package (pip install pyarrow)"
    return None


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--type", choices=TYPES, default="classic", help="FineWeb or FineWeb-Edu")
    ap.add_argument("-v", "--version", choices=["10B", "100B"], default="10B", help="sample size")
    ap.add_argument("-s", "--shard_size", type=int, default=10**8, help="tokens per shard")
    ap.add_argument("--input", nargs="+", help="local .parquet/.jsonl files instead of the hub")
    ap.add_argument("--output", help="output directory (default: dev/data/{name}{version})")
    ap.add_argument("--processes", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    args = ap.parse_args(argv)
    if args.shard_size < 1:
        ap.error(f"shard size must be positive, got {args.shard_size}")
    problem = check_sources(args)
    if problem:
        sys.exit(f"fineweb.py: {problem}")
    dataset, name = TYPES[args.type]
    output = args.output or os.path.join(HERE, f"{name}{args.version}")
    docs = local_documents(args.input) if args.input else hub_documents(dataset, args.version)
    write_shards(tokenize_documents(docs, args.processes), output, name, args.shard_size)


if __name__ == "__main__":
    main()
