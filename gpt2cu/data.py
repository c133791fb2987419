"""llm.c's token shards and the training-data loader.

Shards are llm.c's (formats.py describes them), so they move freely between llm.c and gpt2cu.

The loader follows llm.c's dataloader.h: a shard is cut into samples of B*T*world_size tokens (plus the
one token of lookahead for the targets), every rank takes the same sample and reads its own B*T stripe
of it. So N ranks with batch B together see exactly the rows one rank with batch N*B sees, and the
position (epoch, shard, sample) is the same on every rank: shuffling depends only on (seed, epoch,
shard), never on the rank. Shards are memory-mapped; a batch is one slice.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from .formats import HEADER_BYTES, HEADER_DTYPE, SHARD, SHARD_V7, atomic_write, check_file_size, new_header, read_header

# the two shard formats: (format, version, token dtype); version 7 holds vocabularies past uint16
SHARD_FORMATS = ((SHARD, 1, np.dtype("<u2")), (SHARD_V7, 7, np.dtype("<u4")))
MAX_TOKEN = np.iinfo(np.uint16).max  # the largest token of a version-1 shard
MAX_TOKEN_V7 = np.iinfo(np.uint32).max


class ShardError(ValueError):
    """A shard file that is malformed, or unusable with the requested batch shape."""


def write_shard(path, tokens) -> None:
    """Write `tokens` (integers in [0, 2^32 - 1]) as a shard: version 1 (uint16) when every token fits
    65535, else version 7 (uint32); atomic, so readers never see half a file."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() > MAX_TOKEN_V7):
        raise ValueError(f"{path}: tokens must be integers in [0, {MAX_TOKEN_V7}] to fit uint32")
    fmt, version, dtype = SHARD_FORMATS[int(bool(tokens.size) and int(tokens.max()) > MAX_TOKEN)]
    header = new_header(fmt, version, [tokens.size])

    def write(f):
        header.tofile(f)
        tokens.astype(dtype, copy=False).tofile(f)
    atomic_write(path, write)


def _shard_format(path):
    """(format, version, token dtype) of the shard by its magic (version 1's when unknown: its reader
    then says what is wrong)."""
    magic = np.fromfile(path, dtype=HEADER_DTYPE, count=1) if os.path.isfile(path) else ()
    return next((f for f in SHARD_FORMATS if len(magic) and int(magic[0]) == f[0].magic), SHARD_FORMATS[0])


def read_shard_layout(path) -> tuple[int, np.dtype]:
    """Check the shard's header and size; return its number of tokens and their dtype."""
    fmt, _, dtype = _shard_format(path)
    header, size = read_header(path, fmt, ShardError)
    ntok = int(header[2])
    check_file_size(path, fmt, size, HEADER_BYTES + dtype.itemsize * ntok, ShardError)
    return ntok, dtype


def read_shard_header(path) -> int:
    """Check the shard's header and size; return its number of tokens."""
    return read_shard_layout(path)[0]


