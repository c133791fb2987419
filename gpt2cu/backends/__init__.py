"""Backends: the same ops (docs/architecture.md) over numpy (the fp32 reference) or CUDA (bf16 kernels).

Besides the ops, a backend provides the little memory API the model and trainer need:
  zeros(shape, fp32=False, param=False)  parameter dtype with param=True, float32 with fp32=True,
                                          else the activation dtype
  upload_params(host_fp32_flat, n, out=None)  a flat parameter buffer of n >= len(host) elements (zero
                                          padded), or written into `out`
  to_numpy(array)                        a float32 (or int) host copy
  set_batch(inputs, targets)             host (B, T) int32 arrays -> the backend's token/target arrays;
                                          = upload_batch(prepare_batch(inputs, targets)), whose host half
                                          (prepare) can run while the device works on the previous batch
  adamw_scalars(lr, step, grad_scale, seed, beta1, beta2)  the per-step values adamw_update reads
  from_numpy(host, out=None), fp32_copy(array)  host -> device (into `out`), bf16 -> fp32 device copy
  synchronize()
and what the trainer reports through: select_device, device_name, graphed(fn), mean_loss(losses),
mean_loss_async(losses) (float() of it waits),
mfu(flops_per_second), peak_memory(), memory_report(model, optimizer), checkpoint_dtype.
"""
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
    except Exception as e:  # no cupy, no driver, no device
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
