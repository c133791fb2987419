"""The optimizer's arithmetic: llm.c's learning-rate schedules at their key points (hand-computed,
schedules.py), ZeRO-1 shard ranges, segments and gradient buckets (sharding.py), the outlier detector
(outliers.py), gradient clipping, and the float32 AdamW reference against a float64 re-implementation
(optim.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpt2cu.models.gpt2 import GPTConfig, param_layout
from gpt2cu.optim import AdamWConfig, adamw_reference, clip_scale
from gpt2cu.outliers import OutlierDetector
from gpt2cu.schedules import LR_SCHEDULES, get_lr
from gpt2cu.sharding import SHARD_ALIGN, gradient_buckets, shard_segments, zero_shards

# lr 1.0, 10 warmup steps, final fraction 0.1: the decay runs over steps 10..110 for cosine/linear
COSINE_LINEAR = [  # (step, cosine, linear)
    (0, 0.1, 0.1),                        # warmup start: lr * 1/10
    (4, 0.5, 0.5),
    (9, 1.0, 1.0),                        # warmup end
    (10, 1.0, 1.0),                       # decay start
    (35, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 1.0 - 0.25 * 0.9),
    (60, 0.55, 0.55),                     # midpoint: cos(pi/2) = 0
    (110, 0.1, 0.1),                      # the end: lr * final_frac
]


@pytest.mark.parametrize("step,cosine,linear", COSINE_LINEAR)
def test_cosine_and_linear(step, cosine, linear):
    assert get_lr("cosine", step, 110, 1.0, 10, 0.1) == pytest.approx(cosine, abs=1e-12)
    assert get_lr("linear", step, 110, 1.0, 10, 0.1) == pytest.approx(linear, abs=1e-12)


@pytest.mark.parametrize("step,expected", [
    (0, 0.1), (9, 1.0),                    # warmup
    (10, 1.0), (50, 1.0), (79, 1.0),       # stable until 80% of 100 steps
    (80, 1.0),                             # decay start: 1 - sqrt(0)
    (85, 0.55),                            # 1 - sqrt(0.25) = 0.5 of the way down to 0.1
    (96, 0.1 + (1 - math.sqrt(0.8)) * 0.9),
    (100, 0.1),
])
def test_wsd(step, expected):
    assert get_lr("wsd", step, 100, 1.0, 10, 0.1) == pytest.approx(expected, abs=1e-12)


def test_constant_ignores_warmup_and_decay():
    assert all(get_lr("constant", s, 50, 3e-4, 10, 0.0) == 3e-4 for s in (0, 5, 10, 49, 50))


def test_no_warmup_and_default_final_fraction():
    # -u 0: the first step already has the full lr; -q 1.0 (llm.c's default): no decay at all
    assert get_lr("cosine", 0, 100, 6e-4, 0, 0.0) == pytest.approx(6e-4)
    assert get_lr("cosine", 70, 100, 6e-4, 0, 1.0) == pytest.approx(6e-4)
    # warmup as long as the run: never divides by a zero-length decay
    assert get_lr("linear", 5, 5, 1.0, 5, 0.0) == 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="'cosin'"):
        get_lr("cosin", 0, 10, 1.0, 0, 0.0)
    with pytest.raises(ValueError, match="outside"):
        get_lr("cosine", 11, 10, 1.0, 0, 0.0)
    assert set(LR_SCHEDULES) == {"cosine", "linear", "constant", "wsd"}


def test_clip_scale():
    assert clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(1.0, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == 0.25


def test_adamw_config_validates():
    assert AdamWConfig().beta2 == 0.95 and AdamWConfig().weight_decay == 0.0
    with pytest.raises(ValueError, match="beta1"):
        AdamWConfig(beta1=1.0)


# ---- ZeRO-1 shards ----------------------------------------------------------------------------------

LAYOUT = param_layout(GPTConfig(n_layer=2, n_head=2, n_embd=8, max_seq_len=16, vocab_size=50, padded_vocab_size=64))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zero_shards_cover_the_buffer(world):
    shards = zero_shards(LAYOUT, world)
    assert shards.total == LAYOUT.total
    assert shards.padded_size % (world * SHARD_ALIGN) == 0
    assert 0 <= shards.padded_size - LAYOUT.total < world * SHARD_ALIGN
    ranges = [shards.range(r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == shards.padded_size
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end == start  # contiguous, no overlap
    assert all(b % SHARD_ALIGN == 0 and e - b == shards.shard_size for b, e in ranges)
    with pytest.raises(ValueError):
        shards.range(world)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_segments_reassemble_each_tensor(world):
    shards = zero_shards(LAYOUT, world)
    pieces = {t.name: [] for t in LAYOUT.tensors}
    for r in range(world):
        start, end = shards.range(r)
        for seg in shard_segments(LAYOUT, start, end):
            assert start <= seg.begin < seg.end <= min(end, LAYOUT.total)  # clipped, no padding
            assert seg.decay == LAYOUT[seg.name].decay
            pieces[seg.name].append((seg.begin, seg.end))
    for t in LAYOUT.tensors:
        spans = sorted(pieces[t.name])
        assert spans[0][0] == t.offset and spans[-1][1] == t.end
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_shard_segments_inside_one_tensor():
    qkvw = LAYOUT["qkvw"]
    inside = shard_segments(LAYOUT, qkvw.offset + 3, qkvw.offset + 7)
    assert inside == [("qkvw", qkvw.offset + 3, qkvw.offset + 7, True)]
    assert shard_segments(LAYOUT, LAYOUT.total, LAYOUT.total + 64) == []  # all padding


# ---- outlier detector -------------------------------------------------------------------------------

def test_outlier_detector_small_window():
    det = OutlierDetector(window=4)
    assert all(math.isnan(det.update(x)) for x in (1.0, 2.0, 3.0, 4.0))
    # window [2, 3, 4, 5]: mean 3.5, population variance 1.25
    assert det.update(5.0) == pytest.approx(1.5 / math.sqrt(1.25), rel=1e-12)
    flat = OutlierDetector(window=3)
    for _ in range(3):
        flat.update(2.0)
    assert flat.update(2.0) == 0.0  # a window with no spread scores 0, not a division by zero


def test_outlier_detector_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 0.2, 400)
    values[300] = 9.0  # a spike
    det = OutlierDetector()  # llm.c's window of 128
    for i, x in enumerate(values):
        z = det.update(x)
        if i < 128:
            assert math.isnan(z)
            continue
        window = values[i - 127:i + 1]
        assert z == pytest.approx((x - window.mean()) / window.std(), rel=1e-8)
    assert det.window == 128


# ---- AdamW ------------------------------------------------------------------------------------------

def adamw_float64(p, g, m, v, t, cfg, lr, grad_scale, decay):
    g = g * grad_scale
    m = cfg.beta1 * m + (1 - cfg.beta1) * g
    v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
    mhat, vhat = m / (1 - cfg.beta1 ** t), v / (1 - cfg.beta2 ** t)
    p = p - lr * (mhat / (np.sqrt(vhat) + cfg.eps) + np.where(decay, cfg.weight_decay, 0.0) * p)
    return p, m, v


def test_adamw_reference_against_float64():
    """Three steps with fresh gradients each. Tolerances: every float32 op rounds at 6e-8 relative and the
    update chains ~10 of them, so m and v agree to 1e-5 relative; the parameter change (~lr) is computed
    to ~1e-6 of itself and the parameters (~1) are rounded to 6e-8, hence 1e-6 absolute on them."""
    rng = np.random.default_rng(1)
    n = 1000
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1)
    decay = np.arange(n) % 3 != 0
    p = rng.normal(size=n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p64, m64, v64 = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for t in (1, 2, 3):
        g = rng.normal(size=n).astype(np.float32)
        lr = cfg.lr * t / 3
        adamw_reference(p, g, m, v, t, cfg, lr, 0.5, decay)
        p64, m64, v64 = adamw_float64(p64, g.astype(np.float64), m64, v64, t, cfg, lr, 0.5, decay)
        np.testing.assert_allclose(m, m64, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, v64, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(p, p64, rtol=0, atol=1e-6)
    assert p.dtype == m.dtype == v.dtype == np.float32
    # decay reached only the masked elements: an update without gradients moves exactly those
    q = np.ones(4, np.float32)
    adamw_reference(q, np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), 1,
                    AdamWConfig(weight_decay=0.5), 0.1, 1.0, np.array([True, False, True, False]))
    np.testing.assert_array_equal(q, np.float32([0.95, 1.0, 0.95, 1.0]))


def test_adamw_reference_rejects_float64_and_step_0():
    a = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="float32"):
        adamw_reference(a.astype(np.float64), a, a.copy(), a.copy(), 1, AdamWConfig(), 1e-3, 1.0, True)
    with pytest.raises(ValueError, match="from 1"):
        adamw_reference(a, a.copy(), a.copy(), a.copy(), 0, AdamWConfig(), 1e-3, 1.0, True)


def test_gradient_buckets_cover_every_parameter_once():
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=64, max_seq_len=32, vocab_size=97, padded_vocab_size=128)
    layout = param_layout(cfg)
    buckets = gradient_buckets(layout, cfg.n_layer)
    assert len(buckets) == cfg.n_layer + 1
    covered = np.zeros(layout.total, dtype=int)
    for bucket in buckets:
        for begin, end in bucket:
            covered[begin:end] += 1
    assert (covered == 1).all()
    # the first bucket is the last layer: its qkv weight rows are the last third of qkvw
    qkvw = layout["qkvw"]
    assert (qkvw.offset + 2 * qkvw.size // 3, qkvw.end) in buckets[0]
