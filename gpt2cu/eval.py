"""The evaluations train.py runs every -v steps: validation loss, and HellaSwag as llm.c scores it.

HellaSwag lives in llm.c's multiple-choice eval file (dev/data/hellaswag.py writes it from the official
jsonl; formats.py describes it); its reader and writer live here.

Scoring is llm.c's "completion style" acc_norm: each example fills 4 rows of the (B, T) batch (context
followed by one ending), targets are the next tokens over the ending only (-1 elsewhere, so the
classifier gives those positions loss 0), and the predicted ending is the row with the lowest mean loss
per ending token. The model runs with its own fixed (B, T), so B must be a multiple of 4.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .formats import EVAL_FILE, HEADER_BYTES, atomic_write, new_header, read_header

EVAL_VERSION = 1
START = 65535
NUM_COMPLETIONS = 4  # llm.c's EvalLoader assumes 4 (ASSUMED_NUM_COMPLETIONS)
RECORD_FIELDS = 6  # START, bytes, index, label, completions, context length
PAD_TOKEN = 0  # fills rows past their end: causal attention keeps it out of every scored position


class EvalFileError(ValueError):
    """A malformed eval file."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: the context tokens, NUM_COMPLETIONS endings, the correct one."""
    label: int
    context: tuple
    endings: tuple


# ---- the eval file ----------------------------------------------------------------------------------
def _record(index: int, ex: Example) -> list:
    if len(ex.endings) != NUM_COMPLETIONS:
        raise ValueError(f"example {index}: {len(ex.endings)} endings, the format needs {NUM_COMPLETIONS}")
    if not 0 <= ex.label < NUM_COMPLETIONS:
        raise ValueError(f"example {index}: label {ex.label} is not in [0, {NUM_COMPLETIONS})")
    stream = [START, 0, index, ex.label, NUM_COMPLETIONS]
    for tokens in (ex.context, *ex.endings):
        if not tokens:
            raise ValueError(f"example {index}: empty context or ending")
        if min(tokens) < 0 or max(tokens) >= START:  # 65535 is the delimiter
            raise ValueError(f"example {index}: tokens must be in [0, {START})")
        stream += [len(tokens), *tokens]
    stream[1] = 2 * len(stream)
    if stream[1] >= 2 ** 16:
        raise ValueError(f"example {index}: {stream[1]} bytes does not fit the uint16 size field")
    return stream


def write_eval_file(path: str, examples) -> None:
    """Write `examples` (a sequence of Example) in llm.c's eval format (data_common.write_evalfile);
    atomic, so an interrupted write leaves the old file (or none), never half a file."""
    if not 0 < len(examples) < 2 ** 16:  # the example index is a uint16
        raise ValueError(f"an eval file holds 1 to 65535 examples, got {len(examples)}")
    records = [_record(i, ex) for i, ex in enumerate(examples)]
    header = new_header(EVAL_FILE, EVAL_VERSION, [len(records), max(r[1] for r in records)])
    stream = np.array([x for r in records for x in r], dtype="<u2")

    def write(f):
        header.tofile(f)
        stream.tofile(f)
    atomic_write(path, write)


def read_eval_file(path: str) -> list:
    """The examples of an llm.c eval file, every record checked (EvalFileError names file and example)."""
    header, size = read_header(path, EVAL_FILE, EvalFileError, " (dev/data/hellaswag.py writes it)")
    count = int(header[2])
    if count < 1:
        raise EvalFileError(f"{path}: header says {count} examples")
    if (size - HEADER_BYTES) % 2:
        raise EvalFileError(f"{path}: truncated: odd number of bytes after the header")
    stream = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).tolist()
    examples, pos = [], 0
    for i in range(count):
        where = f"{path}: example {i} (byte {HEADER_BYTES + 2 * pos})"
        if pos + RECORD_FIELDS > len(stream):
            raise EvalFileError(f"{where}: file truncated: the header says {count} examples, found {i}")
        start, nbytes, index, label, ncomp = stream[pos:pos + 5]
        if start != START:
            raise EvalFileError(f"{where}: expected the START delimiter {START}, found {start}")
        end = pos + nbytes // 2
        if nbytes % 2 or end > len(stream):
            raise EvalFileError(f"{where}: file truncated or bad record size {nbytes} bytes")
        if index != i:
            raise EvalFileError(f"{where}: record says index {index}")
        if ncomp != NUM_COMPLETIONS or not 0 <= label < ncomp:
            raise EvalFileError(f"{where}: {ncomp} completions with label {label}; expected "
                                f"{NUM_COMPLETIONS} completions and a label below that")
        parts, p = [], pos + 5
        for _ in range(1 + ncomp):  # the context, then each ending: a length and that many tokens
            n = stream[p] if p < end else 0
            if n == 0 or p + 1 + n > end:
                raise EvalFileError(f"{where}: empty or overlong context/ending ({n} tokens) for a "
                                    f"{nbytes}-byte record")
            parts.append(tuple(stream[p + 1:p + 1 + n]))
            p += 1 + n
        if p != end:
            raise EvalFileError(f"{where}: record size {nbytes} bytes, its fields take {2 * (p - pos)}")
        examples.append(Example(label=label, context=parts[0], endings=tuple(parts[1:])))
        pos = end
    if pos != len(stream):
        raise EvalFileError(f"{path}: {2 * (len(stream) - pos)} bytes of trailing data after {count} examples")
    return examples


