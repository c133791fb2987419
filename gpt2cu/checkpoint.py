"""Everything written to disk besides logs: llm.c's model file, the per-rank training-state file, and a
checkpoint directory (llm.c's -o DIR) of atomically written files with DONE markers. formats.py
describes both files byte by byte.

The trainer stores in a state file AdamW's m and v (this rank's ZeRO shard, or the whole buffer under
ZeRO-0), the fp32 master weights when kept, and in "extra" the data loader position, RNG state and
anything else JSON-serializable.

Checkpoint directory: model_%08d.bin (rank 0), one state file per rank, and DONE_%08d, written by
rank 0 once every rank's files are in place; a step without DONE is incomplete and never resumed.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from .formats import (HEADER_BYTES, HEADER_DTYPE, STATE_FILE, atomic_write, check_file_size, fsync_dir, new_header,
                      read_header)
from .models import DESCRIPTORS, family_of

STATE_VERSION = 1
STATE_FIELDS = ("world_size", "rank", "zero_stage", "step")  # header slots 2..5, given by the caller
_SLOT_HAS_MASTER, _SLOT_PAYLOAD_LO, _SLOT_PAYLOAD_HI, _SLOT_CRC = 6, 7, 8, 9
_ARRAY_ALIGN = 64
_CRC_CHUNK = 1 << 24  # bytes read per step while verifying


class CheckpointError(ValueError):
    """A file exists but is not a valid, complete, matching model/state/checkpoint."""


class RunMismatch(CheckpointError):
    """A sound checkpoint written by a run of another shape (world size, ZeRO stage): every checkpoint of
    the directory would be refused alike, so resuming stops instead of falling back to an older one."""


# ---- model file -------------------------------------------------------------------------------------
# Each family writes and reads its own llm.c model file (GPT-2's: formats.MODEL_FILE, LLaMA's: models/llama.py);
# a file is read by the family whose magic it carries.

def _family_of_file(path: str):
    """The family whose model-file magic `path` starts with (GPT-2's when none: its reader then says what
    is wrong with the file)."""
    magic = np.fromfile(path, dtype=HEADER_DTYPE, count=1) if os.path.isfile(path) else ()
    for family in DESCRIPTORS.values():
        if len(magic) and int(magic[0]) == family.MODEL_FILE.magic:
            return family
    return DESCRIPTORS[""]


def write_model(path: str, cfg, params: np.ndarray, dtype: str = "fp32") -> None:
    """Write an llm.c model file of cfg's family (atomically) from fp32 flat parameters in layout order."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"model file dtype must be 'fp32' or 'bf16', got {dtype!r}")
    params = np.asarray(params)
    if params.dtype != np.float32:
        raise TypeError(f"parameters must be float32, got {params.dtype}")
    family = family_of(cfg)
    expected = family.param_layout(cfg).total
    if params.shape != (expected,):
        raise ValueError(f"parameters have shape {params.shape}, the model needs ({expected},)")
    family.write_model_file(path, cfg, params, dtype)


def read_model_header(path: str) -> tuple:
    """(config, "fp32" | "bf16") of an llm.c model file of any family, after checking its size matches."""
    return _family_of_file(path).read_model_file_header(path, CheckpointError)


def read_model(path: str) -> tuple:
    """(config, float32 flat parameters) from an llm.c model file of any family (fp32 or bf16)."""
    return _family_of_file(path).read_model_file(path, CheckpointError)


# ---- state file -------------------------------------------------------------------------------------

