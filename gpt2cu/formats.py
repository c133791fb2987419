"""The byte formats of every file gpt2cu writes: bf16 bits, llm.c's 256-int32 header, atomic writes.

Each binary file starts with llm.c's header: 256 little-endian int32 (1024 bytes), [0] a magic number
naming the kind of file, [1] its version, then fields of that kind; unused slots are 0. The kinds:

Model file (llm.c's format, readable by llm.c and its exporters; checkpoint.py)
  [0] 20240326  [1] version: 3 = fp32 params, 5 = bf16 params  [2] max_seq_len  [3] vocab_size
  [4] n_layer  [5] n_head  [6] n_embd  [7] padded_vocab_size
  then the parameters, flat, in layout.param_layout order: float32, or bf16 bits as uint16.

State file `state_%08d_%05d.bin` (step, rank), gpt2cu's own (checkpoint.py)
  [0] 20240527  [1] 1 (version)  [2] world_size  [3] rank  [4] zero_stage  [5] step
  [6] has_master (1 when a "master" array is stored)  [7] [8] payload bytes, low and high 32 bits
  [9] crc32 (as uint32 bits) of the whole file computed with this slot 0
  then the payload: a JSON blob (uint64 byte length, then UTF-8, space padded so the arrays start on a
  64-byte boundary) = {"arrays": [{"name", "dtype", "length"}, ...], "extra": {...}}, then the arrays'
  float32 data in that order.

Token shard (llm.c's dev/data scripts write the same; data.py)
  [0] 20240520  [1] 1 (version)  [2] number of tokens
  then the tokens as uint16.
  Version 7 (llm.c's LLaMA 3 data, vocabularies over 65,536 tokens):
  [0] 20240801  [1] 7 (version)  [2] number of tokens
  then the tokens as uint32.

LLaMA model file (llm.c's train_llama3.py writes it; models/llama.py describes and reads it)
  [0] 20240803  [1] version: 3 = fp32, 5 = bf16, then a second 256-slot block of float32 fields.

Reward model file, gpt2cu's own (rl/reward_model.py): a GPT-2 trunk and a scalar head on its final layernorm
  [0] 20261201  [1] 1 (version: fp32)  [2]..[7] as the model file's (max_seq_len, vocab_size, n_layer,
  n_head, n_embd, padded_vocab_size)
  then the trunk's parameters as a model file's (fp32, layout order; wte's LM-head role is unused), then the
  head: n_embd weights and one bias, float32. A sequence's reward is the head's value at its last token.

Eval file (llm.c's multiple-choice format, dev/data/hellaswag.py writes it; eval.py)
  [0] 20240522  [1] 1 (version)  [2] number of examples  [3] longest example in bytes
  then per example a uint16 record
      65535 (START), record bytes, example index, label, number of completions (4),
      context length, context tokens, then per completion: its length and its tokens.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass

import numpy as np

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
HEADER_DTYPE = "<i4"


@dataclass(frozen=True)
class HeaderFormat:
    """One kind of file behind llm.c's header: its magic, its versions and how errors name it."""
    name: str       # "unsupported shard version 7"
    title: str      # "not an llm.c shard"
    magic: int
    versions: dict  # version -> what it stores


MODEL_FILE = HeaderFormat("model file", "an llm.c model file", 20240326, {3: "fp32", 5: "bf16"})
STATE_FILE = HeaderFormat("state file", "a gpt2cu state file", 20240527, {1: "float32 arrays + JSON"})
SHARD = HeaderFormat("shard", "an llm.c shard", 20240520, {1: "uint16 tokens"})
SHARD_V7 = HeaderFormat("shard", "an llm.c shard", 20240801, {7: "uint32 tokens"})
REWARD_MODEL_FILE = HeaderFormat("reward model file", "a gpt2cu reward model file", 20261201, {1: "fp32"})
EVAL_FILE = HeaderFormat("eval file", "an llm.c eval file", 20240522, {1: "uint16 records"})


# ---- bf16 <-> fp32 -----------------------------------------------------------------------------------

def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    # rounding a NaN's mantissa could carry it into infinity: keep the top bits and set the quiet bit
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> 16) | np.uint32(0x0040), rounded).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---- llm.c's header ----------------------------------------------------------------------------------

def new_header(fmt: HeaderFormat, version: int, fields=()) -> np.ndarray:
    """The header [magic, version, *fields, 0, ...] as int32, for the caller to fill further or write."""
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:2 + len(fields)] = [fmt.magic, version, *fields]
    return header


def read_header(path, fmt: HeaderFormat, error=ValueError, hint: str = "") -> tuple[np.ndarray, int]:
    """(the header as int32, the file's size) after checking that `path` holds a whole header with
    fmt's magic and one of its versions; `error` names the file and what is wrong with it. `hint`
    follows the not-found message (where such a file comes from)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fmt.name} not found: {path}{hint}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise error(f"{path}: truncated header ({size} bytes, the header is {HEADER_BYTES}); not {fmt.title}")
    header = np.fromfile(path, dtype=HEADER_DTYPE, count=HEADER_INTS)
    if header[0] != fmt.magic:
        raise error(f"{path}: bad magic {header[0]} (expected {fmt.magic}); not {fmt.title}")
    if int(header[1]) not in fmt.versions:
        known = ", ".join(f"{v} = {what}" for v, what in fmt.versions.items())
        raise error(f"{path}: unsupported {fmt.name} version {header[1]} (known: {known})")
    return header, size


def check_file_size(path, fmt: HeaderFormat, size: int, expected: int, error=ValueError) -> None:
    """Raise `error` unless the file's `size` is the `expected` size its header implies."""
    if size < expected:
        raise error(f"{path}: {fmt.name} truncated or corrupt: {size} bytes, its header implies {expected}")
    if size > expected:
        raise error(f"{path}: {fmt.name} has trailing bytes or a corrupt header: {size} bytes, "
                    f"its header implies {expected}")


# ---- atomic writes ----------------------------------------------------------------------------------

def atomic_write(path, write_fn) -> None:
    """write_fn(f) into a temporary file next to `path`, fsync it, then rename it over `path`: a reader
    (or a resumed run after a crash) sees the old file or the complete new one, never a torn one. On an
    error the old file stays and the temporary is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f"{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # "x": a fresh name of our own (never another writer's), created with the umask's permissions
    f = open(tmp, "xb")
    try:
        with f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory) -> None:
    """Make a rename in `directory` durable; not every filesystem lets a directory be opened for this."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
