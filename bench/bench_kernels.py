"""Per-kernel time against its floor, at GPT-2 124M sizes, on this GPU.

    python bench/bench_kernels.py [--B 64] [--T 1024] [--reps 20] [--rows SUBSTR,...] [--no-torch]
                                  [--no-attention] [--out FILE.json]

First the two ceilings of this GPU are measured: device-to-device copy bandwidth (CuPy, a 2 GiB buffer,
read + write bytes counted) and the dense bf16 GEMM rate (torch.matmul at 8192^3 on random data when torch
has CUDA, else cuBLASLt through our matmul_forward at 8192^3). Then every op of CudaBackend runs at B*T
tokens, C = 768, 12 heads, Vp = 50304 (AdamW and the global norm over GPT-2 124M's parameters), timed
with CUDA events: 3 warm-up calls (cuBLASLt plans, scratch sizing), then the median of --reps calls.
Inputs are not rotated between calls: every activation is far larger than the 50 MB L2.

Each row: our time; its floor = max(bytes / copy bandwidth, flops / GEMM rate), with the minimum bytes
(every input read once, every output written once, "+=" outputs read and written) and the flops counted
next to each op below; floor / time, the percentage of the floor reached; and the time of the PyTorch
equivalent (bf16, same shapes) where one exists. Random data is bf16 by truncation of fp32 normals.
Then an attention table: our attention (as dispatched: the Hopper wgmma/TMA kernels on compute capability 9.x;
and forced onto the mma.sync kernels) against torch SDPA's cuDNN and FlashAttention-2 backends on three shapes,
forward and backward, in us and TFLOP/s (causal FLOPs). Then a GEMM table: every cuBLASLt product of a
training step (each layer's forward, dinp and dweight GEMMs, the LM head's per 8192-row chunk), each with
the algorithm cuBLASLt's heuristic ranks first and with the one matmul.cu's tuning chose (fc's forward, the
GeLU epilogue, also as matmul.cu runs it on Hopper: gemm_sm90.cu), the TFLOP/s of the path used against the
measured GEMM rate, and the GEMM time of a whole step; the tuner's own log (its timing of the heuristic's
first and of its pick) prints with it. The tables print last; --out writes
them, with the ceilings, as JSON. --rows keeps only the rows (and GEMM-table rows) whose name holds one of
the substrings; --no-torch skips PyTorch's timings, --no-attention the attention table.
"""
from __future__ import annotations

import argparse
import json
import statistics

import cupy as cp
import numpy as np

from gpt2cu.backends import get_backend
from gpt2cu.models.gpt2 import LM_HEAD_CHUNK_ROWS, GPTConfig

torch = F = None  # imported by import_torch(), after gpt2cu's extension (and its cuBLASLt) has loaded


def import_torch() -> bool:
    global torch, F
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return False
    return torch.cuda.is_available()

BF16, F32, I32 = 2, 4, 4  # bytes per element
C, NH, V, VP = 768, 12, 50257, 50304
HS = C // NH
TORCH_DEVICE = "cuda"


def random_bf16(shape, std=1.0):
    """A device bf16 array of N(0, std) values, generated in chunks (no full-size fp32 temporary)."""
    out = cp.empty(shape, dtype=cp.uint16)
    flat = out.reshape(-1)
    chunk = 1 << 26
    for start in range(0, flat.size, chunk):
        x = cp.random.standard_normal(min(chunk, flat.size - start), dtype=cp.float32)
        x *= std
        flat[start:start + x.size] = (x.view(cp.uint32) >> 16).astype(cp.uint16)
    return out


def median_us(fn, stream, reps, warmup=3, setup=None):
    """Median over `reps` calls of the GPU time between events recorded on `stream` around fn(); setup(), when
    given, runs before each call, outside the events (an op that overwrites its own input gets it back)."""
    cp.cuda.Device().synchronize()  # nothing of an earlier row (on any stream) overlaps this one
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    pairs = []
    for _ in range(reps):
        if setup:
            setup()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        pairs.append((start, end))
    cp.cuda.Device().synchronize()
    return 1e3 * statistics.median(cp.cuda.get_elapsed_time(s, e) for s, e in pairs)


