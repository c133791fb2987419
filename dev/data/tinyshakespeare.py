"""Tiny Shakespeare, tokenized exactly as llm.c's dev/data/tinyshakespeare.py does it.

Every passage ending in a blank line (one speaker's turn) is a document, preceded by EOT. The first
32,768 tokens are the val split, the rest train: tiny_shakespeare_val.bin (32,768 tokens) and
tiny_shakespeare_train.bin (305,260 tokens) in --output.

    python dev/data/tinyshakespeare.py                      # download (sha256-checked)
    python dev/data/tinyshakespeare.py --input input.txt    # a local copy, used as given
"""
from __future__ import annotations

import argparse
import hashlib
import os
import urllib.request

import numpy as np

from data_common import tokenize_documents, write_tokens

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
VAL_TOKENS = 32768
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare")


def download(path: str) -> None:
    """Fetch the text into `path` unless a copy with the right sha256 is already there."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == SHA256:
                return
    print(f"downloading {URL}", flush=True)
    with urllib.request.urlopen(URL, timeout=60) as resp:
        data = resp.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"downloaded {URL} has sha256 {digest}, expected {SHA256}")
    with open(path, "wb") as f:
        f.write(data)


def documents(text: str) -> list[str]:
    """Split after each blank line, keeping it with the passage it ends (llm.c's document boundaries)."""
    pieces = text.split("\n\n")
    return [p + "\n\n" for p in pieces[:-1]] + pieces[-1:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="local text file to use instead of downloading")
    ap.add_argument("--output", default=DEFAULT_OUTPUT, help="directory for the .bin files")
    args = ap.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    path = args.input
    if path is None:
        path = os.path.join(args.output, "tiny_shakespeare.txt")
        download(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # one megabyte of text: a process pool would cost more than it saves
    tokens = np.concatenate(list(tokenize_documents(documents(text), processes=1)))
    write_tokens(os.path.join(args.output, "tiny_shakespeare_val.bin"), tokens[:VAL_TOKENS])
    write_tokens(os.path.join(args.output, "tiny_shakespeare_train.bin"), tokens[VAL_TOKENS:])


if __name__ == "__main__":
    main()