def load_shard_tokens(path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 (version 1) or uint32 (version 7) memory map, checked
    against the header first."""
    ntok, dtype = read_shard_layout(path)
    if ntok == 0:  # mmap refuses an empty mapping
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def _shard_files(pattern) -> list:
    pattern = os.fspath(pattern)
    if not glob.has_magic(pattern):
        return [pattern]
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r}")
    return files


class DataLoader:
    """Batches (inputs, targets) of int32, shape (B, T), from the shards matching `pattern`.

    One call to next_batch() consumes one sample: B*T*world_size tokens across all ranks, this rank's
    stripe being tokens [r*B*T, (r+1)*B*T + 1) of the sample. Exhausting a shard moves to the next, and
    the last shard wraps to the first (a new epoch). With shuffle, every epoch permutes the shard order
    and, within each shard, the sample order, seeded by (seed, epoch[, shard]).
    """

    def __init__(self, pattern, B: int, T: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 42):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.sample_tokens = B * T * world_size
        self.files = _shard_files(pattern)
        layouts = [read_shard_layout(f) for f in self.files]
        self.shard_sizes = [ntok for ntok, _ in layouts]
        # the largest token id every shard's format can hold (a model's vocabulary past it cannot be the data's)
        self.max_token = min(int(np.iinfo(dtype).max) for _, dtype in layouts)
        for path, ntok in zip(self.files, self.shard_sizes):
            if ntok < self.sample_tokens + 1:
                raise ShardError(f"{path}: {ntok} tokens is too few for one batch: B*T*world_size+1 = "
                                 f"{B}*{T}*{world_size}+1 = {self.sample_tokens + 1}")
        self.shard_samples = [(ntok - 1) // self.sample_tokens for ntok in self.shard_sizes]
        self.reset()

    @property
    def num_tokens(self) -> int:
        """Tokens in all shards together."""
        return sum(self.shard_sizes)

    @property
    def num_batches_per_epoch(self) -> int:
        """next_batch() calls per epoch (the same on every rank); a shard's leftover tokens are skipped."""
        return sum(self.shard_samples)

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self._seek(epoch=0, shard_pos=0, sample_pos=0)

    def state_dict(self) -> dict:
        """The position of the next batch, as plain ints (identical on every rank)."""
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos,
                "sample_tokens": self.sample_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state["sample_tokens"] != self.sample_tokens:
            raise ValueError(f"loader state was saved with B*T*world_size = {state['sample_tokens']}, "
                             f"this loader has {self.sample_tokens}; the positions would not line up")
        epoch, shard_pos, sample_pos = (int(state[k]) for k in ("epoch", "shard_pos", "sample_pos"))
        if epoch < 0 or not 0 <= shard_pos < len(self.files):
            raise ValueError(f"loader state {state} does not fit {len(self.files)} shard(s)")
        shard = self._shard_order(epoch)[shard_pos]
        if not 0 <= sample_pos < self.shard_samples[shard]:
            raise ValueError(f"loader state {state}: shard {self.files[shard]} has only "
                             f"{self.shard_samples[shard]} samples")
        self._seek(epoch, shard_pos, sample_pos)

    def next_batch(self):
        sample = self._sample_order[self.sample_pos] if self.shuffle else self.sample_pos
        start = sample * self.sample_tokens + self.rank * self.B * self.T
        window = self._tokens[start:start + self.B * self.T + 1].astype(np.int32)
        if self.sample_pos + 1 < self.shard_samples[self._shard]:
            self.sample_pos += 1
        elif self.shard_pos + 1 < len(self.files):
            self._seek(self.epoch, self.shard_pos + 1, 0)
        else:
            self._seek(self.epoch + 1, 0, 0)
        # targets get their own buffer, so masking them in place cannot change the inputs
        return window[:-1].reshape(self.B, self.T), window[1:].reshape(self.B, self.T).copy()

    def _shard_order(self, epoch: int) -> np.ndarray:
        # seed words are tagged (0: shard order, 1: sample order) so the two streams never coincide
        if not self.shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.files))

    def _seek(self, epoch: int, shard_pos: int, sample_pos: int) -> None:
        self.epoch, self.shard_pos, self.sample_pos = epoch, shard_pos, sample_pos
        self._shard = int(self._shard_order(epoch)[shard_pos])
        self._tokens = load_shard_tokens(self.files[self._shard])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1, self._shard])
            self._sample_order = rng.permutation(self.shard_samples[self._shard])


class RepeatedBatch:
    """llm.c's -a 1 (overfit one batch): the first batch of `loader`, served for every step. Its state
    is the loader's after that read, so a resumed run reads the same batch again."""

    def __init__(self, loader):
        self.loader, self._batch = loader, None

    @property
    def num_tokens(self) -> int:
        return self.loader.num_tokens

    def next_batch(self):
        if self._batch is None:
            self._batch = self.loader.next_batch()
        return self._batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._batch = None


class InMemoryBatches:
    """A fixed list of (inputs, targets) batches served in a cycle, for benchmarks and tests that train
    through the Trainer on batches they made themselves. Its state is the position in the cycle."""

    def __init__(self, batches):
        if not batches:
            raise ValueError("InMemoryBatches needs at least one batch")
        self.batches, self.position = list(batches), 0

    @property
    def num_tokens(self) -> int:
        return sum(int(np.size(x)) for x, _ in self.batches)

    def next_batch(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