class Bench:
    def __init__(self, be, reps, use_torch, only=None):
        self.be, self.reps, self.use_torch, self.only = be, reps, use_torch, only
        self.torch_stream = None
        if use_torch:  # torch launches on its current stream; CuPy events are recorded on that same stream
            handle = torch.cuda.current_stream().cuda_stream
            self.torch_stream = cp.cuda.ExternalStream(handle) if handle else cp.cuda.Stream.null
        self.rows = []
        self.bandwidth = self.gemm_rate = self.gemm_source = None

    def ours(self, fn, setup=None):
        return median_us(fn, self.be.stream, self.reps, setup=setup)

    def theirs(self, make):
        """Time the torch callable make() builds; its tensors are freed afterwards."""
        if not self.use_torch or make is None:
            return None
        fn = make()
        us = median_us(fn, self.torch_stream, self.reps)
        del fn
        torch.cuda.empty_cache()
        return us

    def measure_ceilings(self):
        self.bandwidth = self.copy_bandwidth()
        cp.get_default_memory_pool().free_all_blocks()  # the 4 GiB of copy buffers
        self.gemm_source, self.gemm_rate = self.gemm_rate_of_torch() if self.use_torch else self.gemm_rate_of_ours()
        if self.use_torch:
            torch.cuda.empty_cache()

    def copy_bandwidth(self, nbytes=2 << 30) -> float:
        """bytes/s of a device-to-device copy, each byte counted when read and when written."""
        src, dst = cp.empty(nbytes, dtype=cp.uint8), cp.empty(nbytes, dtype=cp.uint8)
        us = self.ours(lambda: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                                           cp.cuda.runtime.memcpyDeviceToDevice, self.be.stream.ptr))
        return 2 * nbytes / (us * 1e-6)

    def gemm_rate_of_torch(self, n=8192):
        a, b = (torch.randn(n, n, device=TORCH_DEVICE, dtype=torch.bfloat16) for _ in range(2))
        us = median_us(lambda: torch.matmul(a, b), self.torch_stream, self.reps)
        return f"torch.matmul bf16 {n}^3", 2 * n ** 3 / (us * 1e-6)

    def gemm_rate_of_ours(self, n=8192):
        a, b, out = random_bf16((n, n)), random_bf16((n, n)), cp.empty((n, n), dtype=cp.uint16)
        us = self.ours(lambda: self.be.matmul_forward(out, a, b))
        return f"cuBLASLt (our matmul_forward) bf16 {n}^3", 2 * n ** 3 / (us * 1e-6)

    def wanted(self, name):
        return not self.only or any(part in name for part in self.only)

    def row(self, name, fn, nbytes, flops, torch_make=None, setup=None):
        if not self.wanted(name):
            return
        us = self.ours(fn, setup)
        if setup:
            setup()  # torch's op reads the same inputs
        memory_us, compute_us = 1e6 * nbytes / self.bandwidth, 1e6 * flops / self.gemm_rate
        floor_us = max(memory_us, compute_us)
        self.rows.append({"name": name, "time_us": us, "floor_us": floor_us, "pct_of_floor": 100 * floor_us / us,
                          "bound": "memory" if memory_us >= compute_us else "compute", "bytes": int(nbytes),
                          "flops": int(flops), "torch_us": self.theirs(torch_make)})
        print(f"  {name}: {us:.1f} us", flush=True)


