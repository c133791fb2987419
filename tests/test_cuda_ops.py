"""Every CUDA op (gpt2cu/backends/cuda_ops.py -> kernels/*.cu) against the numpy oracle
(gpt2cu/backends/numpy_ops.py), one op at a time, then the whole model on both backends. GPU only: the
`gpu` marker (conftest.py) skips every test here, with the reason, where the CUDA backend cannot run.

Method. Inputs are drawn fresh on every run; the seed is printed and quoted by every failure message, and
GPT2CU_TEST_SEED=<seed> replays it. Inputs are rounded to bf16 first, so the kernel and the reference see
the same numbers, and the reference is the numpy op run in float64 on those numbers. Overwritten outputs
start as NaN (bf16 0x7FC0, float32 NaN), so an element a kernel fails to write fails the test. "+=" outputs
start with random values half the size of the increment (big enough that dropping them shows, small
enough not to hide a wrong increment) and the reference adds onto the same values. Sizes divide no block
size: N = B*T = 111 rows, n = 1000003 elements, vocabularies 1001 and 50257.

Metric: ||out - ref|| / ||ref|| over an output, which must also be finite everywhere. Bounds:
  BF16_REL   1e-2  a bf16 output of fp32 arithmetic carries one rounding: <= 2^-8 relative per element,
                   ~1e-3 RMS; fp32 accumulation adds ~1e-6. A 5-10x margin, while a wrong term is O(0.1).
  FP32_REL   1e-4  fp32 outputs of bf16 inputs with fp32 accumulation (mean, rstd, lse, losses): sums of
                   up to 50257 terms, ~1e-6 through tree reductions, ~5e-5 even summed sequentially.
  CHAIN_REL  2e-2  outputs computed through a bf16 intermediate (attention's P and dS, a matmul's GeLU
                   epilogue): two roundings, compounded through sums.
  MASTER_REL 1e-6  AdamW's fp32 state: a handful of fp32 operations per element on exact inputs (~1e-7).
  MODEL_REL  5e-2  a whole network in bf16 against fp32: every activation rounded (~20 ops deep, a random
                   walk of sqrt(20) * 2^-9 ~ 1e-2), and the reductions behind small gradients (biases,
                   layernorm gains) cancel, which magnifies relative error; test_gpu_training.py's bar.
Where the result is determined exactly (a sum of two bf16 numbers rounded once, rows a kernel must not
touch, zeroed columns, a deterministic reduction run twice) the test asks for identical bits.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

from gpt2cu.backends import numpy_ops as ref_ops
from gpt2cu.backends.base import PolicyLoss, ValueLoss
from gpt2cu.backends.numpy_ops import NumpyBackend
from gpt2cu.formats import bf16_bits_to_f32, f32_to_bf16_bits
from gpt2cu.models.gpt2 import GPTConfig, GPT, init_params

try:
    import cupy as cp
except ImportError:  # every test here is marked gpu, so conftest.py skips them all: nothing below runs
    cp = None

pytestmark = pytest.mark.gpu

BF16_REL, FP32_REL, CHAIN_REL, MASTER_REL, MODEL_REL = 1e-2, 1e-4, 2e-2, 1e-6, 5e-2
BF16_NAN = 0x7FC0
B, T = 3, 37  # N = 111 rows
TORCH_DEVICE = "cuda"


# ---- host <-> device, bf16 ----------------------------------------------------------------------------
def bits_of(x) -> np.ndarray:
    """bf16 bits of float values (through float32, rounding to nearest even both times, as a kernel's
    fp32 arithmetic followed by __float2bfloat16_rn does)."""
    return f32_to_bf16_bits(np.asarray(x, dtype=np.float32))


def decode(bits) -> np.ndarray:
    """float64 values of host bf16 bits (exact) or of a host float32 array."""
    bits = np.asarray(bits)
    return (bf16_bits_to_f32(bits) if bits.dtype == np.uint16 else bits).astype(np.float64)


def raw(a) -> np.ndarray:
    """A host copy of a device array's elements as stored (bf16 bits or float32), after the queued work.
    Tests run with the backend's stream current (the `cuda` fixture), so that stream is the one to wait on."""
    cp.cuda.get_current_stream().synchronize()
    return cp.asnumpy(a)


def to_host(a) -> np.ndarray:
    return decode(raw(a))


def poisoned(shape, fp32=False):
    """A device output that is NaN everywhere until a kernel writes it."""
    return cp.full(shape, np.nan, dtype=np.float32) if fp32 else cp.full(shape, BF16_NAN, dtype=np.uint16)


def bf16_ulp(x) -> np.ndarray:
    """Spacing of bf16 numbers (8 significant bits) at |x|: 2^(floor(log2|x|) - 7)."""
    _, exponent = np.frexp(x)  # x = f * 2^exponent, 0.5 <= |f| < 1
    return np.ldexp(1.0, exponent - 8)


class Case:
    """A test's random inputs, from a fresh seed each run, and its checks, whose messages quote the seed."""

    def __init__(self, label: str):
        env = os.environ.get("GPT2CU_TEST_SEED")
        self.seed = int(env) if env else np.random.SeedSequence().entropy
        self.rng = np.random.default_rng(self.seed)
        print(f"{label}: seed {self.seed}")

    def where(self, text: str) -> str:
        return f"{text} [seed {self.seed}: replay with GPT2CU_TEST_SEED={self.seed}]"

    def normal(self, shape, mean=0.0, std=1.0) -> np.ndarray:
        """Normal values, rounded to bf16 (float64 host array)."""
        return decode(bits_of(self.rng.normal(mean, std, shape)))

    def bf16(self, shape, mean=0.0, std=1.0):
        """(host float64 values, device bf16 array) holding the same bf16-exact normal values."""
        x = self.normal(shape, mean, std)
        return x, cp.asarray(bits_of(x))

    def accumulator(self, increment):
        """The starting values of a "+=" output: (host, device), random at half the increment's RMS."""
        rms = float(np.sqrt(np.mean(np.square(increment))))
        return self.bf16(increment.shape, std=0.5 * rms if rms > 0 else 1.0)

    def check(self, name, got, ref, bound):
        assert got.shape == ref.shape, self.where(f"{name}: shape {got.shape}, expected {ref.shape}")
        bad = ~np.isfinite(got)
        assert not bad.any(), self.where(f"{name}: {bad.sum()} of {got.size} elements are not finite "
                                         f"(unwritten, or overflowed), first at {np.argwhere(bad)[0]}")
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        print(f"  {name}: relative error {err:.2e} (bound {bound:.0e})")
        worst = np.unravel_index(np.abs(got - ref).argmax(), ref.shape)
        assert err <= bound, self.where(f"{name}: ||out - ref|| / ||ref|| = {err:.3e} > {bound:.0e}; largest "
                                        f"difference at {worst}: {got[worst]!r} vs {ref[worst]!r}")

    def same_bits(self, name, got, expected):
        got, expected = np.asarray(got), np.asarray(expected)
        assert got.shape == expected.shape and got.dtype == expected.dtype, self.where(
            f"{name}: {got.dtype}{got.shape}, expected {expected.dtype}{expected.shape}")
        differ = got.view(f"u{got.itemsize}") != expected.view(f"u{expected.itemsize}")
        assert not differ.any(), self.where(f"{name}: {differ.sum()} of {got.size} elements differ in their bits, "
                                            f"first at {np.argwhere(differ)[0]}")

    def zero(self, name, got):
        nonzero = got != 0
        assert not nonzero.any(), self.where(f"{name}: {nonzero.sum()} of {got.size} elements are not 0")


def assert_repeatable(case, run, first):
    """run() again, from the same starting buffers: every output must come back with the same bits."""
    for name, bits in run().items():
        case.same_bits(f"{name} (second run)", bits, first[name])


@pytest.fixture
def cuda(cuda_backend):
    """The session's CudaBackend with its stream current: CuPy's own work in a test (uploads, NaN fills,
    copies, downloads) then queues on the stream the kernels launch on, which is non-blocking and would
    not wait for the legacy default stream."""
    with cuda_backend.stream:
        yield cuda_backend


@pytest.fixture
def case(request):
    return Case(request.node.name)


# ---- encoder ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [200, 768])
def test_encoder_forward(cuda, case, C):
    """wte[token] + wpe[t] is a sum of two bf16 numbers, exact in fp32, rounded once: determined to the bit."""
    V, max_t = 1001, 64
    wte, wte_d = case.bf16((V, C), std=0.02)
    wpe, wpe_d = case.bf16((max_t, C), std=0.02)
    tokens = case.rng.integers(0, V, (B, T), dtype=np.int32)
    batch = cuda.set_batch(tokens)
    out = poisoned((B, T, C))
    cuda.encoder_forward(out, batch.tokens, wte_d, wpe_d[:T])
    case.same_bits("out", raw(out), bits_of(wte[tokens] + wpe[:T]))


@pytest.mark.parametrize("n_ids", [7, 2], ids=["small-buckets", "large-buckets"])
@pytest.mark.parametrize("C", [64, 100, 768, 1600])
def test_encoder_backward(cuda, case, C, n_ids):
    """Tokens from 7 ids (each bucket ~16 positions: one warp's) or 2 (~55: the large-bucket kernel); C 100
    takes 1-channel vectors, 1600 several column passes. Rows of other tokens and wpe rows past T keep
    their bits, and a second run reproduces the first to the bit."""
    V, max_t = 1001, 64
    ids = case.rng.choice(V, size=n_ids, replace=False)
    tokens = case.rng.choice(ids, size=(B, T)).astype(np.int32)
    batch = cuda.set_batch(tokens)
    dout, dout_d = case.bf16((B, T, C))
    inc = {"dwte": np.zeros((V, C)), "dwpe": np.zeros((max_t, C))}
    ref_ops.encoder_backward(inc["dwte"], inc["dwpe"][:T], dout, tokens)
    start = {name: case.accumulator(v) for name, v in inc.items()}

    def run():
        acc = {name: dev.copy() for name, (_, dev) in start.items()}
        cuda.encoder_backward(acc["dwte"], acc["dwpe"][:T], dout_d, batch)
        return {name: raw(a) for name, a in acc.items()}

    first = run()
    for name, (host, _) in start.items():
        case.check(name, decode(first[name]), host + inc[name], BF16_REL)
    absent = np.setdiff1d(np.arange(V), ids)
    case.same_bits("dwte rows of tokens not in the batch", first["dwte"][absent], bits_of(start["dwte"][0][absent]))
    case.same_bits("dwpe rows past T", first["dwpe"][T:], bits_of(start["dwpe"][0][T:]))
    assert_repeatable(case, run, first)