def write_state(path: str, header_fields: dict, arrays: dict, extra: dict) -> None:
    """Write one rank's training state atomically. header_fields: the ints of STATE_FIELDS;
    arrays: name -> float32 array (stored flat); extra: JSON-serializable dict."""
    missing = set(STATE_FIELDS) - set(header_fields)
    unknown = set(header_fields) - set(STATE_FIELDS)
    if missing or unknown:
        raise ValueError(f"state header fields must be exactly {STATE_FIELDS}; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    flat = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype != np.float32:
            raise TypeError(f"state array {name!r} must be float32, got {a.dtype}")
        flat[name] = np.ascontiguousarray(a).reshape(-1)
    blob = json.dumps({"arrays": [{"name": k, "dtype": "float32", "length": int(a.size)} for k, a in flat.items()],
                       "extra": extra}).encode()
    blob += b" " * (-(HEADER_BYTES + 8 + len(blob)) % _ARRAY_ALIGN)
    payload_bytes = 8 + len(blob) + sum(a.nbytes for a in flat.values())

    header = new_header(STATE_FILE, STATE_VERSION, [_int32(name, header_fields[name]) for name in STATE_FIELDS])
    header[_SLOT_HAS_MASTER] = int("master" in flat)
    header[_SLOT_PAYLOAD_LO:_SLOT_PAYLOAD_HI + 1] = np.array([payload_bytes & 0xFFFFFFFF, payload_bytes >> 32],
                                                             dtype=np.uint32).view(np.int32)
    pieces = [np.uint64(len(blob)).tobytes(), blob] + [memoryview(a).cast("B") for a in flat.values()]
    crc = zlib.crc32(header.tobytes())
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    header[_SLOT_CRC] = np.array([crc], dtype=np.uint32).view(np.int32)[0]

    def write(f):
        f.write(header.tobytes())
        for piece in pieces:
            f.write(piece)
    atomic_write(path, write)


def _int32(name: str, value) -> int:
    value = int(value)
    if not 0 <= value < 2**31:
        raise ValueError(f"state header field {name}={value} does not fit a non-negative int32")
    return value


def _read_state_header(path: str) -> tuple[np.ndarray, int]:
    """(header, payload bytes) after checking magic, version and the file size."""
    header, size = read_header(path, STATE_FILE, CheckpointError)
    lo, hi = header[_SLOT_PAYLOAD_LO:_SLOT_PAYLOAD_HI + 1].view(np.uint32)
    payload = int(lo) | int(hi) << 32
    check_file_size(path, STATE_FILE, size, HEADER_BYTES + payload, CheckpointError)
    return header, payload


def state_fields(path: str) -> dict:
    """The header fields of a state file (plus has_master), after the cheap checks (magic, version,
    size) but without reading the payload or verifying the checksum."""
    header, _ = _read_state_header(path)
    return _fields(header)


def _fields(header: np.ndarray) -> dict:
    fields = {name: int(header[slot]) for slot, name in enumerate(STATE_FIELDS, start=2)}
    fields["has_master"] = bool(header[_SLOT_HAS_MASTER])
    return fields


def read_state(path: str) -> tuple[dict, dict, dict]:
    """(header fields, arrays name -> float32 1-D, extra) of a state file; the checksum is verified."""
    header, payload = _read_state_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)  # a file replaced since the header was read fails the checksum
        stored_crc = int(header[_SLOT_CRC:_SLOT_CRC + 1].view(np.uint32)[0])
        zeroed = header.copy()
        zeroed[_SLOT_CRC] = 0
        crc = zlib.crc32(zeroed.tobytes())

        prefix = f.read(8)
        crc = zlib.crc32(prefix, crc)
        blob_len = int(np.frombuffer(prefix, dtype=np.uint64)[0])
        if blob_len > payload - 8:
            raise CheckpointError(f"{path}: corrupt state file (JSON length {blob_len} exceeds the payload)")
        blob = f.read(blob_len)
        crc = zlib.crc32(blob, crc)
        try:
            meta = json.loads(blob)
            specs = [(s["name"], int(s["length"])) for s in meta["arrays"]]
            extra = meta["extra"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: corrupt state file (unreadable JSON: {e})") from e
        if any(n < 0 for _, n in specs) or 8 + blob_len + 4 * sum(n for _, n in specs) != payload:
            raise CheckpointError(f"{path}: corrupt state file (array lengths do not add up to the payload)")
        arrays = {}
        for name, n in specs:
            a = np.empty(n, dtype=np.float32)
            view = memoryview(a).cast("B")
            for begin in range(0, a.nbytes, _CRC_CHUNK):
                chunk = view[begin:begin + _CRC_CHUNK]
                f.readinto(chunk)
                crc = zlib.crc32(chunk, crc)
            arrays[name] = a
    if crc != stored_crc:
        raise CheckpointError(f"{path}: corrupt state file (crc32 {crc:#010x}, stored {stored_crc:#010x})")
    return _fields(header), arrays, extra


# ---- checkpoint directory ---------------------------------------------------------------------------

def model_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"model_{step:08d}.bin")