def run(args) -> dict:
    be = get_backend("cuda")  # raises, with the reason, when there is no usable GPU
    use_torch = not args.no_torch and import_torch()
    bench = Bench(be, args.reps, use_torch, args.rows.split(",") if args.rows else None)
    B, T = args.B, args.T
    N = B * T
    rng = np.random.default_rng(0)
    with be.stream:
        print("measuring the ceilings ...", flush=True)
        bench.measure_ceilings()
        inputs = rng.integers(0, V, (B, T), dtype=np.int32)
        batch = be.set_batch(inputs, rng.integers(0, V, (B, T), dtype=np.int32))
        tok, tgt = batch.tokens, batch.targets
        distinct = len(np.unique(inputs))  # wte rows the batch reads (and whose gradients it writes)
        act = lambda width, std=1.0: random_bf16((B, T, width), std)  # noqa: E731
        stat = lambda *shape: cp.zeros(shape, dtype=cp.float32)  # noqa: E731

        # ---- encoder
        wte, wpe, out = random_bf16((VP, C), 0.02), random_bf16((T, C), 0.02), act(C)
        # reads the token ids, the distinct wte rows, wpe; writes out
        bench.row("encoder fwd", lambda: be.encoder_forward(out, tok, wte, wpe),
                  N * I32 + distinct * C * BF16 + T * C * BF16 + N * C * BF16, 0,
                  lambda: torch_encoder_forward(tok, wte, wpe))
        dwte, dwpe = random_bf16((VP, C), 0.02), random_bf16((T, C), 0.02)
        # reads dout, tokens, sorted positions, bucket starts; dwte rows of the batch and dwpe: += (read + write)
        bench.row("encoder bwd", lambda: be.encoder_backward(dwte, dwpe, out, batch),
                  N * C * BF16 + 2 * N * I32 + (distinct + 1) * I32 + 2 * (distinct + T) * C * BF16, 0,
                  lambda: torch_encoder_backward(dwte, dwpe, out, tok))

        # ---- layernorm
        x, x2, residual, ln = act(C), act(C), act(C), act(C)  # x2: the layernorm backward's dout
        lnw, lnb, mean, rstd = random_bf16((C,), 0.1), random_bf16((C,), 0.1), stat(B, T), stat(B, T)
        # reads inp, weight, bias; writes out, mean, rstd
        bench.row("layernorm fwd", lambda: be.layernorm_forward(ln, mean, rstd, x, lnw, lnb),
                  2 * N * C * BF16 + 2 * C * BF16 + 2 * N * F32, 0, lambda: torch_layernorm(x, lnw, lnb))
        dlnw, dlnb = random_bf16((C,)), random_bf16((C,))
        # reads dout, inp, weight, mean, rstd; dinp, dweight, dbias: += (read + write)
        bench.row("layernorm bwd", lambda: be.layernorm_backward(residual, dlnw, dlnb, x2, x, lnw, mean, rstd),
                  4 * N * C * BF16 + C * BF16 + 2 * N * F32 + 4 * C * BF16, 0,
                  lambda: torch_layernorm_backward(x2, x, lnw, lnb))

        # ---- GeLU over (B, T, 4C)
        fch, fch_gelu, dbt4c = act(4 * C), act(4 * C), act(4 * C)
        n = N * 4 * C
        bench.row("gelu fwd", lambda: be.gelu_forward(fch_gelu, fch), 2 * n * BF16, 0,  # reads inp, writes out
                  lambda: torch_gelu(fch))
        bench.row("gelu bwd", lambda: be.gelu_backward(dbt4c, fch_gelu, fch), 3 * n * BF16, 0,  # dout, inp; dinp
                  lambda: torch_gelu_backward(fch_gelu, fch))

        # ---- matmuls of the model: (name, in, out, bias, GeLU epilogue forward / DGELU backward, the forward
        # adds the residual stream)
        logits = cp.empty((B, T, VP), dtype=cp.uint16)
        matmuls = [("qkv", C, 3 * C, True, None, False), ("attproj", C, C, True, None, True),
                   ("fc", C, 4 * C, True, "fwd", False), ("fcproj", 4 * C, C, True, "bwd", True),
                   ("lm head", C, VP, False, None, False)]
        for name, cin, cout, has_bias, gelu, adds_residual in matmuls:
            inp = fch_gelu if cin == 4 * C else ln
            w, dw = random_bf16((cout, cin), cin ** -0.5), random_bf16((cout, cin), 0.01)
            bias = random_bf16((cout,), 0.1) if has_bias else None
            dbias = random_bf16((cout,), 0.1) if has_bias else None
            y = logits if cout == VP else act(cout)
            pre = act(cout) if gelu == "fwd" else None
            stream = residual if adds_residual else None
            # reads inp, weight, bias (and the residual); writes out (and gelu_pre); 2 flops per multiply-add
            bench.row(f"matmul fwd {name} {cin}->{cout}" + (" + residual" if adds_residual else ""),
                      lambda: be.matmul_forward(y, inp, w, bias, gelu_pre=pre, residual=stream),
                      (N * cin + cout * cin + (cout if has_bias else 0) + N * cout * (2 if pre is not None else 1)
                       + (N * cout if adds_residual else 0)) * BF16, 2 * N * cin * cout,
                      lambda: torch_linear(inp, w, bias, gelu == "fwd", stream))
            dinp = act(cin)
            dpre = fch if gelu == "bwd" else None
            # reads dout, inp, weight (and the GeLU input); writes dinp; dweight, dbias: += (read + write);
            # dinp and dweight are a GEMM each
            bench.row(f"matmul bwd {name} {cin}->{cout}",
                      lambda: be.matmul_backward(dinp, dw, dbias, y, inp, w, dinp_gelu_pre=dpre),
                      (N * cout + 2 * N * cin + cout * cin + 2 * cout * cin + (2 * cout if has_bias else 0)
                       + (N * cin if dpre is not None else 0)) * BF16, 4 * N * cin * cout,
                      lambda: torch_linear_backward(dinp, dw, dbias, y, inp, w, dpre))

        # ---- attention, causal: T(T+1)/2 score entries per head, each matmul over them 2*HS flops per entry
        qkv, atty, dqkv, lse = act(3 * C), act(C), act(3 * C), stat(B, NH, T)
        triangle_matmul = B * NH * T * (T + 1) * HS
        fwd_bytes = 3 * N * C * BF16 + N * C * BF16 + B * NH * T * F32  # reads qkv; writes out, lse
        fwd_flops = 2 * triangle_matmul  # S = QK^T, O = PV
        # reads qkv, out, dout, lse; writes dqkv
        bwd_bytes = 3 * N * C * BF16 + 2 * N * C * BF16 + B * NH * T * F32 + 3 * N * C * BF16
        bwd_flops = 5 * triangle_matmul  # S again, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q
        bench.row("attention fwd", lambda: be.attention_forward(atty, lse, qkv, NH), fwd_bytes, fwd_flops,
                  lambda: torch_attention(qkv, x, B, T, backward=False))
        # (the fwd row leaves the out and lse the backward reads)
        bench.row("attention bwd", lambda: be.attention_backward(dqkv, x, qkv, atty, lse, NH), bwd_bytes, bwd_flops)
        bench.row("attention fwd+bwd", lambda: (be.attention_forward(atty, lse, qkv, NH),
                                                be.attention_backward(dqkv, x, qkv, atty, lse, NH)),
                  fwd_bytes + bwd_bytes, fwd_flops + bwd_flops, lambda: torch_attention(qkv, x, B, T, backward=True))

        # ---- classifier, on the logits the lm head wrote: reads and rewrites them (restored before each call:
        # on its own dlogits it would time other data), reads targets, writes losses
        losses = stat(B, T)
        saved_logits = logits.copy()
        bench.row("fused classifier", lambda: be.fused_classifier(losses, logits, tgt, 1.0 / N, V),
                  2 * N * VP * BF16 + N * I32 + N * F32, 0, lambda: torch_classifier(logits, tgt),
                  setup=lambda: cp.copyto(logits, saved_logits))
        del saved_logits

        # ---- optimizer over all of GPT-2 124M's parameters
        P = GPTConfig.from_descriptor("d12").num_parameters()
        params, grads = random_bf16((P,), 0.02), random_bf16((P,), 1e-3)
        master, m, v = be.fp32_copy(params), cp.zeros(P, dtype=cp.float32), cp.zeros(P, dtype=cp.float32)
        scalars = be.adamw_scalars(6e-4, 1, 1.0, 0, 0.9, 0.95)
        # reads grads; master, m, v: read + write; writes params
        bench.row(f"adamw {P / 1e6:.1f}M params",
                  lambda: be.adamw_update(params, master, grads, m, v, scalars, 0.9, 0.95, 1e-8, 0.1),
                  P * (BF16 + 3 * 2 * F32 + BF16), 0, lambda: torch_adamw(P))
        # reads grads
        bench.row(f"global norm {P / 1e6:.1f}M", lambda: be.global_norm_squared(grads), P * BF16, 0,
                  lambda: torch_global_norm(grads))
        del params, grads, master, m, v, logits
        cp.get_default_memory_pool().free_all_blocks()
        print("GEMMs, heuristic's first against the tuned choice ...", flush=True)
        gemms = gemm_table(bench, B, T)
        attention = []
        if not args.no_attention:
            print("attention against cuDNN and FlashAttention-2 ...", flush=True)
            attention = attention_table(bench, B, T)
    return {"attention": attention, "gemm": gemms, "gemm_tuning_log": tuning_log(be),
            "device": be.device_name(), "B": B, "T": T, "C": C, "n_head": NH, "padded_vocab": VP,
            "copy_bandwidth_GBps": bench.bandwidth / 1e9, "gemm_TFLOPs": bench.gemm_rate / 1e12,
            "gemm_source": bench.gemm_source, "torch": torch.__version__ if use_torch else None, "rows": bench.rows}