# ---- rows by an index list (kernels/rows.cu) ----------------------------------------------------------
# C 768: 16-byte rows; C 36: 2-byte accesses (C % 8 != 0); offset 1: a buffer off its 16-byte alignment.
@pytest.mark.parametrize("N, K, C, offset", [(1000, 37, 768, 0), (301, 301, 36, 0), (500, 129, 768, 1)])
def test_gather_and_scatter_rows(cuda, case, N, K, C, offset):
    """gather_rows and scatter_rows against numpy's fancy indexing on a random permutation's first K rows:
    copies, so the bits must match; a scatter leaves every row it does not list as it was."""
    src, src_d = case.bf16((N * C + offset,))
    index = case.rng.permutation(N)[:K].astype(np.int32)
    index_d = cp.asarray(index)
    rows = cp.asarray(np.full(K * C + offset, bits_of(np.array(7.0))[()]))
    cuda.gather_rows(rows[offset:].reshape(K, C), src_d[offset:].reshape(N, C), index_d)
    case.same_bits("gathered rows", raw(rows[offset:]).reshape(K, C), bits_of(src[offset:].reshape(N, C)[index]))
    before, out_d = case.bf16((N * C + offset,))
    cuda.scatter_rows(out_d[offset:].reshape(N, C), rows[offset:].reshape(K, C), index_d)
    expected = before[offset:].reshape(N, C).copy()
    expected[index] = src[offset:].reshape(N, C)[index]
    case.same_bits("scattered rows", raw(out_d[offset:]).reshape(N, C), bits_of(expected))


def test_batches_prepared_ahead_reach_the_device_intact(cuda, case):
    """prepare_batch's host half runs ahead of the GPU (train.py prepares the next micro-batch while the
    current one runs): batches prepared ahead and kept across a set_batch of another batch (an evaluation
    between steps), then uploaded behind queued work while the host prepares the next, each reach the
    device with their tokens, targets and token buckets; also ids past 16 bits (the sort's int32 path).
    Each shape keeps its device buffers (a captured graph reads them), across uploads of other shapes."""
    slow, product = cp.ones((4096, 4096), dtype=np.float32), cp.empty((4096, 4096), dtype=np.float32)
    expected = [(case.rng.integers(0, 50257, (B, T), dtype=np.int32), case.rng.integers(0, 50257, (B, T)))
                for _ in range(4)]
    expected[3][0][0, :5] = [70000, 1 << 20, 70000, 0, 50256]

    def check(b, inputs, targets):
        flat = inputs.ravel()
        order = np.argsort(flat, kind="stable")
        starts = np.flatnonzero(np.r_[True, flat[order][1:] != flat[order][:-1]])
        nb = int(raw(b.num_buckets)[0])
        case.same_bits("tokens", raw(b.tokens), inputs)
        case.same_bits("targets", raw(b.targets), targets.astype(np.int32))
        case.same_bits("sorted positions", raw(b.sorted_positions), order.astype(np.int32))
        case.same_bits("bucket starts", raw(b.bucket_starts)[:nb + 1], np.r_[starts, flat.size].astype(np.int32))

    def busy():  # ~50 ms of queued work, so the uploads queued next wait behind it
        for _ in range(10):
            cp.matmul(slow, slow, out=product)

    staged = [cuda.prepare_batch(inputs, targets) for inputs, targets in expected[:3]]
    first = cuda.set_batch(*expected[3])
    check(first, *expected[3])
    first_tokens = first.tokens.data.ptr
    cuda.set_batch(np.zeros((1, 5), np.int32), np.zeros((1, 5), np.int32))  # another shape in between
    for (inputs, targets), staged_batch in zip(expected, staged):
        busy()
        batch = cuda.upload_batch(staged_batch)
        cuda.prepare_batch(*expected[3])  # while batch's copies still wait: must not refill its memory
        check(batch, inputs, targets)
        assert batch.tokens.data.ptr == first_tokens, "a shape's device buffers must keep their address (graphs)"
    with pytest.raises(ValueError, match="targets of shape"):
        cuda.prepare_batch(np.zeros((B, T), np.int32), np.zeros(T, np.int32))


# ---- layernorm ----------------------------------------------------------------------------------------
def layernorm_params(case, C):
    weight, weight_d = case.bf16((C,), mean=1.0, std=0.1)
    bias, bias_d = case.bf16((C,), std=0.1)
    return weight, weight_d, bias, bias_d


def layernorm_reference(x, weight, bias) -> dict:
    ref = {"out": np.empty(x.shape), "mean": np.empty(x.shape[:-1]), "rstd": np.empty(x.shape[:-1])}
    ref_ops.layernorm_forward(ref["out"], ref["mean"], ref["rstd"], x, weight, bias)
    return ref


@pytest.mark.parametrize("b, t, C", [(B, T, 64), (B, T, 200), (B, T, 768), (1, 1, 768), (B, T, 1600)])
def test_layernorm_forward(cuda, case, b, t, C):
    """Inputs have mean 0.5 (as the residual stream does), so mean and rstd are far from 0. One row alone, and C = 1600
    (7 vectors a lane, the last partly idle)."""
    x, x_d = case.bf16((b, t, C), mean=0.5)
    weight, weight_d, bias, bias_d = layernorm_params(case, C)
    out, mean, rstd = poisoned((b, t, C)), poisoned((b, t), fp32=True), poisoned((b, t), fp32=True)
    cuda.layernorm_forward(out, mean, rstd, x_d, weight_d, bias_d)
    ref = layernorm_reference(x, weight, bias)
    for name, got in (("out", out), ("mean", mean), ("rstd", rstd)):
        case.check(name, to_host(got), ref[name], BF16_REL if name == "out" else FP32_REL)


@pytest.mark.parametrize("op", ["layernorm_forward", "layernorm_backward"])
def test_layernorm_rejects_channels_not_multiple_of_8(cuda, op):
    C = 100
    act = lambda: cp.zeros((B, T, C), np.uint16)  # noqa: E731
    stat = lambda: cp.zeros((B, T), np.float32)  # noqa: E731
    vec = lambda: cp.zeros(C, np.uint16)  # noqa: E731
    args = {"layernorm_forward": lambda: (act(), stat(), stat(), act(), vec(), vec()),
            "layernorm_backward": lambda: (act(), vec(), vec(), act(), act(), vec(), stat(), stat())}[op]()
    with pytest.raises(RuntimeError):
        getattr(cuda, op)(*args)


@pytest.mark.parametrize("dinp_sum", [False, True], ids=["", "dinp_sum"])
@pytest.mark.parametrize("b, t, C", [(B, T, 64), (B, T, 200), (B, T, 768), (4, 1001, 768), (B, T, 1600),
                                     (2, 5, 2048)])
def test_layernorm_backward(cuda, case, b, t, C, dinp_sum):
    """dinp, dweight and dbias all accumulate; mean and rstd come in as fp32, as the forward saved them.
    4004 rows span many blocks of the dweight/dbias reduction; two runs agree to the bit. dinp_sum (fp32)
    accumulates the new dinp's column sums: the reference sums the kernel's own stored dinp in float64 (so the
    bound is fp32 summation, not bf16), and checks it against the exact dinp at the bf16 bound."""
    dout, dout_d = case.bf16((b, t, C))
    x, x_d = case.bf16((b, t, C), mean=0.5)
    weight, weight_d, bias, _ = layernorm_params(case, C)
    stats = layernorm_reference(x, weight, bias)
    mean, rstd = stats["mean"].astype(np.float32), stats["rstd"].astype(np.float32)  # the kernel's inputs
    mean_d, rstd_d = cp.asarray(mean), cp.asarray(rstd)
    inc = {"dinp": np.zeros((b, t, C)), "dweight": np.zeros(C), "dbias": np.zeros(C)}
    ref_ops.layernorm_backward(inc["dinp"], inc["dweight"], inc["dbias"], dout, x, weight, mean, rstd)
    start = {name: case.accumulator(v) for name, v in inc.items()}
    sum_start = case.normal(C).astype(np.float32) if dinp_sum else None

    def run():
        acc = {name: dev.copy() for name, (_, dev) in start.items()}
        if dinp_sum:
            acc["dinp_sum"] = cp.asarray(sum_start)
        cuda.layernorm_backward(acc["dinp"], acc["dweight"], acc["dbias"], dout_d, x_d, weight_d, mean_d, rstd_d,
                                dinp_sum=acc.get("dinp_sum"))
        return {name: raw(a) for name, a in acc.items()}

    first = run()
    for name, (host, _) in start.items():
        case.check(name, decode(first[name]), host + inc[name], BF16_REL)
    if dinp_sum:
        stored = decode(first["dinp"]).reshape(-1, C)
        case.check("dinp_sum", first["dinp_sum"].astype(np.float64), sum_start + stored.sum(axis=0), FP32_REL)
        exact = start["dinp"][0] + inc["dinp"]
        case.check("dinp_sum (exact dinp)", first["dinp_sum"].astype(np.float64),
                   sum_start + exact.reshape(-1, C).sum(axis=0), BF16_REL)
    assert_repeatable(case, run, first)


