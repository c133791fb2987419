"""Backends: the same ops (docs/architecture.md) over numpy (the fp32 reference) or CUDA (bf16 kernels),
both implementing the interface of base.Backend; get_backend picks one."""
from __future__ import annotations

from ..extras import install_hint


def cuda_available() -> tuple[bool, str]:
    """(True, "") when the CUDA backend can run here, else (False, why not)."""
    try:
        import cupy
    except ImportError:
        return False, f"CuPy is not installed: {install_hint('cupy')}"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA GPU is visible"
    except Exception as e:  # no driver, no device
        return False, f"CuPy/CUDA unavailable ({type(e).__name__}: {e})"
    try:
        from .._native import load_kernels
        load_kernels()
    except Exception as e:
        return False, str(e)
    return True, ""


def get_backend(name: str = "auto", device: int = 0):
    """'numpy', 'cuda', or 'auto' (cuda when a GPU and the compiled kernels are present)."""
    if name == "auto":
        ok, _ = cuda_available()
        name = "cuda" if ok else "numpy"
    if name == "numpy":
        from .numpy_ops import NumpyBackend
        return NumpyBackend()
    if name == "cuda":
        ok, why = cuda_available()
        if not ok:
            raise RuntimeError(f"the cuda backend was asked for but cannot run: {why}")
        from .cuda_ops import CudaBackend
        return CudaBackend(device)
    raise ValueError(f"unknown backend {name!r}: expected auto, numpy or cuda")