def gemm_products(B, T):
    """(name, rows, in, out, calls per step) of GPT-2 124M's linear layers at B x T tokens, and the LM head
    per chunk of LM_HEAD_CHUNK_ROWS rows (models/gpt2.py), as a training step runs them."""
    N, layers = B * T, GPTConfig.from_descriptor("d12").n_layer
    chunk = min(N, LM_HEAD_CHUNK_ROWS)
    return [("qkv", N, C, 3 * C, layers), ("attproj", N, C, C, layers), ("fc", N, C, 4 * C, layers),
            ("fcproj", N, 4 * C, C, layers), (f"lm head ({chunk}-row chunk)", chunk, C, VP, -(-N // chunk))]


def gemm_table(bench, B, T):
    """Each GEMM of a training step (forward with its epilogue: bias, GeLU; dinp, with DGELU after fc;
    dweight, accumulating), timed with cuBLASLt's heuristic's first algorithm and with the tuned choice
    (matmul_set_tuning 0 / 1: separate plans, so both run in this process), against the GEMM rate."""
    be, k = bench.be, bench.be.k
    if not hasattr(k, "matmul_set_tuning"):  # an extension from before the tuning
        return []
    rows = []
    hopper = cp.cuda.Device().compute_capability.startswith("9")
    for name, n, cin, cout, per_step in gemm_products(B, T):
        inp, w, dout = random_bf16((n, cin)), random_bf16((cout, cin), cin ** -0.5), random_bf16((n, cout))
        bias = random_bf16((cout,), 0.1) if cout != VP else None
        out, dinp, dw = cp.empty((n, cout), dtype=cp.uint16), cp.empty((n, cin), dtype=cp.uint16), random_bf16(
            (cout, cin), 0.01)
        pre = random_bf16((n, cout)) if name == "fc" else None          # the GeLU epilogue writes it
        dpre = random_bf16((n, cin)) if name == "fcproj" else None      # DGELU reads fc's pre-activation
        calls = [("fwd", lambda: be.matmul_forward(out, inp, w, bias, gelu_pre=pre)),
                 ("bwd dinp", lambda: be.matmul_backward(dinp, None, None, dout, inp, w, dinp_gelu_pre=dpre)),
                 ("bwd dweight", lambda: be.matmul_backward(None, dw, None, dout, inp, w))]
        for call, fn in calls:
            label = f"{name} {call} {n}x{cin}->{cout}"
            if not bench.wanted(label) and not bench.wanted("gemm"):
                continue
            times = {}
            sm90 = k.matmul_set_sm90(0) if hopper and hasattr(k, "matmul_set_sm90") else 0  # cuBLASLt's first
            for mode in (0, 1):
                k.matmul_set_tuning(mode)
                times[mode] = bench.ours(fn)
            k.matmul_set_tuning(1)
            # fc's forward as matmul.cu runs it on Hopper (gemm_sm90.cu where the shapes fit)
            gelu_gemm = name == "fc" and call == "fwd"
            if sm90:
                k.matmul_set_sm90(sm90)
            sm90_us = bench.ours(fn) if sm90 and gelu_gemm else None
            used = sm90_us if sm90_us is not None else times[1]
            flops = 2 * n * cin * cout
            rows.append({"name": label, "per_step": per_step, "heuristic_us": times[0], "tuned_us": times[1],
                         "sm90_us": sm90_us, "tflops": flops / used / 1e6,
                         "pct_of_gemm_rate": 100 * flops / used * 1e6 / bench.gemm_rate})
            print(f"  {label}: heuristic {times[0]:.1f} us, tuned {times[1]:.1f} us"
                  + (f", gemm_sm90 {sm90_us:.1f} us" if sm90_us is not None else ""), flush=True)
        del inp, w, dout, bias, out, dinp, dw, pre, dpre
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def tuning_log(be):
    return be.k.matmul_tuning_report().splitlines() if hasattr(be.k, "matmul_tuning_report") else []


# ---- PyTorch equivalents: each takes our CuPy arrays (shared through DLPack) and returns the callable to time
def tt(a, dtype=None):
    """A torch tensor over a CuPy array's memory (no copy): bf16 bits become a bf16 tensor (through int16, a
    DLPack type); other arrays keep their type unless `dtype` asks for a converted copy. None stays None."""
    if a is None:
        return None
    if a.dtype == cp.uint16:
        return torch.from_dlpack(a.view(cp.int16)).view(torch.bfloat16)
    t = torch.from_dlpack(a)
    return t if dtype is None else t.to(dtype)


def torch_encoder_forward(tokens, wte, wpe):
    tok, w, p = tt(tokens, torch.long), tt(wte), tt(wpe)
    return lambda: F.embedding(tok, w) + p


def torch_encoder_backward(dwte, dwpe, dout, tokens):
    """index_add_ (atomics, not deterministic) into dwte, a sum over the batch into dwpe."""
    tok, dw, dp, d = tt(tokens, torch.long).view(-1), tt(dwte), tt(dwpe), tt(dout)
    return lambda: (dw.index_add_(0, tok, d.view(-1, d.shape[-1])), dp.add_(d.sum(0)))


def torch_layernorm(x, weight, bias):
    xt, w, b = tt(x), tt(weight), tt(bias)
    return lambda: F.layer_norm(xt, (C,), w, b, 1e-5)


def torch_layernorm_backward(dout, x, weight, bias):
    d, xt, w, b = tt(dout).view(-1, C), tt(x).view(-1, C), tt(weight), tt(bias)
    _, mean, rstd = torch.ops.aten.native_layer_norm(xt, [C], w, b, 1e-5)
    return lambda: torch.ops.aten.native_layer_norm_backward(d, xt, [C], mean, rstd, w, b, [True, True, True])


def torch_gelu(x):
    xt = tt(x)
    return lambda: F.gelu(xt, approximate="tanh")


def torch_gelu_backward(dout, x):
    d, xt = tt(dout), tt(x)
    return lambda: torch.ops.aten.gelu_backward(d, xt, approximate="tanh")


def torch_linear(x, weight, bias, gelu, residual=None):
    """F.linear; with gelu, then F.gelu (torch has no fused epilogue here); with a residual, one addmm onto
    residual + bias (added once, outside the timing: the GEMM with a C matrix is what is compared)."""
    xt, w, b = tt(x), tt(weight), tt(bias)
    if gelu:
        return lambda: F.gelu(F.linear(xt, w, b), approximate="tanh")
    if residual is not None:
        c = tt(residual).view(-1, w.shape[0]) + (b if b is not None else 0)
        rows = xt.view(-1, w.shape[1])
        return lambda: torch.addmm(c, rows, w.t())
    return lambda: F.linear(xt, w, b)


def torch_linear_backward(dinp, dweight, dbias, dout, inp, weight, gelu_pre):
    """dinp = dout @ W (then the GeLU backward), dW += dout^T inp (addmm_), db += colsum(dout)."""
    out_cols, in_cols = dout.shape[-1], inp.shape[-1]
    dx, dw, db = tt(dinp).view(-1, in_cols), tt(dweight), tt(dbias)
    d, x, w, pre = tt(dout).view(-1, out_cols), tt(inp).view(-1, in_cols), tt(weight), tt(gelu_pre)

    def step():
        if pre is None:
            torch.matmul(d, w, out=dx)
        else:  # a new tensor: copying it into dx would add traffic the fused epilogue does not have
            torch.ops.aten.gelu_backward(d @ w, pre.view(dx.shape), approximate="tanh")
        dw.addmm_(d.t(), x)
        if db is not None:
            db.add_(d.sum(0))
    return step


def torch_global_norm(grads):
    g = tt(grads)
    return lambda: torch.linalg.vector_norm(g, dtype=torch.float32)


def torch_attention(qkv, dout, B, T, backward):
    """Flash attention (SDPA restricted to the flash backend) on (B, NH, T, HS) tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    heads = lambda a: a.view(B, T, NH, HS).transpose(1, 2).contiguous()  # noqa: E731
    q, k, v = (heads(t) for t in tt(qkv).split(C, dim=-1))
    do = heads(tt(dout))
    if not backward:
        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fwd
    for t in (q, k, v):
        t.requires_grad_()

    def fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(o, (q, k, v), do)
    return fwd_bwd


def attention_shapes(B, T):
    """(B, T, NH, HS) of the attention table: GPT-2 124M's heads, head size 128 at the same width, and twice
    the sequence with 32 heads (B=64, T=1024: issue 14's three shapes)."""
    return [(B, T, NH, HS), (B, T, C // 128, 128), (max(1, B // 4), 2 * T, 32, 64)]


def attention_table(bench, B, T):
    """Our attention (as dispatched, and forced onto the mma.sync kernels) and torch SDPA's cuDNN and
    FlashAttention-2 backends, forward and backward, on the same shapes and GPU. TFLOP/s count causal FLOPs:
    forward 2 * B*NH*T*(T+1)*HS (S = QK^T and O = PV over the T(T+1)/2 kept scores), backward 2.5 times that.
    torch's backward is timed as (forward + backward through autograd) - forward; its tensors are
    contiguous (B, NH, T, HS) copies (the transposes are not timed)."""
    be = bench.be
    rows = []
    for b, t, nh, hs in attention_shapes(B, T):
        c = nh * hs
        qkv, dout = random_bf16((b, t, 3 * c)), random_bf16((b, t, c))
        out, dqkv = cp.empty((b, t, c), dtype=cp.uint16), cp.empty((b, t, 3 * c), dtype=cp.uint16)
        lse = cp.empty((b, nh, t), dtype=cp.float32)
        flops = 2.0 * b * nh * t * (t + 1) * hs
        shape = f"B={b} T={t} NH={nh} HS={hs}"
        timings = []
        for label, backend in (("gpt2cu", 0), ("gpt2cu mma.sync", 1)):
            be.k.attention_set_backend(backend)
            try:
                fwd = bench.ours(lambda: be.attention_forward(out, lse, qkv, nh))
                bwd = bench.ours(lambda: be.attention_backward(dqkv, dout, qkv, out, lse, nh))
            finally:
                be.k.attention_set_backend(0)
            timings.append((label, fwd, bwd))
        if bench.use_torch:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            heads = lambda a: a.view(b, t, nh, hs).transpose(1, 2).contiguous()  # noqa: E731
            q, k, v = (heads(x) for x in tt(qkv).split(c, dim=-1))
            qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
            do = heads(tt(dout))
            for label, sdpa_backend in (("cuDNN (torch SDPA)", SDPBackend.CUDNN_ATTENTION),
                                        ("FlashAttention-2 (torch SDPA)", SDPBackend.FLASH_ATTENTION)):
                def fwd_only():
                    with sdpa_kernel(sdpa_backend), torch.no_grad():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def fwd_bwd():
                    with sdpa_kernel(sdpa_backend):
                        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                        return torch.autograd.grad(o, (qg, kg, vg), do)
                try:
                    fwd = median_us(fwd_only, bench.torch_stream, bench.reps)
                    bwd = median_us(fwd_bwd, bench.torch_stream, bench.reps) - fwd
                except RuntimeError as e:  # a backend that does not take this shape on this GPU
                    print(f"  {label} {shape}: {e}", flush=True)
                    continue
                timings.append((label, fwd, bwd))
            del q, k, v, qg, kg, vg, do
            torch.cuda.empty_cache()
        for label, fwd, bwd in timings:
            rows.append({"shape": shape, "kernel": label, "fwd_us": fwd, "bwd_us": bwd,
                         "fwd_TFLOPs": flops / fwd / 1e6, "bwd_TFLOPs": 2.5 * flops / bwd / 1e6})
            print(f"  attention {shape} {label}: fwd {fwd:.1f} us, bwd {bwd:.1f} us", flush=True)
        del qkv, dout, out, dqkv, lse
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def torch_classifier(logits, targets):
    """Cross-entropy over the first V columns, forward and backward (autograd) into the padded logits."""
    z = tt(logits).view(-1, VP).detach().requires_grad_()
    t = tt(targets, torch.long).view(-1)
    return lambda: torch.autograd.grad(F.cross_entropy(z[:, :V], t, reduction="sum"), z)


def torch_adamw(P):
    """torch's fused AdamW over one fp32 tensor of P parameters (fp32 weights, no master copy)."""
    p = torch.randn(P, device=TORCH_DEVICE) * 0.02
    p.requires_grad_()
    p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW([p], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    return opt.step


def print_table(result):
    print(f"\n{result['device']}: B={result['B']} T={result['T']}  copy bandwidth "
          f"{result['copy_bandwidth_GBps']:.0f} GB/s (read + write)  GEMM {result['gemm_TFLOPs']:.0f} TFLOP/s "
          f"({result['gemm_source']})")
    header = (f"{'op':<36} {'time us':>10} {'floor us':>10} {'% floor':>8} {'bound':>8} {'MB':>9} {'GFLOP':>9} "
              f"{'torch us':>10}")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        torch_us = f"{r['torch_us']:.1f}" if r["torch_us"] is not None else "-"
        print(f"{r['name']:<36} {r['time_us']:>10.1f} {r['floor_us']:>10.1f} {r['pct_of_floor']:>7.1f}% "
              f"{r['bound']:>8} {r['bytes'] / 1e6:>9.1f} {r['flops'] / 1e9:>9.1f} {torch_us:>10}")
    if result.get("gemm"):
        print(f"\nGEMMs of a training step: cuBLASLt heuristic's first vs the tuned choice, and fc's forward on "
              f"Hopper (gemm_sm90.cu) where matmul.cu runs it; TFLOP/s and % of the "
              f"{result['gemm_TFLOPs']:.0f} TFLOP/s GEMM rate of the path used")
        header = (f"{'GEMM':<44} {'per step':>8} {'heur. us':>9} {'tuned us':>9} {'sm90 us':>9} {'TFLOP/s':>8} "
                  f"{'% rate':>7}")
        print(header)
        print("-" * len(header))
        for r in result["gemm"]:
            sm90_us = f"{r['sm90_us']:.1f}" if r.get("sm90_us") is not None else "-"
            print(f"{r['name']:<44} {r['per_step']:>8} {r['heuristic_us']:>9.1f} {r['tuned_us']:>9.1f} "
                  f"{sm90_us:>9} {r['tflops']:>8.1f} {r['pct_of_gemm_rate']:>6.1f}%")
        before = sum(r["per_step"] * r["heuristic_us"] for r in result["gemm"]) / 1e3
        after = sum(r["per_step"] * r["tuned_us"] for r in result["gemm"]) / 1e3
        used = sum(r["per_step"] * (r["sm90_us"] if r.get("sm90_us") is not None else r["tuned_us"])
                   for r in result["gemm"]) / 1e3
        print(f"GEMM time of one step: {before:.2f} ms with the heuristic's first, {after:.2f} ms tuned "
              f"({after - before:+.2f} ms), {used:.2f} ms as run (the Hopper GeLU GEMM where it applies)")
        print("tuner log (cache key, how chosen):")
        for line in result.get("gemm_tuning_log", []):
            print("  " + line)
    if result.get("attention"):
        print("\nattention, causal (TFLOP/s: causal FLOPs; torch bwd = fwd+bwd - fwd)")
        header = f"{'shape':<26} {'kernel':<30} {'fwd us':>9} {'TFLOP/s':>8} {'bwd us':>9} {'TFLOP/s':>8}"
        print(header)
        print("-" * len(header))
        for r in result["attention"]:
            print(f"{r['shape']:<26} {r['kernel']:<30} {r['fwd_us']:>9.1f} {r['fwd_TFLOPs']:>8.1f} "
                  f"{r['bwd_us']:>9.1f} {r['bwd_TFLOPs']:>8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=64, help="batch size (sequences)")
    parser.add_argument("--T", type=int, default=1024, help="sequence length")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per op (the median is reported)")
    parser.add_argument("--rows", help="comma-separated substrings: only the rows whose name holds one")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's timings")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention table")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    print_table(result)


if __name__ == "__main__":
    main()
