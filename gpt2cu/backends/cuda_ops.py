"""The CUDA backend: bf16 buffers in CuPy arrays, one compute stream, CUDA graphs, and the ops of
docs/architecture.md mapped onto gpt2cu._kernels (kernels/kernels.h).

bf16 tensors are CuPy uint16 arrays holding the raw bits; statistics, losses, master weights and AdamW
moments are float32. Every op launches on `self.stream` and allocates nothing, so a micro-step can be
captured once and replayed as a graph.
"""
from __future__ import annotations

import numpy as np
import cupy as cp

from .._native import load_kernels
from ..checkpoint import bf16_bits_to_f32, f32_to_bf16_bits

BF16 = np.uint16

# dense bf16 tensor-core peak (FLOP/s) by device name, as llm.c's MFU table
_PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12),
              ("L40S", 362.0e12), ("A10", 125.0e12), ("RTX 4090", 165.2e12))


def ptr(a) -> int:
    return 0 if a is None else a.data.ptr


class CudaBackend:
    name = "cuda"
    checkpoint_dtype = "bf16"  # llm.c's train_gpt2cu writes bf16 model files (version 5)

    def __init__(self, device: int = 0):
        self.k = load_kernels()
        self.select_device(device)

    def select_device(self, device: int):
        cp.cuda.Device(device).use()
        self.device = device
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.stream.use()  # CuPy's own work (copies, fills) joins the kernels' stream
        self._scratch = cp.empty(0, dtype=np.float32)
        self._batch = None
        self._norm = cp.zeros(1, dtype=np.float32)
        self._adamw_scalars = cp.zeros(8, dtype=np.uint32)  # struct AdamWScalars: 4 floats + seed + pad
        self._peak_pool = 0

    # ---- memory API -------------------------------------------------------------------------
    # allocations and copies run on self.stream too, so the kernels that follow see them done
    def zeros(self, shape, fp32=False, param=False):
        with self.stream:
            return cp.zeros(shape, dtype=np.float32 if fp32 else BF16)

    def upload_params(self, host_fp32, n, out=None):
        bits = np.zeros(n, dtype=BF16)
        bits[:host_fp32.size] = f32_to_bf16_bits(np.asarray(host_fp32, dtype=np.float32))
        return self.from_numpy(bits, out)

    def to_numpy(self, a):
        self.stream.synchronize()
        host = cp.asnumpy(a)
        return bf16_bits_to_f32(host) if host.dtype == BF16 else host

    def from_numpy(self, host, out=None):
        """A device copy of a host array, or the host array copied into `out` (same shape and dtype)."""
        if out is None:
            with self.stream:
                return cp.asarray(host)
        out.set(np.ascontiguousarray(host, dtype=out.dtype), stream=self.stream)
        self.stream.synchronize()
        return out

    def fp32_copy(self, a):
        """A float32 device copy of a bf16 device array (master weights at start-up and on resume)."""
        out = cp.empty(a.shape, dtype=np.float32)
        self.k.bf16_to_float(ptr(out), ptr(a), a.size, self.stream.ptr)
        return out

    def synchronize(self):
        # device-wide: CuPy's own allocations and memsets run on the legacy stream, not self.stream
        cp.cuda.Device(self.device).synchronize()
        self._peak_pool = max(self._peak_pool, cp.get_default_memory_pool().total_bytes())

    def _scratch_of(self, floats: int):
        # grows only during the eager warm-up step; graph replays see the final buffer
        if self._scratch.size < floats:
            self.stream.synchronize()
            self._scratch = cp.empty(int(floats), dtype=np.float32)
        return ptr(self._scratch), self._scratch.size

    def set_batch(self, inputs, targets):
        """Copies a host batch into the fixed device buffers the captured graph reads, with the
        token buckets the deterministic encoder backward needs."""
        inputs = np.ascontiguousarray(inputs, dtype=np.int32)
        targets = np.ascontiguousarray(targets, dtype=np.int32)
        if self._batch is None or self._batch["tokens"].shape != inputs.shape:
            n = inputs.size
            self._batch = {"tokens": cp.empty(inputs.shape, np.int32), "targets": cp.empty(inputs.shape, np.int32),
                           "sorted_positions": cp.empty(n, np.int32), "bucket_starts": cp.empty(n + 1, np.int32),
                           "num_buckets": cp.empty(1, np.int32)}
        flat = inputs.ravel()
        order = np.argsort(flat, kind="stable").astype(np.int32)
        sorted_tokens = flat[order]
        starts = np.flatnonzero(np.r_[True, sorted_tokens[1:] != sorted_tokens[:-1]]).astype(np.int32)
        b = self._batch
        with self.stream:
            b["tokens"].set(inputs, stream=self.stream)
            b["targets"].set(targets, stream=self.stream)
            b["sorted_positions"].set(order, stream=self.stream)
            b["bucket_starts"][:starts.size + 1].set(np.r_[starts, flat.size].astype(np.int32), stream=self.stream)
            b["num_buckets"].set(np.array([starts.size], np.int32), stream=self.stream)
        return b["tokens"], b["targets"]

    def mean_loss(self, losses) -> float:
        return float(self.to_numpy(losses).mean())

    def graphed(self, fn, enabled=True):
        """fn(*args) run eagerly once (cuBLASLt set-up, scratch sizing), then captured as a CUDA graph
        and replayed. The arguments must be device buffers at fixed addresses (set_batch's token buffers,
        adamw_scalars' buffer): a replay reads whatever they hold then."""
        state = {"calls": 0, "graph": None}

        def run(*args):
            with self.stream:
                if not enabled or state["calls"] == 0:
                    fn(*args)
                else:
                    if state["graph"] is None:
                        self.stream.begin_capture()
                        fn(*args)
                        state["graph"] = self.stream.end_capture()
                    state["graph"].launch(self.stream)
            state["calls"] += 1
        return run

    # ---- reporting ----------------------------------------------------------------------------
    def device_name(self) -> str:
        return cp.cuda.runtime.getDeviceProperties(self.device)["name"].decode()

    def mfu(self, flops_per_second: float):
        name = self.device_name()
        for key, peak in _PEAK_BF16:
            if key in name:
                return 100.0 * flops_per_second / peak
        return None

    def peak_memory(self) -> int:
        return max(self._peak_pool, cp.get_default_memory_pool().total_bytes())

    def memory_report(self, model, optimizer) -> dict:
        size = lambda arrays: sum(a.nbytes for a in arrays)
        return {"parameters": model.params.nbytes, "gradients": model.grads.nbytes,
                "optimizer (master, m, v)": size(optimizer.state_arrays().values()),
                "activations": size(model.acts.values()), "scratch": self._scratch.nbytes}

    # ---- ops ------------------------------------------------------------------------------------
    def zero_(self, a):
        cp.cuda.runtime.memsetAsync(ptr(a), 0, a.nbytes, self.stream.ptr)

    def encoder_forward(self, out, tokens, wte, wpe):
        B, T, C = out.shape
        self.k.encoder_forward(ptr(out), ptr(tokens), ptr(wte), ptr(wpe), B, T, C, self.stream.ptr)

    def encoder_backward(self, dwte, dwpe, dout, tokens):
        B, T, C = dout.shape
        b = self._batch
        assert tokens is b["tokens"], "encoder_backward needs the tokens of the last set_batch"
        self.k.encoder_backward(ptr(dwte), ptr(dwpe), ptr(dout), ptr(tokens), ptr(b["sorted_positions"]),
                                ptr(b["bucket_starts"]), ptr(b["num_buckets"]), B, T, C, self.stream.ptr)

    def layernorm_forward(self, out, mean, rstd, inp, weight, bias):
        C = inp.shape[-1]
        self.k.layernorm_forward(ptr(out), ptr(mean), ptr(rstd), ptr(inp), ptr(weight), ptr(bias),
                                 inp.size // C, C, self.stream.ptr)

    def fused_residual_layernorm_forward(self, residual, out, mean, rstd, inp1, inp2, weight, bias):
        C = inp1.shape[-1]
        self.k.fused_residual_layernorm_forward(ptr(residual), ptr(out), ptr(mean), ptr(rstd), ptr(inp1),
                                                ptr(inp2), ptr(weight), ptr(bias), inp1.size // C, C,
                                                self.stream.ptr)

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        C = inp.shape[-1]
        N = inp.size // C
        scratch, floats = self._scratch_of(self.k.layernorm_backward_scratch_floats(N, C))
        self.k.layernorm_backward(ptr(dinp), ptr(dweight), ptr(dbias), ptr(dout), ptr(inp), ptr(weight),
                                  ptr(mean), ptr(rstd), scratch, floats, N, C, self.stream.ptr)

    def matmul_forward(self, out, inp, weight, bias=None, gelu_pre=None):
        C, OC = inp.shape[-1], weight.shape[0]
        self.k.matmul_forward(ptr(out), ptr(gelu_pre), ptr(inp), ptr(weight), ptr(bias), inp.size // C, C, OC,
                              self.stream.ptr)

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, dinp_gelu_pre=None):
        C, OC = inp.shape[-1], weight.shape[0]
        N = inp.size // C
        scratch, floats = self._scratch_of(self.k.bias_backward_scratch_floats(N, OC) if dbias is not None else 0)
        self.k.matmul_backward(ptr(dinp), ptr(dweight), ptr(dbias), ptr(dout), ptr(inp), ptr(weight),
                               ptr(dinp_gelu_pre), scratch, floats, N, C, OC, self.stream.ptr)

    def gelu_forward(self, out, inp):
        self.k.gelu_forward(ptr(out), ptr(inp), inp.size, self.stream.ptr)

    def gelu_backward(self, dinp, dout, inp):
        self.k.gelu_backward(ptr(dinp), ptr(dout), ptr(inp), inp.size, self.stream.ptr)

    def attention_forward(self, out, lse, qkv, n_head):
        B, T, C3 = qkv.shape
        self.k.attention_forward(ptr(out), ptr(lse), ptr(qkv), B, T, n_head, C3 // 3 // n_head, self.stream.ptr)

    def attention_backward(self, dqkv, dout, qkv, out, lse, n_head):
        B, T, C3 = qkv.shape
        HS = C3 // 3 // n_head
        scratch, floats = self._scratch_of(self.k.attention_backward_scratch_floats(B, T, n_head, HS))
        self.k.attention_backward(ptr(dqkv), ptr(dout), ptr(qkv), ptr(out), ptr(lse), scratch, floats, B, T,
                                  n_head, HS, self.stream.ptr)

    def fused_classifier(self, losses, logits, targets, dloss, vocab_size):
        Vp = logits.shape[-1]
        self.k.fused_classifier(ptr(logits), ptr(losses), ptr(targets), float(dloss), logits.size // Vp,
                                vocab_size, Vp, self.stream.ptr)

    def global_norm_squared(self, grads):
        scratch, floats = self._scratch_of(self.k.global_norm_scratch_floats(grads.size))
        self.k.global_norm_squared(ptr(self._norm), ptr(grads), grads.size, scratch, floats, self.stream.ptr)
        return self._norm

    def adamw_scalars(self, lr, step, grad_scale, seed, beta1, beta2):
        host = np.zeros(8, dtype=np.uint32)
        host[:4].view(np.float32)[:] = (lr, grad_scale, 1.0 - beta1 ** step, 1.0 - beta2 ** step)
        host[4] = seed & 0xFFFFFFFF
        self._adamw_scalars.set(host, stream=self.stream)
        return self._adamw_scalars

    def adamw_update(self, params, master, grads, m, v, scalars, beta1, beta2, eps, weight_decay, rounding_salt=0):
        self.k.adamw_update(ptr(params), ptr(master), ptr(grads), ptr(m), ptr(v), params.size, ptr(scalars),
                            beta1, beta2, eps, weight_decay, rounding_salt, self.stream.ptr)