def state_path(out_dir: str, step: int, rank: int) -> str:
    return os.path.join(out_dir, f"state_{step:08d}_{rank:05d}.bin")


def done_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"DONE_{step:08d}")


@dataclass
class TrainingState:
    """One rank's resumable state besides the model: arrays conventionally "m", "v" and, when kept,
    "master" (float32, this rank's shard); extra: data loader position, RNG state, ... (JSON)."""
    zero_stage: int
    arrays: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def write_training_state(out_dir: str, step: int, rank: int, world_size: int, state: TrainingState) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_state(state_path(out_dir, step, rank),
                dict(world_size=world_size, rank=rank, zero_stage=state.zero_stage, step=step),
                state.arrays, state.extra)


def mark_done(out_dir: str, step: int, world_size: int) -> None:
    """Rank 0, after a barrier that follows every rank's writes: the step is complete. The marker
    records the world size so a resume can check it before looking for its own state file."""
    atomic_write(done_path(out_dir, step), lambda f: f.write(json.dumps({"world_size": world_size}).encode()))


def save_checkpoint(out_dir: str, step: int, rank: int, world_size: int, model_writer, state: TrainingState,
                    barrier) -> None:
    """llm.c's checkpoint at `step`: every rank writes its state file, rank 0 also the model through
    model_writer(path) (e.g. lambda p: write_model(p, cfg, params, "bf16")); then barrier() (the
    communicator's) and rank 0 writes DONE. Every rank must call it."""
    write_training_state(out_dir, step, rank, world_size, state)
    if rank == 0:
        # a custom writer need not be atomic: it writes a temporary name that is renamed when complete
        final = model_path(out_dir, step)
        tmp = final + ".partial"
        model_writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(out_dir)
    barrier()
    if rank == 0:
        mark_done(out_dir, step, world_size)


def _done_world_size(out_dir: str, step: int) -> int:
    path = done_path(out_dir, step)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return int(json.loads(raw)["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable DONE marker ({e})") from e


def _steps(out_dir: str, pattern: str) -> list[int]:
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names) if m)


def checkpoint_problem(out_dir: str, step: int) -> str | None:
    """Why the checkpoint at `step` cannot be resumed, or None when it is complete: a DONE marker,
    a model file and one state file per rank, each with a valid header and the size it declares.
    (Checksums are verified when a rank reads its own state file.)"""
    if not os.path.exists(done_path(out_dir, step)):
        return f"no {os.path.basename(done_path(out_dir, step))} marker: the checkpoint was not completely written"
    try:
        world = _done_world_size(out_dir, step)
        read_model_header(model_path(out_dir, step))
        for rank in range(world):
            fields = state_fields(state_path(out_dir, step, rank))
            if (fields["world_size"], fields["rank"], fields["step"]) != (world, rank, step):
                return f"{state_path(out_dir, step, rank)} belongs to another step, rank or world size"
    except (OSError, CheckpointError) as e:
        return str(e)
    return None


def checkpoint_steps(out_dir: str) -> list[int]:
    """Every step that has any checkpoint file in `out_dir` (complete or not), oldest first."""
    return sorted(set(_steps(out_dir, r"(?:model|state|DONE)_(\d{8})(?:[._].*)?")))


