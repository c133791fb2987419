"""Shared test configuration: the `gpu` marker, the CUDA backend fixture, and token shards to train on.

Tests that need the CUDA backend (CuPy, a visible GPU and the compiled gpt2cu._kernels) carry
`@pytest.mark.gpu` (or `pytestmark = pytest.mark.gpu` for a whole module). Where the backend cannot run,
they are skipped at collection with the reason gpt2cu.backends.cuda_available() gives, e.g.
"needs a CUDA GPU: CuPy/CUDA unavailable (ModuleNotFoundError: No module named 'cupy')", so that a
GPU-less machine reports skips, never import errors. Such modules must not import cupy unconditionally.
"""
from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import pytest

from gpt2cu.backends import cuda_available


@functools.lru_cache(maxsize=None)
def cuda_skip_reason() -> str | None:
    """None where the CUDA backend can run here, else why not (asked once per session)."""
    ok, why = cuda_available()
    return None if ok else f"needs a CUDA GPU: {why}"


def pytest_configure(config):
    # cuBLASLt algorithm choices (kernels/matmul.cu) go to a fresh file per session, inherited by the
    # subprocesses tests start: every GEMM shape is tuned once here, and no user's cache is touched
    if not os.environ.get("GPT2CU_GEMM_CACHE"):
        os.environ["GPT2CU_GEMM_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="gpt2cu-tests-"), "gemm-algos.txt")
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU, CuPy and the compiled gpt2cu._kernels (skipped, with the reason, "
                   "where they are missing)")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = cuda_skip_reason() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def cuda_backend():
    """One CudaBackend for the session (its cuBLASLt plans and scratch are reused across tests)."""
    reason = cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    from gpt2cu.backends.cuda_ops import CudaBackend
    return CudaBackend(0)


def write_skewed_shards(directory, sizes: dict) -> tuple[str, str]:
    """Token shards {file name: token count} of a skewed random stream over 256 ids (a learnable unigram
    distribution, fresh each run); returns the (train, val) globs."""
    from gpt2cu.data import write_shard
    rng = np.random.default_rng()
    probs = 1.0 / np.arange(1, 257) ** 1.2
    probs /= probs.sum()
    for name, n in sizes.items():
        write_shard(str(directory / name), rng.choice(256, size=n, p=probs).astype(np.uint16))
    return str(directory / "train_*.bin"), str(directory / "val_*.bin")