# ---- matmul -------------------------------------------------------------------------------------------
MATMUL_SHAPES = [(64, 200), (64, 2304), (768, 200), (768, 2304)]  # (C, OC)


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("C, OC", MATMUL_SHAPES)
def test_matmul_forward(cuda, case, C, OC, with_bias, gelu):
    x, x_d = case.bf16((B, T, C))
    w, w_d = case.bf16((OC, C), std=C ** -0.5)  # outputs of unit variance: GeLU sees both of its regimes
    bias, bias_d = case.bf16((OC,), std=0.5) if with_bias else (None, None)
    out, pre = poisoned((B, T, OC)), poisoned((B, T, OC)) if gelu else None
    cuda.matmul_forward(out, x_d, w_d, bias_d, gelu_pre=pre)
    ref_out, ref_pre = np.empty((B, T, OC)), np.empty((B, T, OC)) if gelu else None
    ref_ops.matmul_forward(ref_out, x, w, bias, gelu_pre=ref_pre)
    case.check("out", to_host(out), ref_out, CHAIN_REL if gelu else BF16_REL)
    if gelu:
        case.check("gelu_pre", to_host(pre), ref_pre, BF16_REL)


def test_matmul_forward_residual_refusals(cuda, case):
    """Not with gelu_pre; not a residual that overlaps out without being it; not one of another size."""
    x_d, w_d = case.bf16((B, T, 64))[1], case.bf16((128, 64))[1]
    buf = cp.zeros((2 * B * T + 1, 128), np.uint16)
    out, shifted = buf[:B * T], buf[1:B * T + 1]
    with pytest.raises(RuntimeError, match="residual and gelu_pre"):
        cuda.matmul_forward(out, x_d, w_d, gelu_pre=buf[B * T + 1:], residual=shifted)
    with pytest.raises(RuntimeError, match="residual must be out itself or not overlap it"):
        cuda.matmul_forward(out, x_d, w_d, residual=shifted)
    with pytest.raises(ValueError, match="residual has"):
        cuda.matmul_forward(out, x_d, w_d, residual=buf[:B * T - 1])


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "dgelu"])
@pytest.mark.parametrize("with_dbias", [False, True], ids=["nodbias", "dbias"])
@pytest.mark.parametrize("C, OC", MATMUL_SHAPES)
def test_matmul_backward(cuda, case, C, OC, with_dbias, gelu):
    """dinp overwritten (times gelu'(pre) with the DGELU epilogue), dweight and dbias accumulate; the
    bias reduction (bias.cu) and cuBLASLt are deterministic: a second run reproduces every bit."""
    dout, dout_d = case.bf16((B, T, OC))
    x, x_d = case.bf16((B, T, C))
    w, w_d = case.bf16((OC, C), std=OC ** -0.5)
    pre, pre_d = case.bf16((B, T, C)) if gelu else (None, None)
    inc = {"dweight": np.zeros((OC, C)), **({"dbias": np.zeros(OC)} if with_dbias else {})}
    ref_dinp = np.empty((B, T, C))
    ref_ops.matmul_backward(ref_dinp, inc["dweight"], inc.get("dbias"), dout, x, w, dinp_gelu_pre=pre)
    start = {name: case.accumulator(v) for name, v in inc.items()}

    def run():
        acc = {name: dev.copy() for name, (_, dev) in start.items()}
        dinp = poisoned((B, T, C))
        cuda.matmul_backward(dinp, acc["dweight"], acc.get("dbias"), dout_d, x_d, w_d, dinp_gelu_pre=pre_d)
        return {"dinp": raw(dinp), **{name: raw(a) for name, a in acc.items()}}

    first = run()
    case.check("dinp", decode(first["dinp"]), ref_dinp, CHAIN_REL if gelu else BF16_REL)
    for name, (host, _) in start.items():
        case.check(name, decode(first[name]), host + inc[name], BF16_REL)
    assert_repeatable(case, run, first)


# The forward's GeLU-epilogue GEMM on Hopper (kernels/gemm_sm90.cu, which matmul.cu runs on compute capability 9.x
# where OC is a multiple of 128 and C of 64): rows that divide no tile (128 rows); (C, OC) the kernel takes, with
# fewer tiles than multiprocessors (a CTA's one tile) and with 480 tiles (3 or 4 a CTA: both consumer warpgroups,
# either one last; C = 64: a single k-block), and two it leaves to cuBLASLt (C = 96, OC = 200). Setting 0
# (matmul_set_sm90) runs cuBLASLt on all of them; elsewhere than on Hopper both settings run cuBLASLt.
SM90_GELU_SHAPES = [(1000, 256, 768), (4097, 512, 256), (77, 768, 512), (5000, 64, 1536), (1000, 96, 256),
                    (1000, 256, 200), (4097, 128, 1152)]  # (rows, C, OC); 768, 1536, 1152: 192-column tiles


# on: 0 cuBLASLt; 1 gemm_sm90 with its default clusters (2 CTAs sharing the weight loads where the row tiles pair
# up: 1000 and 5000 rows here, not 4097 or 77); 2 gemm_sm90 without clusters
SM90_SETTINGS = dict(argvalues=[0, 1, 2], ids=["cublaslt", "sm90", "sm90_nocluster"])


@contextlib.contextmanager
def sm90_setting(cuda, on):
    previous = cuda.k.matmul_set_sm90(1 if on else 0), cuda.k.matmul_set_sm90_cluster(1 if on == 2 else 2)
    try:
        yield
    finally:
        cuda.k.matmul_set_sm90(previous[0])
        cuda.k.matmul_set_sm90_cluster(previous[1])