def latest_checkpoint(out_dir: str) -> int | None:
    """The newest step of `out_dir` that checkpoint_problem accepts, or None."""
    for step in reversed(_steps(out_dir, r"DONE_(\d{8})")):
        if checkpoint_problem(out_dir, step) is None:
            return step
    return None


def newest_usable(out_dir: str, comm, zero_stage: int, mismatch, say):
    """The newest checkpoint of out_dir that every rank can use, as (step, this rank's TrainingState, model
    config, fp32 parameters), or None. Each newer, unusable one is reported with say(step, reason) before
    an older one is tried (no DONE marker, a truncated or corrupt file, or mismatch(cfg, state): a reason
    it belongs to another run, None if it does not), so a damaged checkpoint never goes unnoticed. The ranks
    agree on every step tried (one collective each). A checkpoint of another world size or ZeRO stage
    raises RunMismatch: every older one would be refused alike."""
    for step in reversed(checkpoint_steps(out_dir)):
        problem = checkpoint_problem(out_dir, step)
        if problem is None:
            try:
                state = load_training_state(out_dir, step, comm.rank, comm.world_size, zero_stage)
                cfg, params = read_model(model_path(out_dir, step))
                problem = mismatch(cfg, state)
            except RunMismatch:
                raise
            except (OSError, CheckpointError) as e:
                problem = str(e)
        if problem is not None:
            say(step, problem)
        if comm.all_reduce_scalar(problem is not None) == 0:
            return step, state, cfg, params
    return None


def load_training_state(out_dir: str, step: int, rank: int, world_size: int, zero_stage: int) -> TrainingState:
    """This rank's state at `step`, checked against the run resuming it."""
    written_by = _done_world_size(out_dir, step)
    if written_by != world_size:
        raise RunMismatch(f"checkpoint {step} in {out_dir} was written by {written_by} ranks, "
                              f"this run has {world_size}")
    path = state_path(out_dir, step, rank)
    fields, arrays, extra = read_state(path)
    if (fields["world_size"], fields["rank"], fields["step"]) != (world_size, rank, step):
        raise CheckpointError(f"{path}: holds rank {fields['rank']} of {fields['world_size']} at step "
                              f"{fields['step']}, expected rank {rank} of {world_size} at step {step}")
    if fields["zero_stage"] != zero_stage:
        raise RunMismatch(f"checkpoint {step} in {out_dir} was written with ZeRO stage "
                              f"{fields['zero_stage']}, this run uses {zero_stage} (-z)")
    return TrainingState(fields["zero_stage"], arrays, extra)


def prune_checkpoints(out_dir: str, keep: int, keep_every: int = 0) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (llm.c's -nk), sparing steps divisible by
    keep_every (-nm, "major" checkpoints), and the debris of incomplete steps older than the newest
    complete one. Steps newer than that are left alone (a save may be in progress). Returns the
    deleted steps."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    complete = [s for s in _steps(out_dir, r"DONE_(\d{8})") if checkpoint_problem(out_dir, s) is None]
    if not complete:
        return []
    spared = set(complete[-keep:]) | {s for s in complete if keep_every and s % keep_every == 0}
    # every file of a step, temporaries of an interrupted write included
    files: dict[int, list[str]] = {}
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"(?:model|state|DONE)_(\d{8})(?:[._].*)?", name)
        if m:
            files.setdefault(int(m.group(1)), []).append(name)
    doomed = sorted(s for s in files if s < complete[-1] and s not in spared)
    for step in doomed:
        # the marker goes first: an interrupted prune leaves an incomplete step, not a broken "complete" one
        marker = os.path.basename(done_path(out_dir, step))
        for name in sorted(files[step], key=lambda n: n != marker):
            try:
                os.unlink(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass
    return doomed
