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
from ..formats import bf16_bits_to_f32, f32_to_bf16_bits
from .base import Backend, Batch

BF16 = np.uint16

# dense bf16 tensor-core peak (FLOP/s) by device name, as llm.c's MFU table
_PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12),
              ("L40S", 362.0e12), ("A10", 125.0e12), ("RTX 4090", 165.2e12))


def ptr(a) -> int:
    return 0 if a is None else a.data.ptr


def sort_tokens(tokens: np.ndarray) -> np.ndarray:
    """Positions of the flat tokens in stable sorted order. GPT-2 ids fit 16 bits, where numpy's stable
    sort is a radix sort (~6x faster than on int32 at 64K tokens)."""
    if tokens.size and 0 <= tokens.min() and tokens.max() < 1 << 16:
        tokens = tokens.astype(np.uint16)
    return np.argsort(tokens, kind="stable")


class DeviceBatch(Batch):
    """A batch in fixed device buffers (one set per shape, kept for the run: a captured graph holds their
    addresses), with what the deterministic encoder backward precomputes from the tokens."""

    def __init__(self, tokens, targets, sorted_positions, bucket_starts, num_buckets):
        super().__init__(tokens, targets)
        self.sorted_positions, self.bucket_starts, self.num_buckets = sorted_positions, bucket_starts, num_buckets


class StagedBatch:
    """One batch in pinned host memory, laid out as the device buffers it is copied into: tokens,
    targets, the positions sorted by token, the start of each run of equal tokens (+ the end) and the
    number of runs. Reusable once its last upload has run on the GPU."""

    def __init__(self, shape):
        import cupyx
        n = int(np.prod(shape))
        self.tokens = cupyx.empty_pinned(shape, np.int32)
        self.targets = cupyx.empty_pinned(shape, np.int32)
        self.sorted_positions = cupyx.empty_pinned(n, np.int32)
        self.bucket_starts = cupyx.empty_pinned(n + 1, np.int32)
        self.num_buckets = cupyx.empty_pinned(1, np.int32)
        self._uploaded = None  # CUDA event after the last upload's copies
        self._held = False     # prepared, not uploaded yet

    def reusable(self, shape) -> bool:
        return (self.tokens.shape == shape and not self._held
                and (self._uploaded is None or self._uploaded.done))

    def fill(self, inputs, targets):
        self.tokens[...] = inputs
        self.has_targets = targets is not None
        if self.has_targets:
            self.targets[...] = targets
        flat = self.tokens.ravel()
        order = sort_tokens(flat)
        self.sorted_positions[:] = order
        sorted_tokens = flat[order]
        starts = np.flatnonzero(sorted_tokens[1:] != sorted_tokens[:-1]) + 1
        count = starts.size + 1
        self.bucket_starts[0] = 0
        self.bucket_starts[1:count] = starts
        self.bucket_starts[count] = flat.size
        self.num_buckets[0] = count
        self._held = True

    def uploaded(self, stream):
        self._uploaded = stream.record()
        self._held = False