@pytest.mark.parametrize("on", **SM90_SETTINGS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows, C, OC", SM90_GELU_SHAPES)
def test_matmul_gelu_sm90(cuda, case, rows, C, OC, with_bias, on):
    """fc's forward (GeLU, pre-activation stored) at sizes the Hopper kernel takes and sizes it leaves to
    cuBLASLt: pre within BF16_REL (one rounding of the fp32 sum), out within CHAIN_REL as in
    test_matmul_forward; deterministic (a second run gives the same bits)."""
    x, x_d = case.bf16((rows, C))
    w, w_d = case.bf16((OC, C), std=C ** -0.5)  # outputs of unit variance: GeLU sees both of its regimes
    bias, bias_d = case.bf16((OC,), std=0.5) if with_bias else (None, None)
    ref_out, ref_pre = np.empty((rows, OC)), np.empty((rows, OC))
    ref_ops.matmul_forward(ref_out, x, w, bias, gelu_pre=ref_pre)

    def run():
        out, pre = poisoned((rows, OC)), poisoned((rows, OC))
        cuda.matmul_forward(out, x_d, w_d, bias_d, gelu_pre=pre)
        return {"out": raw(out), "pre": raw(pre)}

    with sm90_setting(cuda, on):
        first = run()
        case.check("out", decode(first["out"]), ref_out, CHAIN_REL)
        case.check("gelu_pre", decode(first["pre"]), ref_pre, BF16_REL)
        assert_repeatable(case, run, first)


# The forward's residual add (a block's projection into the residual stream): on Hopper gemm_sm90.cu's Residual
# epilogue (the residual tile by TMA, out = acc + bias + residual) at the GeLU forward's shapes; cuBLASLt's C with
# beta = 1 at the shapes it leaves, past matmul.cu's kResidualSm90MaxK (the MLP's projection, K = 3072), with setting 0,
# and elsewhere than on Hopper. Also the model's matmul shapes at B*T rows.
@pytest.mark.parametrize("on", **SM90_SETTINGS)
@pytest.mark.parametrize("in_place", [False, True], ids=["apart", "in_place"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows, C, OC",
                         SM90_GELU_SHAPES + [(300, 3072, 768)] + [(B * T, C, OC) for C, OC in MATMUL_SHAPES])
def test_matmul_forward_residual(cuda, case, rows, C, OC, with_bias, in_place, on):
    """out = x @ w^T + bias + residual within BF16_REL of float64 (one rounding of the fp32 sum), residual out itself
    or apart; deterministic."""
    x, x_d = case.bf16((rows, C))
    w, w_d = case.bf16((OC, C), std=C ** -0.5)
    bias, bias_d = case.bf16((OC,), std=0.5) if with_bias else (None, None)
    residual, residual_d = case.bf16((rows, OC), mean=0.5, std=2.0)
    ref_out = np.empty((rows, OC))
    ref_ops.matmul_forward(ref_out, x, w, bias, residual=residual)

    def run():
        start = residual_d.copy()
        out = start if in_place else poisoned((rows, OC))
        cuda.matmul_forward(out, x_d, w_d, bias_d, residual=start)
        return {"out": raw(out)}

    with sm90_setting(cuda, on):
        first = run()
        case.check("out", decode(first["out"]), ref_out, BF16_REL)
        assert_repeatable(case, run, first)


# The backward's DGELU GEMM on Hopper (matmul.cu: the weight transposed into the scratch, then gemm_sm90.cu's kernel
# with its DGELU epilogue where C is a multiple of 128 and OC of 64, the product's n and k): the forward's shapes
# with C and OC swapped (rows that divide no tile; a CTA's one tile; 480 tiles with a single k-block), and two it
# leaves to cuBLASLt (C = 96, OC = 200). With dbias the scratch holds the transposed weight, then the bias's
# partial sums. A pre one element off 16-byte alignment is refused (test_matmul_refuses_misaligned_gelu_pre).
SM90_DGELU_SHAPES = [(1000, 768, 256), (4097, 256, 512), (77, 512, 768), (5000, 1536, 64), (1000, 96, 256),
                     (1000, 256, 200)]  # (rows, C, OC)


@pytest.mark.parametrize("on", **SM90_SETTINGS)
@pytest.mark.parametrize("with_dbias", [False, True], ids=["nodbias", "dbias"])
@pytest.mark.parametrize("rows, C, OC", SM90_DGELU_SHAPES)
def test_matmul_dgelu_sm90(cuda, case, rows, C, OC, with_dbias, on):
    """The projection after fc's GeLU, backward (dinp = (dout @ w) * gelu'(pre), dweight +=, dbias +=) at sizes the
    Hopper kernel takes and sizes it leaves to cuBLASLt: tolerances of test_matmul_backward; deterministic (a
    second run gives the same bits)."""
    from gpt2cu import memory
    dout, dout_d = case.bf16((rows, OC))
    x, x_d = case.bf16((rows, C))
    w, w_d = case.bf16((OC, C), std=OC ** -0.5)  # dout @ w of unit variance, as pre: gelu' sees both regimes
    pre = case.normal((rows, C))
    pre_d = cp.asarray(bits_of(pre))
    inc = {"dweight": np.zeros((OC, C)), **({"dbias": np.zeros(OC)} if with_dbias else {})}
    ref_dinp = np.empty((rows, C))
    ref_ops.matmul_backward(ref_dinp, inc["dweight"], inc.get("dbias"), dout, x, w, dinp_gelu_pre=pre)
    start = {name: case.accumulator(v) for name, v in inc.items()}
    assert cuda.k.matmul_backward_scratch_floats(rows, C, OC, with_dbias, True) == \
        memory.matmul_backward_scratch_floats(rows, C, OC, with_dbias, True)

    def run():
        acc = {name: dev.copy() for name, (_, dev) in start.items()}
        dinp = poisoned((rows, C))
        cuda.matmul_backward(dinp, acc["dweight"], acc.get("dbias"), dout_d, x_d, w_d, dinp_gelu_pre=pre_d)
        return {"dinp": raw(dinp), **{name: raw(a) for name, a in acc.items()}}

    with sm90_setting(cuda, on):
        first = run()
        case.check("dinp", decode(first["dinp"]), ref_dinp, CHAIN_REL)
        for name, (host, _) in start.items():
            case.check(name, decode(first[name]), host + inc[name], BF16_REL)
        assert_repeatable(case, run, first)


# dinp_gelu_dbias (matmul.cu): the bias gradient of the layer whose output dinp_gelu_pre was (GPT-2's fc), colsum(dinp)
# added into a bf16 accumulator. On Hopper the DGELU epilogue writes each 128-row tile's column sums and bias.cu's
# finishing pass adds them; with setting 0, and at the shapes the kernel leaves to cuBLASLt, bias_backward on dinp.
# Both sum the stored bf16 dinp in fp32 and round once, so each lands within one bf16 ulp of the float64 sum of its
# own run's dinp (plus an fp32-order slack of 2^-17 of the column's absolute sum, for sums that cancel); the two
# settings agree within BF16_REL (their dinp differ by the products' summation order). Rows that divide no tile
# (the shapes above), a single partial tile (77 rows), and fc's width (C = 3072, OC = 768).
@pytest.mark.parametrize("with_dbias", [False, True], ids=["nodbias", "dbias"])
@pytest.mark.parametrize("rows, C, OC", SM90_DGELU_SHAPES + [(300, 3072, 768)])
def test_matmul_dgelu_dbias(cuda, case, rows, C, OC, with_dbias):
    """fcproj's backward with fc's bias gradient (dinp_gelu_dbias +=) and, with dbias, fcproj's own (bias.cu after
    the fused sums, in the same scratch): the Hopper kernel's column sums and the fallback's; deterministic."""
    from gpt2cu import memory
    dout, dout_d = case.bf16((rows, OC))
    x, x_d = case.bf16((rows, C))
    w, w_d = case.bf16((OC, C), std=OC ** -0.5)
    pre = case.normal((rows, C))
    pre_d = cp.asarray(bits_of(pre))
    inc = {"dweight": np.zeros((OC, C)), **({"dbias": np.zeros(OC)} if with_dbias else {}), "dgelu_dbias": np.zeros(C)}
    ref_dinp = np.empty((rows, C))
    ref_ops.matmul_backward(ref_dinp, inc["dweight"], inc.get("dbias"), dout, x, w, dinp_gelu_pre=pre,
                            dinp_gelu_dbias=inc["dgelu_dbias"])
    start = {name: case.accumulator(v) for name, v in inc.items()}
    assert cuda.k.matmul_backward_scratch_floats(rows, C, OC, with_dbias, True, True) == \
        memory.matmul_backward_scratch_floats(rows, C, OC, with_dbias, True, True)

    def run():
        acc = {name: dev.copy() for name, (_, dev) in start.items()}
        dinp = poisoned((rows, C))
        cuda.matmul_backward(dinp, acc["dweight"], acc.get("dbias"), dout_d, x_d, w_d, dinp_gelu_pre=pre_d,
                             dinp_gelu_dbias=acc["dgelu_dbias"])
        return {"dinp": raw(dinp), **{name: raw(a) for name, a in acc.items()}}

    sums = {}
    for on in (0, 1):
        with sm90_setting(cuda, on):
            first = run()
            dinp = decode(first["dinp"])
            case.check("dinp", dinp, ref_dinp, CHAIN_REL)
            for name, (host, _) in start.items():
                bound = CHAIN_REL if name == "dgelu_dbias" else BF16_REL  # a sum of dinp, which has CHAIN_REL
                case.check(name, decode(first[name]), host + inc[name], bound)
            host = start["dgelu_dbias"][0]
            own = host + dinp.sum(axis=0)  # exact: this run's stored dinp, onto the starting values
            got = decode(first["dgelu_dbias"])
            slack = bf16_ulp(own) + 2.0 ** -17 * (np.abs(host) + np.abs(dinp).sum(axis=0))
            off = np.abs(got - own) > slack
            assert not off.any(), case.where(f"setting {on}: dinp_gelu_dbias off its own dinp's column sums by more "
                                             f"than one bf16 ulp at {np.argwhere(off).ravel()[:8]}")
            assert_repeatable(case, run, first)
            sums[on] = got
    case.check("dgelu_dbias, Hopper's against the fallback's", sums[1], sums[0], BF16_REL)


# gelu_of_pre (matmul.cu): the backward under recompute writes gelu(dinp_gelu_pre), the forward's activation, where the
# DGELU reads pre anyway (on Hopper the same GEMM's epilogue), before its dweight reads that activation as inp. It must
# give the bits of the unfused order (gelu_forward, then matmul_backward on its output): gelu_of_pre itself, dinp,
# dweight and the bias sums, on either setting; and gelu_of_pre within bf16 rounding of the float64 GeLU.
@pytest.mark.parametrize("rows, C, OC", SM90_DGELU_SHAPES + [(300, 3072, 768)])
def test_matmul_dgelu_recomputes_gelu(cuda, case, rows, C, OC):
    dout, dout_d = case.bf16((rows, OC))
    w, w_d = case.bf16((OC, C), std=OC ** -0.5)
    pre = case.normal((rows, C))
    pre_d = cp.asarray(bits_of(pre))
    dweight0, dbias0 = case.accumulator(np.zeros((OC, C))), case.accumulator(np.zeros(C))
    ref_gelu = np.empty((rows, C))
    ref_ops.gelu_forward(ref_gelu, pre)

    def run(fused):
        dweight, dbias = dweight0[1].copy(), dbias0[1].copy()
        dinp, act = poisoned((rows, C)), poisoned((rows, C))
        if not fused:
            cuda.gelu_forward(act, pre_d)
        cuda.matmul_backward(dinp, dweight, None, dout_d, act, w_d, dinp_gelu_pre=pre_d, dinp_gelu_dbias=dbias,
                             gelu_of_pre=act if fused else None)
        return {"gelu": raw(act), "dinp": raw(dinp), "dweight": raw(dweight), "dgelu_dbias": raw(dbias)}

    for on in (0, 1):
        with sm90_setting(cuda, on):
            unfused, fused = run(False), run(True)
            case.check("gelu_of_pre", decode(fused["gelu"]), ref_gelu, BF16_REL)
            for name in unfused:
                assert np.array_equal(fused[name], unfused[name]), case.where(
                    f"setting {on}: {name} with gelu_of_pre differs from gelu_forward then matmul_backward")
    with pytest.raises(RuntimeError, match="gelu_of_pre needs dinp and dinp_gelu_pre"):
        cuda.matmul_backward(poisoned((rows, C)), dweight0[1].copy(), None, dout_d, pre_d, w_d, gelu_of_pre=pre_d)


def test_matmul_refuses_misaligned_gelu_pre(cuda):
    """A GeLU pre-activation 2 bytes off 16-byte alignment: one clear error (cuBLASLt's aux faults on it, leaving the
    context unusable), forward and backward, whichever GEMM would run."""
    rows, C, OC = 64, 256, 256
    x, w, dout = cp.zeros((rows, C), cp.uint16), cp.zeros((OC, C), cp.uint16), cp.zeros((rows, OC), cp.uint16)
    off_by_one = cp.zeros(rows * max(C, OC) + 1, cp.uint16)[1:]
    with pytest.raises(RuntimeError, match="gelu_pre must be 16-byte aligned"):
        cuda.matmul_forward(cp.zeros((rows, OC), cp.uint16), x, w, gelu_pre=off_by_one[:rows * OC].reshape(rows, OC))
    with pytest.raises(RuntimeError, match="dinp_gelu_pre must be 16-byte aligned"):
        cuda.matmul_backward(cp.zeros((rows, C), cp.uint16), cp.zeros((OC, C), cp.uint16), None, dout, x, w,
                             dinp_gelu_pre=off_by_one[:rows * C].reshape(rows, C))


# One process's GEMMs: every epilogue and beta of a training step, on inputs from a fixed seed; prints the
# outputs' hash, then the tuner's log (matmul_tuning_report).
TUNING_SCRIPT = """
import hashlib, sys
import numpy as np, cupy as cp
from gpt2cu.backends.cuda_ops import CudaBackend
be = CudaBackend(0)
be.k.matmul_set_sm90(0)  # the GeLU GEMM on cuBLASLt (the Hopper kernel has no algorithm choice)
rng = np.random.default_rng(1234)
def bf16(*shape):
    return cp.asarray((rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16))
N, C, OC = 1024, 256, 1024
x, w, bias, dw, db = bf16(N, C), bf16(OC, C), bf16(OC), bf16(OC, C), bf16(OC)
out, pre, dinp = cp.empty((N, OC), cp.uint16), cp.empty((N, OC), cp.uint16), cp.empty((N, C), cp.uint16)
be.matmul_forward(out, x, w, bias, gelu_pre=pre)
be.matmul_backward(dinp, dw, db, out, x, w, dinp_gelu_pre=bf16(N, C))
be.synchronize()
h = hashlib.sha256()
for a in (out, pre, dinp, dw, db):
    h.update(cp.asnumpy(a).tobytes())
print(h.hexdigest())
sys.stdout.write(be.k.matmul_tuning_report())
"""


def run_tuning_script(env):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", TUNING_SCRIPT], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    digest, *log = r.stdout.splitlines()
    return digest, log


def test_matmul_tuning_is_recorded_and_reused(tmp_path):
    """A fresh cache file: the first process times the candidates of each GEMM (forward with the GeLU
    epilogue writing its aux matrix, dinp with DGELU, dweight accumulating) and records its choices; a
    second process reads them (no timing) and gets the same bits, as bit-exact resume needs. Tuning off:
    the heuristic's first, nothing written. A cache line is key, algorithm (64 bytes hex), how chosen."""
    cache = tmp_path / "sub" / "gemm-algos.txt"
    first, log1 = run_tuning_script({"GPT2CU_GEMM_CACHE": str(cache), "GPT2CU_GEMM_TUNE": "1"})
    assert len(log1) == 3 and all("\ttuned: #" in line or "\tone candidate" in line for line in log1), log1
    lines = [line.split("\t") for line in cache.read_text().splitlines() if not line.startswith("#")]
    assert sorted(line[0] for line in lines) == sorted(entry.split("\t")[0] for entry in log1
                                                       if "\ttuned: #" in entry)
    assert all(len(line[1]) == 128 and int(line[1], 16) >= 0 for line in lines)
    second, log2 = run_tuning_script({"GPT2CU_GEMM_CACHE": str(cache), "GPT2CU_GEMM_TUNE": "1"})
    assert second == first
    assert sum("\tfrom the cache: " in line for line in log2) == len(lines), log2
    off_cache = tmp_path / "off.txt"
    _, log3 = run_tuning_script({"GPT2CU_GEMM_CACHE": str(off_cache), "GPT2CU_GEMM_TUNE": "0"})
    assert all("untuned" in line for line in log3) and not off_cache.exists(), log3


# The weight gradient at k = 4097 rows: cuBLASLt 13.1's heuristic offers split-K 2 algorithms there that returned
# sums 10-100x off on an H200 (matmul.cu, "split-K products checked"); tuned or not, matmul.cu must take only a
# candidate whose product it checked. Fresh plans: the tuning modes have separate plans, and each shape is new here.
@pytest.mark.parametrize("tuned", [0, 1], ids=["untuned", "tuned"])
@pytest.mark.parametrize("rows, C, OC", [(4097, 256, 512), (4097, 512, 256), (4097, 768, 768), (4099, 768, 2304)])
def test_matmul_dweight_long_k(cuda, case, rows, C, OC, tuned):
    """dweight += dout^T @ inp alone (dinp and dbias skipped) against float64, with tuning off and on."""
    dout, dout_d = case.bf16((rows, OC))
    x, x_d = case.bf16((rows, C))
    inc = dout.T @ x
    host, dev = case.accumulator(inc)
    previous = cuda.k.matmul_set_tuning(tuned)
    try:
        acc = dev.copy()
        cuda.matmul_backward(None, acc, None, dout_d, x_d, cp.zeros((OC, C), cp.uint16))
        cuda.synchronize()
    finally:
        cuda.k.matmul_set_tuning(previous)
    case.check("dweight", decode(raw(acc)), host + inc, BF16_REL)


def test_kernels_after_torch():
    """torch imported (and its CUDA used) before gpt2cu: the extension's GEMMs and its C++ errors still work (on
    an H200 with torch 2.11 the first matmul crashed in pybind11's dispatcher until the C++ runtime was shared)."""
    import subprocess
    import sys
    pytest.importorskip("torch")
    script = """
import torch
torch.matmul(torch.ones(64, 64, device="cuda"), torch.ones(64, 64, device="cuda"))
import cupy as cp
from gpt2cu.backends.cuda_ops import CudaBackend
be = CudaBackend(0)
x, w, out = cp.ones((64, 64), cp.uint16), cp.ones((64, 64), cp.uint16), cp.empty((64, 64), cp.uint16)
be.matmul_forward(out, x, w, None)
be.synchronize()
try:
    be.k.matmul_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
except Exception as e:
    print("error raised:", type(e).__name__)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert r.stdout.split() == ["error", "raised:", "RuntimeError", "ok"], r.stdout[-2000:]


@pytest.mark.parametrize("OC", [200, 1001, 2304])
def test_bias_backward(cuda, case, OC):
    """bias.cu on its own: 4004 rows (several row tiles, the last one partial), OC = 1001 takes the
    unvectorized path; deterministic."""
    from gpt2cu.backends.cuda_ops import ptr
    N = 4004
    dout, dout_d = case.bf16((N, OC))
    host, dev = case.accumulator(dout.sum(axis=0))
    floats = cuda.k.bias_backward_scratch_floats(N, OC)
    scratch = cp.empty(floats, dtype=np.float32)

    def run():
        acc = dev.copy()
        cuda.k.bias_backward(ptr(acc), ptr(dout_d), ptr(scratch), floats, N, OC, cuda.stream.ptr)
        return {"dbias": raw(acc)}

    first = run()
    case.check("dbias", decode(first["dbias"]), host + dout.sum(axis=0), BF16_REL)
    assert_repeatable(case, run, first)


@pytest.mark.parametrize("rows, OC", [(1, 200), (513, 3072), (77, 1001)])
def test_bias_backward_finish(cuda, case, rows, OC):
    """bias.cu's second phase on its own (the Hopper DGELU GEMM's column sums go through it): dbias += the column
    sums of fp32 partials (rows, OC), one rounding to bf16 of the fp32 sum; deterministic."""
    from gpt2cu.backends.cuda_ops import ptr
    partials = case.rng.normal(size=(rows, OC)).astype(np.float32)
    partials_d = cp.asarray(partials)
    total = partials.astype(np.float64).sum(axis=0)
    host, dev = case.accumulator(total)

    def run():
        acc = dev.copy()
        cuda.k.bias_backward_finish(ptr(acc), ptr(partials_d), rows, OC, cuda.stream.ptr)
        return {"dbias": raw(acc)}

    first = run()
    case.check("dbias", decode(first["dbias"]), host + total, BF16_REL)
    assert_repeatable(case, run, first)


# ---- transpose ----------------------------------------------------------------------------------------
# (rows, cols, offset): fc's projection weight (16-byte path, whole tiles), partial tiles on the 16-byte path, sizes
# no vector divides, one row, and 16-byte sizes at a 2-byte offset (the element path)
@pytest.mark.parametrize("rows, cols, offset", [(768, 3072, 0), (200, 72, 0), (37, 1001, 0), (1, 5, 0),
                                                (72, 200, 1)])
def test_bf16_transpose(cuda, case, rows, cols, offset):
    """transpose.cu: out (cols, rows) = inp^T, every bit (the elements are moved, not computed)."""
    from gpt2cu.backends.cuda_ops import ptr
    x = bits_of(case.normal(rows * cols + offset))
    x_d = cp.asarray(x)[offset:]
    out = cp.full(rows * cols + offset, BF16_NAN, dtype=np.uint16)[offset:]

    def run():
        cuda.k.bf16_transpose(ptr(out), ptr(x_d), rows, cols, cuda.stream.ptr)
        return {"out": raw(out)}

    first = run()
    case.same_bits("out", first["out"].reshape(cols, rows), x[offset:].reshape(rows, cols).T)
    assert_repeatable(case, run, first)


# ---- GeLU ---------------------------------------------------------------------------------------------
GELU_N = 1_000_003  # odd: no vector width divides it


def test_gelu_forward(cuda, case):
    x, x_d = case.bf16((GELU_N,), std=2.0)
    out = poisoned((GELU_N,))
    cuda.gelu_forward(out, x_d)
    ref = np.empty(GELU_N)
    ref_ops.gelu_forward(ref, x)
    case.check("out", to_host(out), ref, BF16_REL)


@pytest.mark.parametrize("in_place", [False, True], ids=["separate", "dinp_is_dout"])
def test_gelu_backward(cuda, case, in_place):
    dout, dout_d = case.bf16((GELU_N,))
    x, x_d = case.bf16((GELU_N,), std=2.0)
    dinp = dout_d if in_place else poisoned((GELU_N,))
    cuda.gelu_backward(dinp, dout_d, x_d)
    ref = np.empty(GELU_N)
    ref_ops.gelu_backward(ref, dout, x)
    case.check("dinp", to_host(dinp), ref, BF16_REL)


# ---- classifier ---------------------------------------------------------------------------------------
# GPT-2's vocabulary, LLaMA 3's (a row of 250 KB: more than L2 holds for many rows in flight), and V 1001 in
# Vp 1003, which takes 1-column vectors
# V1001-Vp1003: 1-column vectors; V20001: a partial vector (V % 8 = 1) and 11 padding vectors after it;
# V50257, V128256: rows of several unrolled groups per thread and a remainder (V128256: no partial vector)
CLASSIFIER_CASES = [(B, T, 1001, 1024), (B, T, 1001, 1003), (3, 5, 20001, 20096), (2, 3, 50257, 50304),
                    (1, 2, 128256, 128256)]
CLASSIFIER_IDS = ["V1001", "V1001-Vp1003", "V20001", "V50257", "V128256"]


@pytest.mark.parametrize("dloss", [0.25, 0.0], ids=["train", "eval"])
@pytest.mark.parametrize("b, t, V, Vp", CLASSIFIER_CASES, ids=CLASSIFIER_IDS)
def test_fused_classifier(cuda, case, b, t, V, Vp, dloss):
    """The padded columns hold 40 on input: a kernel that lets them into the softmax is ~30 off in the
    loss. dlogits is checked whole, then without the target column (whose dloss * (p - 1) would dominate
    the norm and hide a wrong softmax); padded columns and masked rows (target -1) must be exactly 0, and
    with dloss = 0 the logits must keep every bit."""
    logits = case.normal((b, t, Vp), std=2.0)
    logits[..., V:] = 40.0
    targets = case.rng.integers(0, V, (b, t)).astype(np.int32)
    targets[case.rng.random((b, t)) < 0.25] = -1
    targets.flat[:2] = (-1, V - 1)  # at least one masked row; the last real column as a target
    masked = targets < 0
    targets_d = cp.asarray(targets)

    def run():  # from fresh copies of the inputs: (dlogits, losses) on the device
        logits_d, losses = cp.asarray(bits_of(logits)), poisoned((b, t), fp32=True)
        cuda.fused_classifier(losses, logits_d, targets_d, dloss, V)
        return logits_d, losses

    logits_d, losses = run()
    ref_losses, ref_dlogits = np.empty((b, t)), logits.copy()
    ref_ops.fused_classifier(ref_losses, ref_dlogits, targets, dloss, V)
    got_losses = to_host(losses)
    case.check("losses", got_losses, ref_losses, FP32_REL)
    case.zero("losses of masked rows", got_losses[masked])
    if dloss == 0:
        case.same_bits("logits (dloss = 0 leaves them)", raw(logits_d), bits_of(logits))
        return
    got = to_host(logits_d)
    case.check("dlogits", got, ref_dlogits, BF16_REL)
    off_target = np.ones((b, t, V), dtype=bool)
    np.put_along_axis(off_target, np.maximum(targets, 0)[..., None], False, axis=-1)
    case.check("dlogits off the target column", got[..., :V][off_target], ref_dlogits[..., :V][off_target], BF16_REL)
    case.zero("dlogits in the padded columns", got[..., V:])
    case.zero("dlogits of masked rows", got[masked])
    again = run()  # the fixed reduction tree: the same bits every time
    case.same_bits("dlogits (second run)", raw(again[0]), raw(logits_d))
    case.same_bits("losses (second run)", raw(again[1]), raw(losses))


@pytest.mark.parametrize("b, t, V, Vp", CLASSIFIER_CASES, ids=CLASSIFIER_IDS)
def test_fused_classifier_policy_loss_and_entropy(cuda, case, b, t, V, Vp):
    """Policy terms (RL's PPO / GRPO loss, numpy_ops.policy_weights) weight each row's dlogits from its own
    log p in the same pass; the entropy of each row's softmax comes from it too. Both against the numpy op.
    The old log-probabilities put each row's starting ratio at 0.5, 0.9, 1.1 or 1.6 (clipped or not by the
    advantage's sign, never within float32 rounding of the clip boundaries 0.8 and 1.2); half the rows
    have a KL term; masked rows 0."""
    logits = case.normal((b, t, Vp), std=2.0)
    logits[..., V:] = 40.0
    targets = case.rng.integers(0, V, (b, t)).astype(np.int32)
    targets.flat[0] = -1
    ref_losses, clip = np.empty((b, t)), 0.2
    ref_ops.fused_classifier(ref_losses, logits.copy(), targets, 0.0, V)
    ratio = case.rng.choice([0.5, 0.9, 1.1, 1.6], size=(b, t))
    ratio.flat[-1] = 0.9  # never clipped: with 2 rows (V128256), every row could be, and the reference all 0
    terms = np.stack([-ref_losses - np.log(ratio), case.rng.normal(0.0, 1.0, (b, t)),
                      -ref_losses + case.rng.normal(0.0, 0.5, (b, t)),
                      np.where(case.rng.random((b, t)) < 0.5, 0.3, 0.0)], axis=-1).astype(np.float32)
    logits_d, losses, entropy = cp.asarray(bits_of(logits)), poisoned((b, t), fp32=True), poisoned((b, t), fp32=True)
    cuda.fused_classifier(losses, logits_d, cp.asarray(targets), 0.25, V, policy=PolicyLoss(cp.asarray(terms), clip),
                          entropy=entropy)
    ref_dlogits, ref_entropy = logits.copy(), np.empty((b, t))
    ref_ops.fused_classifier(ref_losses, ref_dlogits, targets, 0.25, V,
                             policy=PolicyLoss(terms.astype(np.float64), clip), entropy=ref_entropy)
    case.check("losses", to_host(losses), ref_losses, FP32_REL)
    case.check("entropy", to_host(entropy), ref_entropy, FP32_REL)
    case.zero("entropy of the masked row", to_host(entropy).flat[:1])
    case.check("policy-weighted dlogits", to_host(logits_d), ref_dlogits, BF16_REL)
    case.zero("dlogits in the padded columns", to_host(logits_d)[..., V:])
    case.zero("dlogits of the masked row", to_host(logits_d).reshape(-1, Vp)[0])


# ---- scalar head ---------------------------------------------------------------------------------------
# C = 200: a row of 25 vectors (lanes idle); 4004 rows: many blocks of the backward's reduction, a partial
# last one; C = 2048: 8 vectors per lane, 64 KB of shared memory
SCALAR_HEAD_CASES = [(B, T, 200), (4, 1001, 768), (2, 5, 2048)]


def scalar_head_inputs(case, b, t, C):
    """(x host, x device, head host float64 of float32 values, head device float32)."""
    x, x_d = case.bf16((b, t, C))
    head = case.rng.normal(0.0, C ** -0.5, C + 1).astype(np.float32)
    return x, x_d, head.astype(np.float64), cp.asarray(head)


@pytest.mark.parametrize("b, t, C", SCALAR_HEAD_CASES)
def test_scalar_head_forward_and_value_loss(cuda, case, b, t, C):
    """The values, then PPO's clipped value loss: each row's weighted loss and its gradient (left in values).
    The old values sit 0.05 or 0.5 from the values (inside or outside the clip range 0.2, never within
    float32 rounding of it); 60% of the rows weigh 0 (positions outside the completions): loss and gradient
    exactly 0 there."""
    x, x_d, head, head_d = scalar_head_inputs(case, b, t, C)
    values = poisoned((b, t), fp32=True)
    cuda.scalar_head_forward(values, None, x_d, head_d)
    ref_values = np.empty((b, t))
    ref_ops.scalar_head_forward(ref_values, None, x, head)
    case.check("values", to_host(values), ref_values, FP32_REL)
    weight = np.where(case.rng.random((b, t)) < 0.6, 0.0, case.rng.random((b, t)) + 0.1)
    old = ref_values + case.rng.choice([-0.5, -0.05, 0.05, 0.5], size=(b, t))
    terms = np.stack([old, case.rng.normal(0.0, 1.0, (b, t)), weight], axis=-1).astype(np.float32)
    clip, scale = 0.2, 0.7
    values, losses = poisoned((b, t), fp32=True), poisoned((b, t), fp32=True)
    cuda.scalar_head_forward(values, losses, x_d, head_d, ValueLoss(cp.asarray(terms), clip, scale))
    ref_dvalues, ref_losses = np.empty((b, t)), np.empty((b, t))
    ref_ops.scalar_head_forward(ref_dvalues, ref_losses, x, head, ValueLoss(terms.astype(np.float64), clip, scale))
    got_dvalues, got_losses = to_host(values), to_host(losses)
    case.check("weighted losses", got_losses, ref_losses, FP32_REL)
    case.check("dvalues", got_dvalues, ref_dvalues, FP32_REL)
    case.zero("losses of rows of weight 0", got_losses[weight == 0])
    case.zero("dvalues of rows of weight 0", got_dvalues[weight == 0])


@pytest.mark.parametrize("b, t, C", SCALAR_HEAD_CASES)
def test_scalar_head_backward(cuda, case, b, t, C):
    """dinp (bf16) and dhead (fp32) both accumulate; half the rows have dvalues 0, whose dinp rows must keep
    every bit; two runs agree to the bit."""
    x, x_d, head, head_d = scalar_head_inputs(case, b, t, C)
    dvalues = np.where(case.rng.random((b, t)) < 0.5, 0.0, case.rng.normal(0.0, 1.0, (b, t))).astype(np.float32)
    dvalues.flat[0] = 1.0  # at least one row to read
    dvalues_d = cp.asarray(dvalues)
    inc_dinp, inc_dhead = np.zeros((b, t, C)), np.zeros(C + 1)
    ref_ops.scalar_head_backward(inc_dinp, inc_dhead, dvalues.astype(np.float64), x, head)
    dinp, dinp_d = case.accumulator(inc_dinp)
    dhead = case.rng.normal(0.0, 0.5 * float(np.sqrt(np.mean(np.square(inc_dhead)))), C + 1).astype(np.float32)

    def run():
        acc_dinp, acc_dhead = dinp_d.copy(), cp.asarray(dhead)
        cuda.scalar_head_backward(acc_dinp, acc_dhead, dvalues_d, x_d, head_d)
        return {"dinp": raw(acc_dinp), "dhead": raw(acc_dhead)}

    first = run()
    case.check("dinp", decode(first["dinp"]), dinp + inc_dinp, BF16_REL)
    case.check("dhead", decode(first["dhead"]), dhead + inc_dhead, FP32_REL)
    case.same_bits("dinp of rows with dvalues 0", first["dinp"][dvalues == 0], raw(dinp_d)[dvalues == 0])
    assert_repeatable(case, run, first)


# ---- attention ----------------------------------------------------------------------------------------
# (B, NH, T, HS): every sequence length with both head sizes; fewer heads for the long ones, whose float64
# reference materializes (T, T) scores per head.
ATTENTION_CASES = ([(2, 3, t, hs) for t in (1, 17, 64) for hs in (64, 128)]
                   + [(1, 2, t, hs) for t in (1024, 2048) for hs in (64, 128)])
ATTENTION_IDS = [f"B{b}-NH{nh}-T{t}-HS{hs}" for b, nh, t, hs in ATTENTION_CASES]


def attention_reference(qkv, n_head):
    b, t, c3 = qkv.shape
    out, lse = np.empty((b, t, c3 // 3)), np.empty((b, n_head, t))
    ref_ops.attention_forward(out, lse, qkv, n_head)
    return out, lse


@pytest.mark.parametrize("b, nh, t, hs", ATTENTION_CASES, ids=ATTENTION_IDS)
def test_attention_forward(cuda, case, b, nh, t, hs):
    qkv, qkv_d = case.bf16((b, t, 3 * nh * hs))
    out, lse = poisoned((b, t, nh * hs)), poisoned((b, nh, t), fp32=True)
    cuda.attention_forward(out, lse, qkv_d, nh)
    ref_out, ref_lse = attention_reference(qkv, nh)
    case.check("out", to_host(out), ref_out, CHAIN_REL)
    case.check("lse", to_host(lse), ref_lse, FP32_REL)


@pytest.mark.parametrize("b, nh, t, hs", ATTENTION_CASES, ids=ATTENTION_IDS)
def test_attention_backward(cuda, case, b, nh, t, hs):
    """out and lse are the float64 forward's, stored as the kernel gets them (bf16, fp32), and both sides
    use them. dq, dk and dv are checked one by one, except at T = 1 where the softmax has a single key and
    dq = dk = 0 exactly (their relative error is undefined): there the whole dqkv is."""
    c = nh * hs
    qkv, qkv_d = case.bf16((b, t, 3 * c))
    dout, dout_d = case.bf16((b, t, c))
    out, lse = attention_reference(qkv, nh)
    out, lse = decode(bits_of(out)), lse.astype(np.float32)
    dqkv = poisoned((b, t, 3 * c))
    cuda.attention_backward(dqkv, dout_d, qkv_d, cp.asarray(bits_of(out)), cp.asarray(lse), nh)
    ref = np.empty((b, t, 3 * c))
    ref_ops.attention_backward(ref, dout, qkv, out, lse, nh)
    got = to_host(dqkv)
    parts = {"dq": slice(0, c), "dk": slice(c, 2 * c), "dv": slice(2 * c, 3 * c)} if t > 1 else {"dqkv": slice(None)}
    for name, cols in parts.items():
        case.check(name, got[..., cols], ref[..., cols], CHAIN_REL)


@pytest.mark.parametrize("b, nh, t, hs", [(2, 3, 17, 64), (1, 2, 1024, 128)], ids=["T17-HS64", "T1024-HS128"])
def test_attention_matches_torch_sdpa(cuda, case, b, nh, t, hs):
    """Forward, and backward through autograd, against torch's F.scaled_dot_product_attention(is_causal=True)
    in bf16 on the same inputs: two bf16 computations of one quantity, each ~5e-3 from the exact value."""
    torch = pytest.importorskip("torch")
    if TORCH_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    c = nh * hs
    qkv, qkv_d = case.bf16((b, t, 3 * c))
    dout, dout_d = case.bf16((b, t, c))
    out, lse, dqkv = poisoned((b, t, c)), poisoned((b, nh, t), fp32=True), poisoned((b, t, 3 * c))
    cuda.attention_forward(out, lse, qkv_d, nh)
    cuda.attention_backward(dqkv, dout_d, qkv_d, out, lse, nh)

    def heads(x):  # (b, t, nh*hs) bf16-exact float64 -> (b, nh, t, hs) bf16 tensor, exactly
        x = np.ascontiguousarray(x.reshape(b, t, nh, hs).transpose(0, 2, 1, 3), dtype=np.float32)
        return torch.from_numpy(x).to(TORCH_DEVICE, torch.bfloat16)

    def merged(x):  # (b, nh, t, hs) tensor -> (b, t, nh*hs) float64
        return x.detach().float().permute(0, 2, 1, 3).reshape(b, t, c).cpu().numpy().astype(np.float64)

    q, k, v = (heads(qkv[..., i * c:(i + 1) * c]).requires_grad_() for i in range(3))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(o, (q, k, v), heads(dout))
    case.check("out vs torch", to_host(out), merged(o), CHAIN_REL)
    got = to_host(dqkv)
    for i, (name, grad) in enumerate(zip(("dq", "dk", "dv"), grads)):
        case.check(f"{name} vs torch", got[..., i * c:(i + 1) * c], merged(grad), CHAIN_REL)


# ---- optimizer ----------------------------------------------------------------------------------------
def check_stochastic_rounding(case, name, rounded, exact, slack):
    """bf16 values `rounded` of `exact` by stochastic rounding: each within one bf16 ulp (+ slack for fp32
    differences in `exact`), and about a quarter on the farther of the two neighbours: E[min(f, 1 - f)] =
    1/4 for a uniform fractional position f, where rounding to nearest gives 0 and truncation ~1/2."""
    ulp = bf16_ulp(exact)
    dist = np.abs(rounded - exact)
    beyond = dist >= ulp + slack
    assert not beyond.any(), case.where(f"{name}: {beyond.sum()} of {dist.size} elements are a bf16 ulp or more "
                                        f"from the exact value, first at {np.argwhere(beyond)[0]}")
    farther = float(np.mean(dist > 0.5 * ulp))
    assert 0.2 < farther < 0.3, case.where(f"{name}: {farther:.3f} of the elements rounded to the farther "
                                           f"neighbour, stochastic rounding gives 0.25")


@pytest.mark.parametrize("with_master, salt", [(True, 0), (True, 7), (False, 3)],
                         ids=["master", "master_salted", "no_master"])
def test_adamw_update(cuda, case, with_master, salt):
    """Three steps on a segment at an odd offset (13) of larger buffers, against the float64 formula of
    kernels.h evaluated on the kernel's fp32 hyper-parameters: m, v and the fp32 master to MASTER_REL, bf16
    params by stochastic rounding of the new weights (of the master; without one, of the update applied to
    the bf16 params themselves), and every element outside the segment keeps its bits."""
    n, lo, hi_pad = 100_003, 13, 29
    size, seg = lo + n + hi_pad, slice(lo, lo + n)
    outside = np.r_[0:lo, lo + n:lo + n + hi_pad]
    lr, grad_scale, beta1, beta2, eps, wd = 1e-2, 0.5, 0.9, 0.95, 1e-8, 0.1
    f32 = lambda x: float(np.float32(x))  # noqa: E731  (a host scalar as the kernel receives it)

    params, params_d = case.bf16((size,))
    master_d = cp.asarray(params.astype(np.float32)) if with_master else None
    m0, v0 = case.normal(size).astype(np.float32), np.square(case.normal(size)).astype(np.float32)
    m0[seg], v0[seg] = 0.0, 0.0  # a fresh optimizer inside the segment, arbitrary state outside
    m_d, v_d = cp.asarray(m0), cp.asarray(v0)
    initial = {"params": bits_of(params), "m": m0, "v": v0}
    if with_master:
        initial["master"] = params.astype(np.float32)
    w_ref, m_ref, v_ref = params[seg], np.zeros(n), np.zeros(n)
    for step in (1, 2, 3):
        grads, grads_d = case.bf16((size,))
        w_prev = w_ref if with_master else to_host(params_d)[seg]
        scalars = cuda.adamw_scalars(lr, step, grad_scale, int(case.rng.integers(2 ** 32)), beta1, beta2)
        cuda.adamw_update(params_d[seg], master_d[seg] if with_master else None, grads_d[seg], m_d[seg], v_d[seg],
                          scalars, beta1, beta2, eps, wd, salt)
        g = grads[seg] * f32(grad_scale)
        m_ref = f32(beta1) * m_ref + (1.0 - f32(beta1)) * g
        v_ref = f32(beta2) * v_ref + (1.0 - f32(beta2)) * g * g
        mhat, vhat = m_ref / f32(1.0 - beta1 ** step), v_ref / f32(1.0 - beta2 ** step)
        direction = mhat / (np.sqrt(vhat) + f32(eps)) + f32(wd) * w_prev
        w_ref = w_prev - f32(lr) * direction
        case.check(f"m, step {step}", to_host(m_d)[seg], m_ref, MASTER_REL)
        case.check(f"v, step {step}", to_host(v_d)[seg], v_ref, MASTER_REL)
        new_params = to_host(params_d)[seg]
        if with_master:
            master = to_host(master_d)[seg]
            case.check(f"master, step {step}", master, w_ref, MASTER_REL)
            check_stochastic_rounding(case, f"params from master, step {step}", new_params, master, 0.0)
        else:  # the kernel's fp32 weights differ from w_ref by a few fp32 ulps of the terms
            slack = 2.0 ** -20 * (np.abs(w_prev) + f32(lr) * np.abs(direction))
            check_stochastic_rounding(case, f"params, step {step}", new_params, w_ref, slack)
    arrays = {"params": params_d, "m": m_d, "v": v_d, "master": master_d}
    for name, initial_values in initial.items():
        case.same_bits(f"{name} outside the segment", raw(arrays[name])[outside], initial_values[outside])


@pytest.mark.parametrize("max_norm", [1.0, 0.3])
def test_adamw_scalars_clipped(cuda, case, max_norm):
    """The step's scalars written on the device from the norm's square are adamw_scalars' with optim.clip_scale's
    grad_scale, bit for bit: norms below, at and above max_norm (fresh random ones too; 0.3 is a max_norm float32
    cannot hold, so the division must be the host's double one), with skip set exactly when the norm or the loss
    is not finite. A skipped adamw_update leaves params, master, m and v with their bits."""
    from gpt2cu.optim import clip_scale
    lr, step, seed, beta1, beta2 = 6e-4, 7, int(case.rng.integers(2 ** 32)), 0.9, 0.95
    norms_squared = [0.25 * max_norm ** 2, max_norm ** 2, 17.3, np.inf, np.nan, 4.0, 4.0, 4.0]
    losses = [2.5, 2.5, 2.5, 2.5, 2.5, np.nan, -np.inf, None]
    norms_squared += list(case.rng.uniform(0.0, 4.0 * max_norm ** 2, 6))
    losses += list(case.rng.uniform(0.0, 11.0, 6))
    for norm_squared, loss in zip(norms_squared, losses):
        norm_squared = np.float32(norm_squared)
        loss_d = None if loss is None else cp.asarray(np.array([loss], dtype=np.float32))
        got = raw(cuda.adamw_scalars_clipped(lr, step, seed, beta1, beta2, cp.asarray(np.array([norm_squared])),
                                             loss_d, max_norm)).copy()
        norm = float(np.sqrt(norm_squared))
        want = raw(cuda.adamw_scalars(lr, step, clip_scale(norm, max_norm), seed, beta1, beta2)).copy()
        skip = not (np.isfinite(norm) and (loss is None or np.isfinite(loss)))
        what = f"norm^2 {norm_squared}, loss {loss}"
        case.same_bits(f"lr, grad_scale, corrections, seed ({what})", got[:5], want[:5])
        assert got[5] == int(skip), case.where(f"skip is {got[5]} for {what}")

    n = 1000
    _, params_d = case.bf16((n,))
    _, grads_d = case.bf16((n,))
    arrays = {"params": params_d, "master": cp.asarray(case.normal(n).astype(np.float32)),
              "m": cp.asarray(case.normal(n).astype(np.float32)),
              "v": cp.asarray(np.square(case.normal(n)).astype(np.float32))}
    before = {name: raw(a).copy() for name, a in arrays.items()}
    scalars = cuda.adamw_scalars_clipped(lr, step, seed, beta1, beta2, cp.asarray(np.array([np.nan], np.float32)),
                                         None, max_norm)
    cuda.adamw_update(arrays["params"], arrays["master"], grads_d, arrays["m"], arrays["v"], scalars, beta1, beta2,
                      1e-8, 0.1, 3)
    for name, a in arrays.items():
        case.same_bits(f"{name} after a skipped update", raw(a), before[name])


@pytest.mark.parametrize("n", [1, 1_000_003, 16_777_259])
def test_global_norm_squared(cuda, case, n):
    """A sum of positive squares in fp32 against float64 to 1e-5 (block partials, then one final pass:
    each partial sums few terms), and bit-identical on a second run (a fixed partition, no atomics)."""
    g, g_d = case.bf16((n,), std=1e-2)
    first = raw(cuda.global_norm_squared(g_d))
    case.check("sum of squares", decode(first), np.array([np.dot(g, g)]), 1e-5)
    case.same_bits("sum of squares (second run)", raw(cuda.global_norm_squared(g_d)), first)


# ---- bf16 accumulation (ZeRO-2/3's gradient shard) -------------------------------------------------------
@pytest.mark.parametrize("n, out_at, x_at", [(1, 0, 0), (1_000_003, 0, 0), (1_000_003, 1, 3)],
                         ids=["one", "aligned", "unaligned"])
@pytest.mark.parametrize("x_fp32", [False, True], ids=["bf16", "fp32"])
def test_accumulate(cuda, case, n, out_at, x_at, x_fp32):
    """out += x: the fp32 sum of a bf16 value and a bf16 or fp32 one, rounded to nearest even, bit for bit
    (numpy's float32 add rounds as the kernel's does); 1,000,003 is divided by no vector width, and starting
    1 and 3 elements into the buffers leaves them unaligned for the 16-byte path."""
    out, out_d = case.bf16((n + out_at,))
    if x_fp32:
        x = (case.rng.normal(0.0, 0.1, n + x_at)).astype(np.float32)
        x_d = cp.asarray(x)
    else:
        x, x_d = case.bf16((n + x_at,), std=0.1)
    expected = bits_of(out[out_at:].astype(np.float32) + x[x_at:].astype(np.float32))
    cuda.accumulate(out_d[out_at:], x_d[x_at:])
    case.same_bits("out", raw(out_d)[out_at:], expected)
    case.same_bits("in front of out", raw(out_d)[:out_at], bits_of(out[:out_at]))


# ---- the whole model ----------------------------------------------------------------------------------
MODEL_CFG = GPTConfig(n_layer=2, n_head=2, n_embd=128, max_seq_len=64)  # the real vocabulary sizes
MODEL_B, MODEL_T = 4, 64


def micro_step(backend, params, inputs, targets, recompute) -> dict:
    """One training micro-step of a fresh GPT: host float32 logits (forward without dloss), losses and
    d(lnf) (forward with dloss = 1/(B*T): the LM head's gradient; its logits buffer is the op's workspace) and
    every gradient tensor (backward)."""
    b, t = inputs.shape
    model = GPT(MODEL_CFG, backend, b, t, params, recompute=recompute)
    batch = backend.set_batch(inputs, targets)
    model.forward(batch)
    result = {"logits": model.logits()}
    model.forward(batch, dloss=1.0 / (b * t))
    result["losses"] = backend.to_numpy(model.acts["losses"])
    result["dlnf"] = backend.to_numpy(model.acts["dbtc"])
    model.backward(batch)
    result.update({f"grad {name}": backend.to_numpy(view) for name, view in model.g.items()})
    return result


class MicroSteps:
    """micro_step results per (backend, recompute, repeat), computed once, from one set of parameters
    (rounded to bf16, so both backends start from the same numbers) and one random batch."""

    def __init__(self, cuda_backend):
        self.cuda = cuda_backend
        self.case = Case("model tests")
        init = init_params(MODEL_CFG, seed=int(self.case.rng.integers(2 ** 31)))
        self.params = bf16_bits_to_f32(f32_to_bf16_bits(init))
        tokens = self.case.rng.integers(0, MODEL_CFG.vocab_size, (MODEL_B, MODEL_T + 1)).astype(np.int32)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.results = {}

    def __call__(self, backend: str, recompute: int, repeat: int = 0) -> dict:
        key = (backend, recompute, repeat)
        if key not in self.results:
            be = self.cuda if backend == "cuda" else NumpyBackend()
            with be.stream if backend == "cuda" else contextlib.nullcontext():
                self.results[key] = micro_step(be, self.params, self.inputs, self.targets, recompute)
        return self.results[key]


@pytest.fixture(scope="module")
def micro_steps(cuda_backend):
    return MicroSteps(cuda_backend)


@pytest.mark.parametrize("recompute", [0, 1, 2, 3])
def test_model_matches_numpy(micro_steps, recompute):
    """GPT on CudaBackend against NumpyBackend (fp32): mean loss within 1e-2, logits, losses, d(lnf) and
    every gradient tensor within MODEL_REL."""
    case = micro_steps.case
    ref, got = micro_steps("numpy", 0), micro_steps("cuda", recompute)
    gap = abs(float(got["losses"].mean()) - float(ref["losses"].mean()))
    assert gap < 1e-2, case.where(f"mean loss {got['losses'].mean():.5f} vs numpy {ref['losses'].mean():.5f}")
    for name in ref:
        case.check(name, got[name].astype(np.float64), ref[name].astype(np.float64), MODEL_REL)


@pytest.mark.parametrize("recompute", [0, 1, 2, 3])
def test_model_step_is_deterministic(micro_steps, recompute):
    """The same micro-step on a second model instance reproduces every output to the bit."""
    first, second = micro_steps("cuda", recompute), micro_steps("cuda", recompute, repeat=1)
    for name in first:
        micro_steps.case.same_bits(f"{name} (second run)", second[name], first[name])


@pytest.mark.parametrize("recompute", [1, 2, 3])
def test_model_recompute(micro_steps, recompute):
    """Recompute changes where GeLU/layernorm outputs live, not the forward's kernels or inputs: logits,
    losses and d(lnf) are bit-identical to recompute 0. The gradients agree within CHAIN_REL, but need
    not to the bit: the backward recomputes the GeLU with gelu.cu from the stored bf16 pre-activation,
    where the forward took the GeLU epilogue of the fp32 one (recompute 2 and 3 rerun the forward's own
    layernorm and block kernels)."""
    case = micro_steps.case
    base, got = micro_steps("cuda", 0), micro_steps("cuda", recompute)
    for name in ("logits", "losses", "dlnf"):
        case.same_bits(name, got[name], base[name])
    for name in base:
        if name.startswith("grad "):
            case.check(f"{name} vs recompute 0", got[name].astype(np.float64), base[name].astype(np.float64),
                       CHAIN_REL)
