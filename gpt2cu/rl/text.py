"""Text <-> token ids for RL, picked by the model's vocabulary: GPT-2's BPE for vocab_size 50257, or the
character vocabulary of the synthetic tasks (dev/data/arithmetic.py), small enough that a model and its
rollouts train in seconds on a CPU. Prompts and pairs come as JSONL; reading them fails with one line.
"""
from __future__ import annotations

import json

from ..models.gpt2 import GPT2_EOT, GPT2_VOCAB

# the synthetic tasks' characters; id = index, and the end-of-text token comes last
CHARS = "\n 0123456789+-*=abcdefghijklmnopqrstuvwxyz.,:;!?'()"
CHAR_VOCAB = len(CHARS) + 1
CHAR_PADDED_VOCAB = 64  # a multiple of 8: the CUDA classifier's vector width


class InputError(ValueError):
    """Bad user input (a file, a reward function, a model of another vocabulary): one line, exit code 2."""


class GPT2Codec:
    vocab_size, eot = GPT2_VOCAB, GPT2_EOT

    def encode(self, text: str) -> list[int]:
        from ..tokenizer import encode
        return encode(text)

    def decode(self, tokens) -> str:
        from ..tokenizer import decode
        return decode(list(tokens))


class CharCodec:
    vocab_size, eot = CHAR_VOCAB, CHAR_VOCAB - 1
    _ids = {c: i for i, c in enumerate(CHARS)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise InputError(f"character {e.args[0]!r} is not in the synthetic vocabulary {CHARS!r}") from None

    def decode(self, tokens) -> str:
        return "".join(CHARS[t] for t in tokens if t < len(CHARS))


def codec_for(cfg):
    """The codec of a model config's vocabulary."""
    for codec in (GPT2Codec(), CharCodec()):
        if cfg.vocab_size == codec.vocab_size:
            return codec
    raise InputError(f"a model with vocab_size {cfg.vocab_size} has no known tokenizer (GPT-2's {GPT2_VOCAB}, "
                     f"or the synthetic tasks' {CHAR_VOCAB} characters)")


def document_tokens(codec, text: str) -> list[int]:
    """EOT, then the text: a prompt starts a document, as every document of llm.c's token streams does."""
    return [codec.eot] + codec.encode(text)


def read_jsonl(path: str, fields: tuple) -> list[dict]:
    """The records of a JSONL file, each an object with string values for `fields`; InputError otherwise."""
    try:
        with open(path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    if not lines:
        raise InputError(f"{path} is empty: expected JSON lines with {', '.join(fields)}")
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg}); expected one object per line") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
            raise InputError(f"{path}:{n}: expected an object with string fields {', '.join(fields)}")
        records.append(record)
    return records
