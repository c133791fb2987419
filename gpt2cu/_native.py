"""Loading of the compiled CUDA extension gpt2cu._kernels (kernels/*.cu, kernels/bindings.cpp).

The extension links libcublasLt.so.13 with no RPATH (the build takes it from the CUDA toolkit or from the
nvidia-cublas wheel), so before importing it we load that library into the process: first through
cuda.pathfinder (NVIDIA's locator, which CuPy uses: wheels in site-packages, conda, then the system
loader), else by hand from the nvidia-cublas wheel's lib/ directory. libnccl is preloaded the same way
when present (not required here). Once a library of that soname is loaded, the dynamic linker resolves
the extension's dependency on it.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import threading

_lock = threading.Lock()
_module = None

NO_EXTENSION_MSG = (
    "gpt2cu was installed without its CUDA extension (no nvcc at build time): reinstall with nvcc on PATH "
    "(e.g. `python3 -m pip install --no-build-isolation -e .`)"
)


class KernelsUnavailableError(ImportError):
    """gpt2cu._kernels cannot be used here: not built, or a library it needs failed to load."""


def _wheel_lib_dirs() -> list[str]:
    """lib/ directories of the installed NVIDIA wheels (nvidia/cu13/lib for CUDA 13, nvidia/<pkg>/lib)."""
    dirs = []
    for name in ("nvidia.cu13", "nvidia.cublas", "nvidia.nccl"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for d in (spec.submodule_search_locations or []) if spec else []:
            lib = os.path.join(d, "lib")
            if os.path.isdir(lib) and lib not in dirs:
                dirs.append(lib)
    return dirs


def _preload(libname: str, patterns: tuple[str, ...]) -> str:
    """Loads one NVIDIA library (RTLD_GLOBAL); returns where it came from, raises OSError if it can't."""
    errors = []
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
    except ImportError as e:
        errors.append(f"cuda.pathfinder unavailable ({e})")
    else:
        try:
            loaded = load_nvidia_dynamic_lib(libname)
            return loaded.abs_path or f"{libname} (already loaded)"
        except Exception as e:  # DynamicLibNotFoundError and friends
            errors.append(f"cuda.pathfinder: {type(e).__name__}: {e}")
    for lib_dir in _wheel_lib_dirs():
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(lib_dir, pattern)), reverse=True):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    return path
                except OSError as e:
                    errors.append(f"{path}: {e}")
    for pattern in patterns:  # the system loader (LD_LIBRARY_PATH, ldconfig), exact sonames only
        if "*" in pattern:
            continue
        try:
            ctypes.CDLL(pattern, mode=ctypes.RTLD_GLOBAL)
            return pattern
        except OSError as e:
            errors.append(f"{pattern}: {e}")
    raise OSError(f"could not load {libname}: " + "; ".join(errors))


def _share_cxx_runtime():
    """Puts the process's libstdc++ in the global symbol scope before the extension loads.

    Toolchains of the gcc-toolset kind link the newer parts of libstdc++ into the extension itself, so it
    defines typeinfo and exception-handling symbols that must resolve to the same copy as the rest of the C++
    runtime. They do when libstdc++ is global, as it is once libcublasLt is loaded RTLD_GLOBAL with its
    dependencies. With torch imported first, libcublasLt was already loaded privately and is not reloaded:
    on an H200 machine (torch 2.11) the extension's symbols then bound to its own copies (LD_DEBUG=bindings)
    and its first matmul crashed inside pybind11's dispatcher."""
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass  # not a glibc/libstdc++ system: nothing to share


def kernels_built() -> bool:
    """Whether the installed package has the compiled extension (without importing it)."""
    try:
        return importlib.util.find_spec("gpt2cu._kernels") is not None
    except (ImportError, ValueError):
        return False


def load_kernels():
    """The gpt2cu._kernels module, with libcublasLt (and libnccl, if present) loaded first. Cached.

    Raises KernelsUnavailableError (an ImportError) with the reason: the extension was not built, or a
    shared library it needs (libcublasLt, libcuda) failed to load.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if not kernels_built():
            raise KernelsUnavailableError(NO_EXTENSION_MSG)
        try:
            _preload("cublasLt", ("libcublasLt.so.13", "libcublasLt.so.*"))
        except OSError as e:
            raise KernelsUnavailableError(
                f"gpt2cu._kernels needs libcublasLt.so.13, which failed to load: {e}. "
                "Install the CUDA 13 cuBLAS wheel (pip install 'nvidia-cublas>=13,<14' cuda-pathfinder) or put "
                "the CUDA toolkit's lib64 on LD_LIBRARY_PATH."
            ) from e
        try:
            _preload("nccl", ("libnccl.so.2",))
        except OSError:
            pass  # optional: the NCCL communicator loads it itself when used
        _share_cxx_runtime()
        try:
            _module = importlib.import_module("gpt2cu._kernels")
        except ImportError as e:
            raise KernelsUnavailableError(
                f"gpt2cu._kernels is built but failed to load: {e}. A missing libcuda.so.1 means no NVIDIA "
                "driver on this machine; a missing libcublasLt means the cuBLAS wheel differs from the one "
                "it was built against."
            ) from e
        return _module