# ---- HellaSwag -----------------------------------------------------------------------------------------
def hellaswag_batches(examples, B: int, T: int, rank: int = 0, world_size: int = 1):
    """Yield (inputs, targets, labels) for this rank: int32 (B, T) arrays and the B//4 labels (-1 marks
    an empty slot). Rank r takes examples r, r+N, r+2N, ...; every rank yields the same number of batches
    (ceil(ceil(n/N) / (B/4))), those with fewer examples finishing on slots that count nothing, so all
    ranks reach the final all-reduce together. A context + ending longer than T is cut
    from the left: the context loses its first tokens (and warns once), the ending stays whole if it can.
    """
    if B < NUM_COMPLETIONS or B % NUM_COMPLETIONS:
        raise ValueError(f"HellaSwag needs the batch size B to be a multiple of {NUM_COMPLETIONS} "
                         f"({NUM_COMPLETIONS} rows per example), got B={B}")
    if T < 2:
        raise ValueError(f"HellaSwag needs T >= 2 (a context token before each ending), got T={T}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    per_batch = B // NUM_COMPLETIONS
    mine = examples[rank::world_size]
    per_rank = -(-len(examples) // world_size)
    for first in range(0, per_rank, per_batch):
        inputs = np.full((B, T), PAD_TOKEN, dtype=np.int32)
        targets = np.full((B, T), -1, dtype=np.int32)
        labels = np.full(per_batch, -1, dtype=np.int64)
        for slot, ex in enumerate(mine[first:first + per_batch]):
            labels[slot] = ex.label
            for c, ending in enumerate(ex.endings):
                row = (ex.context + ending)[-T:]
                if len(ex.context) + len(ending) > T:
                    warnings.warn(f"HellaSwag: examples longer than T={T} tokens are truncated from the left")
                r, n = slot * NUM_COMPLETIONS + c, len(row)
                inputs[r, :n] = row
                # position j-1 predicts the ending token at j; an ending cut at position 0 loses that token
                first_scored = max(n - len(ending), 1)
                targets[r, first_scored - 1:n - 1] = row[first_scored:]
        yield inputs, targets, labels


def count_correct(losses: np.ndarray, targets: np.ndarray, labels: np.ndarray) -> int:
    """Examples whose lowest mean-loss ending is the label. losses/targets (B, T); only positions with a
    target >= 0 count; labels (B//4,) with -1 for empty slots."""
    scored = targets >= 0
    row_loss = np.where(scored, losses, 0.0).sum(axis=1) / np.maximum(scored.sum(axis=1), 1)
    predicted = row_loss.reshape(-1, NUM_COMPLETIONS).argmin(axis=1)  # ties: the first, as llm.c
    return int(((predicted == labels) & (labels >= 0)).sum())


def evaluate_hellaswag(model, backend, examples, comm) -> float:
    """acc_norm over all examples, each rank scoring its share with the model's (B, T)."""
    if not examples:
        raise ValueError("HellaSwag: no examples to evaluate")
    correct = 0
    for inputs, targets, labels in hellaswag_batches(examples, model.B, model.T, comm.rank, comm.world_size):
        model.forward(backend.set_batch(inputs, targets), dloss=0.0)
        correct += count_correct(backend.to_numpy(model.acts["losses"]), targets, labels)
    return comm.all_reduce_scalar(correct) / len(examples)


# ---- validation loss ---------------------------------------------------------------------------------
def evaluate_val_loss(model, backend, loader, max_batches: int, comm) -> float:
    """Mean loss over the first `max_batches` batches of `loader` (-1: one whole pass), from its start
    every time so successive evaluations compare; averaged over ranks. Never wraps into a second epoch."""
    per_epoch = loader.num_batches_per_epoch
    if max_batches == 0 or max_batches < -1:
        raise ValueError(f"val batches must be -1 (the whole val set) or >= 1, got {max_batches}")
    n = per_epoch if max_batches == -1 else min(max_batches, per_epoch)
    loader.reset()
    total = 0.0
    for _ in range(n):
        inputs, targets = loader.next_batch()
        model.forward(backend.set_batch(inputs, targets), dloss=0.0)
        total += backend.mean_loss(model.acts["losses"])
    return comm.all_reduce_scalar(total / n) / comm.world_size