class ScalarsRead:
    """The first elements of float32 device arrays, copied into pinned host memory behind the work queued on
    `stream` so far: values() waits for that copy alone (an event), not for anything queued after it."""

    def __init__(self, arrays, stream):
        import cupyx
        self.host = cupyx.empty_pinned(len(arrays), np.float32)
        for i, a in enumerate(arrays):
            if a.dtype != np.float32:
                raise TypeError(f"read_scalars_async: float32 device arrays only, got {a.dtype}")
            cp.cuda.runtime.memcpyAsync(self.host.ctypes.data + 4 * i, a.data.ptr, 4,
                                        cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        self.done = stream.record()

    def values(self) -> list[float]:
        self.done.synchronize()
        return [float(x) for x in self.host]

    def __del__(self):
        # the pinned buffer goes back to CuPy's pool here, which does not know of the copy into it: not before
        # that copy has run (a read dropped unread, say). At interpreter exit the event may be gone already.
        try:
            self.done.synchronize()
        except Exception:
            pass


class PendingScalar:
    """A device scalar still being computed on `stream`. The read goes through that stream, not CuPy's
    current one, which is not always ours (seen falling back to the legacy stream during model set-up)."""

    def __init__(self, value, stream):
        self.value, self.stream = value, stream

    def __float__(self) -> float:
        return float(self.value.get(stream=self.stream))


class CudaBackend(Backend):
    name = "cuda"
    checkpoint_dtype = "bf16"  # llm.c's train_gpt2cu writes bf16 model files (version 5)
    xp = cp
    # the causal attention kernel over the cached rows: one launch, the very computation of the full forward
    kv_cache_attention = "kernel"

    def __init__(self, device: int = 0):
        self.k = load_kernels()
        self.select_device(device)

    def select_device(self, device: int):
        cp.cuda.Device(device).use()
        self.device = device
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.stream.use()  # CuPy's own work (copies, fills) joins the kernels' stream
        self._scratch = cp.empty(0, dtype=np.float32)
        self._batches = {}  # (B, T) -> the DeviceBatch of that shape
        self._staging = []  # StagedBatch slots in pinned memory, reused once their upload is done
        self._norm = cp.zeros(1, dtype=np.float32)
        self._adamw_scalars = cp.zeros(8, dtype=np.uint32)  # struct AdamWScalars: 4 floats + seed + pad
        self._peak_pool = 0
        self._grown = {}  # name -> bf16 buffers grown to the largest size asked for (_grown_of)
        self._uniforms = cp.zeros(0, dtype=np.float32)  # sample_logits' draws, uploaded

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

    def activation_to_fp32(self, a):
        with self.stream:
            return (a.astype(cp.uint32) << 16).view(cp.float32)  # bf16 bits -> float32, exact

    def store_fp32(self, out, f32):
        with self.stream:
            f32 = cp.ascontiguousarray(f32, dtype=cp.float32)
        self.k.float_to_bf16(ptr(out), ptr(f32), f32.size, self.stream.ptr)

    def fp32_copy(self, a):
        """A float32 device copy of a bf16 device array (master weights at start-up and on resume)."""
        out = cp.empty(a.shape, dtype=np.float32)
        self.k.bf16_to_float(ptr(out), ptr(a), a.size, self.stream.ptr)
        return out

    def on_stream(self):
        return self.stream

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

    def _grown_of(self, name: str, elements: int):
        """A bf16 device buffer of at least `elements` zero-initialized elements, kept under `name`; grows only
        during the eager warm-up step, as _scratch_of."""
        buffer = self._grown.get(name)
        if buffer is None or buffer.size < elements:
            self.stream.synchronize()
            with self.stream:
                buffer = self._grown[name] = cp.zeros(int(elements), dtype=BF16)
        return buffer[:elements]

    # ---- batches ------------------------------------------------------------------------------
    # A batch reaches the GPU in two halves so the host's half can overlap the GPU's work on the
    # previous batch: prepare_batch (host: the token sort the deterministic encoder backward needs,
    # written into pinned staging memory) and upload_batch (asynchronous copies into the fixed device
    # buffers a captured graph reads, queued behind whatever the stream is running).
    def prepare_batch(self, inputs, targets=None) -> "StagedBatch":
        inputs = np.asarray(inputs)
        if targets is not None and np.shape(targets) != inputs.shape:
            raise ValueError(f"targets of shape {np.shape(targets)} for inputs of shape {inputs.shape}")
        slot = next((s for s in self._staging if s.reusable(inputs.shape)), None)
        if slot is None:
            slot = StagedBatch(inputs.shape)
            self._staging.append(slot)
        slot.fill(inputs, targets)
        return slot

    def upload_batch(self, staged: "StagedBatch") -> DeviceBatch:
        """Queues the copies of a prepared batch into the fixed buffers of its shape."""
        shape = staged.tokens.shape
        if shape not in self._batches:  # kept for the run: a captured graph holds these addresses
            n = staged.tokens.size
            with self.stream:
                self._batches[shape] = DeviceBatch(
                    cp.empty(shape, np.int32), cp.empty(shape, np.int32), cp.empty(n, np.int32),
                    cp.empty(n + 1, np.int32), cp.empty(1, np.int32))
        b = self._batches[shape]
        stream = self.stream
        names = ("tokens", "targets", "sorted_positions", "num_buckets") if staged.has_targets else (
            "tokens", "sorted_positions", "num_buckets")
        for name in names:
            getattr(b, name).set(getattr(staged, name), stream=stream)
        count = int(staged.num_buckets[0]) + 1
        b.bucket_starts[:count].set(staged.bucket_starts[:count], stream=stream)
        staged.uploaded(stream)
        if staged.has_targets:
            return b
        return DeviceBatch(b.tokens, None, b.sorted_positions, b.bucket_starts, b.num_buckets)

    def mean_loss(self, losses) -> float:
        return float(self.to_numpy(losses).mean())

    def mean_loss_async(self, losses) -> "PendingScalar":
        """The mean loss, computed on the stream without waiting; float() of the result waits for it."""
        with self.stream:
            return PendingScalar(losses.mean(), self.stream)

    def read_scalars_async(self, *arrays) -> ScalarsRead:
        return ScalarsRead(arrays, self.stream)

    def loss_sum(self, pending) -> cp.ndarray:
        """The sum of mean_loss_async results as a (1,) float32 device array, on the stream: no wait."""
        with self.stream:
            total = pending[0].value.astype(cp.float32).reshape(1)
            for p in pending[1:]:
                total += p.value
        return total

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

    # ---- ops ------------------------------------------------------------------------------------
    def zero_(self, a):
        cp.cuda.runtime.memsetAsync(ptr(a), 0, a.nbytes, self.stream.ptr)

    def gather_rows(self, out, src, index):
        K, C = out.shape
        self.k.gather_rows(ptr(out), ptr(src), ptr(index), K, C, self.stream.ptr)

    def scatter_rows(self, out, src, index):
        K, C = src.shape
        self.k.scatter_rows(ptr(out), ptr(src), ptr(index), K, C, self.stream.ptr)

    def accumulate(self, out, x):
        if out.shape != x.shape:
            raise ValueError(f"accumulate: shapes {out.shape} and {x.shape} differ")
        add = self.k.bf16_accumulate_fp32 if x.dtype == np.float32 else self.k.bf16_accumulate
        add(ptr(out), ptr(x), out.size, self.stream.ptr)

    def encoder_forward(self, out, tokens, wte, wpe):
        B, T, C = out.shape
        self.k.encoder_forward(ptr(out), ptr(tokens), ptr(wte), ptr(wpe), B, T, C, self.stream.ptr)

    def encoder_backward(self, dwte, dwpe, dout, batch: DeviceBatch):
        B, T, C = dout.shape
        self.k.encoder_backward(ptr(dwte), ptr(dwpe), ptr(dout), ptr(batch.tokens), ptr(batch.sorted_positions),
                                ptr(batch.bucket_starts), ptr(batch.num_buckets), B, T, C, self.stream.ptr)

    def layernorm_forward(self, out, mean, rstd, inp, weight, bias):
        C = inp.shape[-1]
        self.k.layernorm_forward(ptr(out), ptr(mean), ptr(rstd), ptr(inp), ptr(weight), ptr(bias),
                                 inp.size // C, C, self.stream.ptr)

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, dinp_sum=None):
        C = inp.shape[-1]
        N = inp.size // C
        if dinp_sum is not None and (dinp_sum.dtype != np.float32 or dinp_sum.size != C):
            raise ValueError(f"layernorm_backward: dinp_sum must be {C} fp32 values")
        scratch, floats = self._scratch_of(self.k.layernorm_backward_scratch_floats(N, C))
        self.k.layernorm_backward(ptr(dinp), ptr(dweight), ptr(dbias), ptr(dout), ptr(inp), ptr(weight),
                                  ptr(mean), ptr(rstd), scratch, floats, N, C, self.stream.ptr, ptr(dinp_sum))

    def matmul_forward(self, out, inp, weight, bias=None, gelu_pre=None, residual=None):
        C, OC = inp.shape[-1], weight.shape[0]
        if residual is not None and residual.size != out.size:
            raise ValueError(f"matmul_forward: residual has {residual.size} elements, out {out.size}")
        self.k.matmul_forward(ptr(out), ptr(gelu_pre), ptr(inp), ptr(weight), ptr(bias), ptr(residual),
                              inp.size // C, C, OC, self.stream.ptr)

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, dinp_gelu_pre=None, dinp_gelu_dbias=None,
                        dinp_head_dot=None, head_dot_with=None, gelu_of_pre=None):
        C, OC = inp.shape[-1], weight.shape[0]
        N = inp.size // C
        head_size, T = 0, 0
        if dinp_head_dot is not None:  # (B, NH, T) fp32, the head size C / NH
            B, n_head, T = dinp_head_dot.shape
            if dinp_head_dot.dtype != np.float32 or B * T != N or C % n_head or head_dot_with is None or \
                    head_dot_with.size != N * C:
                raise ValueError(f"matmul_backward: dinp_head_dot must be (B, NH, T) fp32 with B * T = {N} rows, "
                                 f"NH dividing {C}, and head_dot_with of dinp's size")
            head_size = C // n_head
        scratch, floats = self._scratch_of(self.k.matmul_backward_scratch_floats(
            N, C, OC, dbias is not None,
            dinp is not None and (dinp_gelu_pre is not None or dinp_head_dot is not None), dinp_gelu_dbias is not None))
        self.k.matmul_backward(ptr(dinp), ptr(dweight), ptr(dbias), ptr(dout), ptr(inp), ptr(weight),
                               ptr(dinp_gelu_pre), ptr(dinp_gelu_dbias), scratch, floats, N, C, OC, self.stream.ptr,
                               ptr(dinp_head_dot), ptr(head_dot_with), head_size, T, ptr(gelu_of_pre))

    def gelu_forward(self, out, inp):
        self.k.gelu_forward(ptr(out), ptr(inp), inp.size, self.stream.ptr)

    def gelu_backward(self, dinp, dout, inp):
        self.k.gelu_backward(ptr(dinp), ptr(dout), ptr(inp), inp.size, self.stream.ptr)

    def attention_forward(self, out, lse, qkv, n_head):
        self.attention_forward_gqa(out, lse, qkv, n_head, n_head)

    def attention_backward(self, dqkv, dout, qkv, out, lse, n_head, dout_head_dot=None, dqkv_bias=None):
        self.attention_backward_gqa(dqkv, dout, qkv, out, lse, n_head, n_head, dout_head_dot, dqkv_bias)

    def fused_classifier(self, losses, logits, targets, dloss, vocab_size, policy=None, entropy=None):
        Vp = logits.shape[-1]
        terms, clip = (None, 0.0) if policy is None else (policy.terms, policy.clip)
        self.k.fused_classifier(ptr(logits), ptr(losses), ptr(targets), float(dloss), ptr(terms), float(clip),
                                ptr(entropy), logits.size // Vp, vocab_size, Vp, self.stream.ptr)

    def lm_head_loss(self, losses, dhidden, dweight, logits, hidden, weight, targets, dloss, vocab_size):
        (N, C), Vp = hidden.shape, weight.shape[0]
        scratch, floats = self._scratch_of(self.k.lm_head_loss_scratch_floats(N, C, Vp))
        self.k.lm_head_loss(ptr(losses), ptr(dhidden), ptr(dweight), ptr(logits), ptr(hidden), ptr(weight),
                            ptr(targets), float(dloss), N, C, vocab_size, Vp, scratch, floats, self.stream.ptr)

    def scalar_head_forward(self, values, losses, inp, head, value_loss=None):
        C = inp.shape[-1]
        terms, clip, scale = (None, 0.0, 0.0) if value_loss is None else (value_loss.terms, value_loss.clip,
                                                                           value_loss.scale)
        self.k.scalar_head_forward(ptr(values), ptr(losses), ptr(inp), ptr(head), ptr(terms), float(clip),
                                   float(scale), inp.size // C, C, self.stream.ptr)

    def scalar_head_backward(self, dinp, dhead, dvalues, inp, head):
        C = inp.shape[-1]
        N = inp.size // C
        scratch, floats = self._scratch_of(self.k.scalar_head_backward_scratch_floats(N, C))
        self.k.scalar_head_backward(ptr(dinp), ptr(dhead), ptr(dvalues), ptr(inp), ptr(head), scratch, floats, N,
                                    C, self.stream.ptr)

    # ---- the LLaMA family's ops ----------------------------------------------------------------------
    # No position embedding: the encoder kernels with a zero wpe (adding 0 is exact) and a dwpe nobody reads,
    # until a kernel without wpe earns its place.
    def embedding_forward(self, out, tokens, wte):
        B, T, C = out.shape
        zero_wpe = self._grown_of("zero_wpe", T * C)
        self.k.encoder_forward(ptr(out), ptr(tokens), ptr(wte), ptr(zero_wpe), B, T, C, self.stream.ptr)

    def embedding_backward(self, dwte, dout, batch: DeviceBatch):
        B, T, C = dout.shape
        self.encoder_backward(dwte, self._grown_of("unread_dwpe", T * C), dout, batch)

    def rmsnorm_forward(self, out, rstd, inp, weight, eps):
        C = inp.shape[-1]
        self.k.rmsnorm_forward(ptr(out), ptr(rstd), ptr(inp), ptr(weight), float(eps), inp.size // C, C,
                               self.stream.ptr)

    def rmsnorm_backward(self, dinp, dweight, dout, inp, weight, rstd):
        C = inp.shape[-1]
        N = inp.size // C
        scratch, floats = self._scratch_of(self.k.rmsnorm_backward_scratch_floats(N, C))
        self.k.rmsnorm_backward(ptr(dinp), ptr(dweight), ptr(dout), ptr(inp), ptr(weight), ptr(rstd), scratch,
                                floats, N, C, self.stream.ptr)

    def rope_forward(self, out, inp, cos, sin, n_head, n_kv_head):
        B, T, width = inp.shape
        self.k.rope_forward(ptr(out), ptr(inp), ptr(cos), ptr(sin), B, T, n_head, n_kv_head,
                            width // (n_head + 2 * n_kv_head), self.stream.ptr)

    def rope_backward(self, dinp, dout, cos, sin, n_head, n_kv_head):
        B, T, width = dout.shape
        self.k.rope_backward(ptr(dinp), ptr(dout), ptr(cos), ptr(sin), B, T, n_head, n_kv_head,
                             width // (n_head + 2 * n_kv_head), self.stream.ptr)

    def swiglu_forward(self, out, inp):
        H = out.shape[-1]
        self.k.swiglu_forward(ptr(out), ptr(inp), out.size // H, H, self.stream.ptr)

    def swiglu_backward(self, dinp, dout, inp):
        H = dout.shape[-1]
        self.k.swiglu_backward(ptr(dinp), ptr(dout), ptr(inp), dout.size // H, H, self.stream.ptr)

    # grouped-query attention: the flash kernels read the packed qkv (B, T, (NH + 2 NKV) HS) directly
    def attention_forward_gqa(self, out, lse, qkv, n_head, n_kv_head):
        B, T, width = qkv.shape
        self.k.attention_forward(ptr(out), ptr(lse), ptr(qkv), B, T, n_head, width // (n_head + 2 * n_kv_head),
                                 self.stream.ptr, NKV=n_kv_head)

    def attention_backward_gqa(self, dqkv, dout, qkv, out, lse, n_head, n_kv_head, dout_head_dot=None,
                               dqkv_bias=None):
        B, T, width = qkv.shape
        HS = width // (n_head + 2 * n_kv_head)
        if dqkv_bias is not None and (dqkv_bias.dtype != BF16 or dqkv_bias.size != width):
            raise ValueError(f"attention_backward: dqkv_bias must be {width} bf16 (the qkv row)")
        floats = self.k.attention_backward_scratch_floats(B, T, n_head, HS)
        if dout_head_dot is not None:  # D given: the scratch's first B * NH * T floats not needed
            if dout_head_dot.dtype != np.float32 or dout_head_dot.shape != (B, n_head, T):
                raise ValueError(f"attention_backward: dout_head_dot must be ({B}, {n_head}, {T}) fp32")
            floats -= B * n_head * T
        scratch, floats = self._scratch_of(floats)
        self.k.attention_backward(ptr(dqkv), ptr(dout), ptr(qkv), ptr(out), ptr(lse), scratch, floats, B, T,
                                  n_head, HS, self.stream.ptr, NKV=n_kv_head, dout_head_dot=ptr(dout_head_dot),
                                  dqkv_bias=ptr(dqkv_bias))

    # ---- the KV-cache decoders' -----------------------------------------------------------------------
    def decode_attention(self, out, qkv, n_head, n_kv_head):
        """qkv (B, n, width): rows contiguous, sequences any whole number of rows apart (a view of a cache)."""
        B, n, width = qkv.shape
        if qkv.strides[1:] != (width * qkv.itemsize, qkv.itemsize) or qkv.strides[0] % qkv.itemsize:
            raise ValueError(f"decode_attention: qkv's rows must be contiguous (strides {qkv.strides})")
        if not out.flags.c_contiguous or out.size != B * n_head * (width // (n_head + 2 * n_kv_head)):
            raise ValueError(f"decode_attention: out of shape {out.shape} for qkv {qkv.shape}")
        self.k.decode_attention(ptr(out), ptr(qkv), qkv.strides[0] // qkv.itemsize, B, n, n_head, n_kv_head,
                                width // (n_head + 2 * n_kv_head), self.stream.ptr)

    def sample_logits(self, tokens, logprobs, logits, uniforms, vocab_size, temperature, top_k=None):
        """uniforms: the host's draws (B,), uploaded as float32 (a draw rounded up to 1 takes the last token
        of positive probability)."""
        B, Vp = tokens.size, logits.shape[-1]
        if tokens.dtype != np.int32 or logprobs.dtype != np.float32 or logprobs.size != B:
            raise ValueError("sample_logits: tokens int32 (B,), logprobs float32 (B,)")
        if not logits.flags.c_contiguous or logits.size != B * Vp:
            raise ValueError(f"sample_logits: logits of shape {logits.shape} for {B} rows")
        if self._uniforms.size < B:
            with self.stream:
                self._uniforms = cp.zeros(B, dtype=np.float32)
        self._uniforms[:B].set(np.asarray(uniforms, dtype=np.float32), stream=self.stream)
        self.k.sample_logits(ptr(tokens), ptr(logprobs), ptr(logits), ptr(self._uniforms), B, vocab_size, Vp,
                             float(temperature), int(top_k or 0), self.stream.ptr)

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

    def adamw_scalars_clipped(self, lr, step, seed, beta1, beta2, norm_squared, loss, max_norm):
        b1c, b2c = np.float32(1.0 - beta1 ** step), np.float32(1.0 - beta2 ** step)  # as adamw_scalars rounds them
        self.k.adamw_scalars_clipped(ptr(self._adamw_scalars), float(lr), float(b1c), float(b2c), seed & 0xFFFFFFFF,
                                     ptr(norm_squared), ptr(loss), float(max_norm), self.stream.ptr)
        return self._adamw_scalars

    def adamw_update(self, params, master, grads, m, v, scalars, beta1, beta2, eps, weight_decay, rounding_salt=0):
        if params.dtype == np.float32:  # a small fp32 tensor (RL's value head): no master, no rounding
            if master is not None or grads.dtype != np.float32:
                raise ValueError("adamw_update: fp32 params take fp32 grads and no master copy")
            self.k.adamw_update_fp32(ptr(params), ptr(grads), ptr(m), ptr(v), params.size, ptr(scalars), beta1, beta2,
                                     eps, weight_decay, self.stream.ptr)
            return
        self.k.adamw_update(ptr(params), ptr(master), ptr(grads), ptr(m), ptr(v), params.size, ptr(scalars),
                            beta1, beta2, eps, weight_decay, rounding_salt, self.stream.ptr)
