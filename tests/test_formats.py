"""gpt2cu/formats.py: bf16 rounding against an independent float64 reference (ties, overflow, NaN,
infinities), llm.c's header (layout, every reader error) and atomic writes (an error keeps the old file
and leaves no temporary)."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from gpt2cu.formats import (EVAL_FILE, HEADER_BYTES, HEADER_INTS, MODEL_FILE, SHARD, STATE_FILE, atomic_write,
                            bf16_bits_to_f32, check_file_size, f32_to_bf16_bits, new_header, read_header)

FORMATS = (MODEL_FILE, STATE_FILE, SHARD, EVAL_FILE)
SIGN, EXPONENT, QUIET = 0x8000, 0x7F80, 0x0040  # bf16 bit fields


def f32(bits32) -> np.ndarray:
    return np.asarray(bits32, dtype=np.uint32).view(np.float32)


def is_nan_bf16(bits16) -> np.ndarray:
    return (bits16 & EXPONENT == EXPONENT) & (bits16 & 0x7F != 0)


def reference_bf16(x: np.ndarray) -> np.ndarray:
    """Nearest bf16 of finite float32 `x`, ties to even, from the two neighbours' distances in float64.
    Past the largest finite bf16, infinity counts as 2^128 (where the next binade would start)."""
    def magnitude(b):
        return np.where(b & 0x7FFF == EXPONENT, 2.0 ** 128, np.abs(bf16_bits_to_f32(b).astype(np.float64)))

    below = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated: the neighbour nearer to zero
    above = below + np.uint16(1)
    d_below = np.abs(np.abs(x.astype(np.float64)) - magnitude(below))
    d_above = np.abs(magnitude(above) - np.abs(x.astype(np.float64)))
    pick_above = (d_above < d_below) | ((d_above == d_below) & (below % 2 == 1))
    return np.where(pick_above, above, below)


# ---- bf16 -------------------------------------------------------------------------------------------

def test_bf16_rounds_random_floats_to_nearest():
    rng = np.random.default_rng()
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint32)
    x = f32(bits)[np.isfinite(f32(bits))]
    np.testing.assert_array_equal(f32_to_bf16_bits(x), reference_bf16(x))
    # values of ordinary size, where the relative error bound is meaningful
    y = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32)
    back = bf16_bits_to_f32(f32_to_bf16_bits(y))
    assert np.all(np.abs(back - y) <= np.abs(y) * 2.0 ** -8)  # half a unit of 7 stored mantissa bits


def test_bf16_ties_go_to_even():
    rng = np.random.default_rng()
    b = rng.integers(0, 2 ** 16, 100_000, dtype=np.uint16)
    b = b[b & EXPONENT != EXPONENT]  # finite bf16 values (their successor may be infinity: a tie rounds there)
    halfway = f32((b.astype(np.uint32) << 16) | 0x8000)  # exactly between b and the next value away from 0
    expected = np.where(b % 2 == 0, b, b + np.uint16(1))
    np.testing.assert_array_equal(f32_to_bf16_bits(halfway), expected)
    np.testing.assert_array_equal(f32_to_bf16_bits(np.float32([np.finfo(np.float32).max])), [EXPONENT])


def test_bf16_nan_and_infinity():
    rng = np.random.default_rng()
    sign = rng.integers(0, 2, 10_000, dtype=np.uint32) << 31
    # NaN payloads anywhere in the mantissa, also only in the low 16 bits that rounding drops
    mantissa = rng.integers(1, 2 ** 23, 10_000, dtype=np.uint32) >> rng.integers(0, 23, 10_000, dtype=np.uint32)
    mantissa = np.maximum(mantissa, 1)
    nan = f32(sign | 0x7F800000 | mantissa)
    bits = f32_to_bf16_bits(nan)
    assert is_nan_bf16(bits).all() and (bits & QUIET).all()
    np.testing.assert_array_equal(bits & SIGN, sign >> 16)
    assert np.isnan(bf16_bits_to_f32(bits)).all()
    np.testing.assert_array_equal(f32_to_bf16_bits(np.float32([np.inf, -np.inf])), [EXPONENT, SIGN | EXPONENT])


def test_bf16_bits_widen_exactly():
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    wide = bf16_bits_to_f32(every)
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide.view(np.uint32) >> 16, every)
    np.testing.assert_array_equal(wide.view(np.uint32) & 0xFFFF, 0)
    # and back: every value is representable, NaNs only gain the quiet bit
    nan = is_nan_bf16(every)
    np.testing.assert_array_equal(f32_to_bf16_bits(wide), np.where(nan, every | QUIET, every))


# ---- llm.c's header ---------------------------------------------------------------------------------

class FormatError(ValueError):
    pass


def write_file(path, fmt, version, fields, extra_bytes=b""):
    with open(path, "wb") as f:
        f.write(new_header(fmt, version, fields).tobytes() + extra_bytes)
    return str(path)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_header_layout_and_round_trip(tmp_path, fmt):
    rng = np.random.default_rng()
    fields = rng.integers(0, 2 ** 31, rng.integers(0, 10)).tolist()
    version = int(rng.choice(list(fmt.versions)))
    payload = rng.bytes(int(rng.integers(0, 100)))
    path = write_file(tmp_path / "f.bin", fmt, version, fields, payload)
    raw = open(path, "rb").read()
    assert np.frombuffer(raw[:HEADER_BYTES], "<i4").tolist() == [fmt.magic, version, *fields] + \
        [0] * (HEADER_INTS - 2 - len(fields))
    header, size = read_header(path, fmt, FormatError)
    assert header.tolist()[:2 + len(fields)] == [fmt.magic, version, *fields]
    assert size == HEADER_BYTES + len(payload)
    check_file_size(path, fmt, size, HEADER_BYTES + len(payload), FormatError)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_header_errors_name_file_and_problem(tmp_path, fmt):
    rng = np.random.default_rng()
    version = next(iter(fmt.versions))

    def fails(path, needle):
        with pytest.raises(FormatError, match=needle) as e:
            read_header(path, fmt, FormatError)
        assert path in str(e.value)

    wrong_magic = int(rng.integers(0, 2 ** 31))
    path = str(tmp_path / "magic.bin")
    open(path, "wb").write(np.int32([wrong_magic, version]).tobytes() + bytes(HEADER_BYTES - 8))
    fails(path, f"bad magic {wrong_magic} \\(expected {fmt.magic}\\); not {fmt.title}")

    wrong_version = int(rng.integers(max(fmt.versions) + 1, 2 ** 31))
    fails(write_file(tmp_path / "version.bin", fmt, wrong_version, []),
          f"unsupported {fmt.name} version {wrong_version} \\(known: ")

    short = int(rng.integers(0, HEADER_BYTES))
    path = str(tmp_path / "short.bin")
    open(path, "wb").write(new_header(fmt, version).tobytes()[:short])
    fails(path, f"truncated header \\({short} bytes")

    with pytest.raises(FileNotFoundError, match=f"{fmt.name} not found: .*nope.bin where from"):
        read_header(str(tmp_path / "nope.bin"), fmt, FormatError, " where from")


def test_size_mismatch_says_which_way(tmp_path):
    rng = np.random.default_rng()
    expected = HEADER_BYTES + int(rng.integers(1, 10_000))
    path = str(tmp_path / "f.bin")
    with pytest.raises(FormatError, match=re.escape(f"{path}: shard truncated or corrupt: {expected - 1} bytes, "
                                                    f"its header implies {expected}")):
        check_file_size(path, SHARD, expected - 1, expected, FormatError)
    with pytest.raises(FormatError, match=re.escape(f"{path}: shard has trailing bytes")):
        check_file_size(path, SHARD, expected + 1, expected, FormatError)


# ---- atomic writes ----------------------------------------------------------------------------------

class WriterFailed(Exception):
    pass


def fail(f):
    raise WriterFailed()


def test_atomic_write_replaces_the_file(tmp_path):
    path = str(tmp_path / "f.bin")
    data = np.random.default_rng().bytes(5000)
    atomic_write(path, lambda f: f.write(b"old"))
    atomic_write(path, lambda f: f.write(data))
    assert open(path, "rb").read() == data
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("failure", [WriterFailed, KeyboardInterrupt])
def test_a_failing_writer_keeps_the_old_file_and_no_temporary(tmp_path, failure):
    path = str(tmp_path / "f.bin")
    old = np.random.default_rng().bytes(3000)
    open(path, "wb").write(old)

    def write_half_then_fail(f):
        f.write(b"new" * 1000)
        raise failure()
    with pytest.raises(failure):
        atomic_write(path, write_half_then_fail)
    assert open(path, "rb").read() == old
    assert os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(WriterFailed):
        atomic_write(str(tmp_path / "new.bin"), fail)  # a file that did not exist stays absent
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    plain = tmp_path / "plain.bin"
    open(plain, "wb").close()
    atomic_write(str(tmp_path / "atomic.bin"), lambda f: f.write(b"x"))
    assert os.stat(tmp_path / "atomic.bin").st_mode == os.stat(plain).st_mode
