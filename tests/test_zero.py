"""ZeRO-2/3 units and storages, -r 3, the GPT-3 descriptors and the memory planner, on one CPU process
(the multi-rank runs are in test_multirank.py).

Exactness: on one rank with one micro-step, -z 2 and -z 3 train bit-identically to -z 0 when the
gradients are never clipped (the same gradients and the same element-wise update; only the gradient
norm sums the buffer in another order, which moves the clip scale by float rounding). With gradient
accumulation each micro-step's gradient is added into the shard instead of accumulated in place by the
backward's matmuls: fp32 rounding, losses within 1e-6 relative and weights within 1e-3 relative norm per
tensor (measured 2e-4 for the key bias, whose near-zero gradients Adam turns into steps of ~lr;
~1e-7 elsewhere). -r 3 runs the forward's very ops again: bit-identical."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gpt2cu import memory, plan
from gpt2cu.backends import get_backend
from gpt2cu.data import InMemoryBatches
from gpt2cu.dist import SingleProcess
from gpt2cu.models import config_from_descriptor
from gpt2cu.models.gpt2 import GPT, GPTConfig, activation_layout, init_params, param_layout
from gpt2cu.optim import AdamW, AdamWConfig
from gpt2cu.sharding import SHARD_ALIGN, unit_shard_segments, zero_units
from gpt2cu.trainer import TrainConfig, Trainer
from gpt2cu.zero import make_storage

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=32, max_seq_len=16, vocab_size=50, padded_vocab_size=64)
LAYOUT = param_layout(CFG)


def fake_comm(rank, world):
    """A communicator for building a rank's buffers only (no collective is called while building them)."""
    return SimpleNamespace(rank=rank, world_size=world, communicates=world > 1)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_zero_units_cover_every_parameter_once(world):
    units = zero_units(LAYOUT, CFG.n_layer, world)
    assert [u.layer for u in units] == [None, 0, 1, 2]
    covered = np.zeros(LAYOUT.total, dtype=int)
    for u in units:
        assert u.padded_size % (world * SHARD_ALIGN) == 0 and u.shard_size * world == u.padded_size
        at = 0
        for p in u.pieces:
            assert p.at == at  # packed in layout order
            covered[p.begin:p.end] += 1
            at += p.end - p.begin
        assert at <= u.padded_size
    assert (covered == 1).all()
    assert len({u.padded_size for u in units[1:]}) == 1, "one buffer of a layer unit holds any layer"
    assert [u.offset for u in units] == list(np.cumsum([0] + [u.padded_size for u in units[:-1]]))
    # the ranks' chunks reassemble every unit's pieces
    pieces = {}
    for rank in range(world):
        for seg in unit_shard_segments(units, rank):
            assert rank * seg.unit.shard_size <= seg.unit_at < (rank + 1) * seg.unit.shard_size
            pieces.setdefault((seg.unit.layer, seg.name), []).append((seg.unit_at, seg.length))
    for u in units:
        for p in u.pieces:
            spans = sorted(pieces[(u.layer, p.name)])
            assert spans[0][0] == p.at and sum(n for _, n in spans) == p.end - p.begin


@pytest.mark.parametrize("stage,world", [(2, 1), (2, 4), (3, 1)])
def test_storage_views_and_host_round_trip(stage, world):
    """Each layer's views show that layer's slice of the layout; host_params returns what was loaded;
    the optimizer's shard holds this rank's pieces."""
    host = np.random.default_rng(0).normal(size=LAYOUT.total).astype(np.float32)
    storage = make_storage(stage, get_backend("numpy"), LAYOUT, CFG.n_layer, fake_comm(world - 1, world)
                           if world > 1 else SingleProcess())
    model = GPT(CFG, get_backend("numpy"), 1, 8, host, storage=storage)
    expected = LAYOUT.views(host)
    for l in range(CFG.n_layer):
        storage.gather_layer(l, prefetch=l + 1)
        for name in ("qkvw", "ln2b", "fcprojw"):
            assert np.array_equal(model.p[name][l], expected[name][l])
    storage.gather_top()
    assert np.array_equal(model.p["wte"], expected["wte"])
    if world == 1:
        assert np.array_equal(model.host_params(), host)
    shard = storage.host_shard(host)
    for seg in storage.segments:
        assert np.array_equal(storage.update_params[seg.param_at:seg.param_at + seg.length],
                              shard[seg.state_at:seg.state_at + seg.length])


BATCHES = [(t[:, :16].astype(np.int32), t[:, 1:].astype(np.int32))
           for t in np.random.default_rng(0).integers(0, 50, (8, 2, 17))]


def train(zero=0, recompute=1, grad_accum=1, grad_clip=1.0, steps=4):
    config = TrainConfig(batch_size=2, seq_len=16, max_steps=steps, grad_accum=grad_accum, recompute=recompute,
                         zero_stage=zero, adamw=AdamWConfig(lr=1e-2, weight_decay=0.1, grad_clip=grad_clip))
    trainer = Trainer(CFG, init_params(CFG, seed=1), get_backend("numpy"), SingleProcess(), config,
                      InMemoryBatches(BATCHES))
    results = [trainer.step() for _ in range(steps)]
    return [r.loss for r in results], [r.norm for r in results], trainer.model.host_params()


def test_recompute_3_is_bit_identical_to_recompute_0():
    base_losses, base_norms, base_params = train(recompute=0, grad_accum=2)
    losses, norms, params = train(recompute=3, grad_accum=2)
    assert losses == base_losses and norms == base_norms and np.array_equal(params, base_params)
    acts = lambda r: activation_layout(CFG, 2, 16, r).total
    assert acts(3) < acts(2) < acts(1) < acts(0)


@pytest.mark.parametrize("zero", [2, 3])
def test_one_rank_zero2_zero3_match_zero0(zero):
    base_losses, _, base_params = train(0, grad_clip=1e9)
    losses, _, params = train(zero, grad_clip=1e9)
    assert losses == base_losses and np.array_equal(params, base_params)
    # accumulation into the shard, clipping from a norm summed in unit order: float rounding
    base_losses, base_norms, base_params = train(0, grad_accum=2)
    losses, norms, params = train(zero, recompute=3, grad_accum=2)
    np.testing.assert_allclose(losses, base_losses, rtol=1e-6)
    np.testing.assert_allclose(norms, base_norms, rtol=1e-5)
    for name, x in LAYOUT.views(params).items():  # per tensor: see test_multirank.py on the key bias
        y = LAYOUT.views(base_params)[name]
        assert np.linalg.norm(x - y) <= 1e-3 * np.linalg.norm(y), name


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("zero,recompute", [(0, 0), (1, 1), (2, 2), (3, 3), (3, 0)])
def test_planner_equals_what_the_numpy_trainer_allocates(zero, recompute, world):
    """memory.plan (what the start-up table and python -m gpt2cu.plan print) against the bytes of the
    buffers the model and optimizer hold, group by group, for rank `world - 1`."""
    backend = get_backend("numpy")
    comm = SingleProcess() if world == 1 else fake_comm(world - 1, world)
    init = init_params(CFG, seed=0)
    model = GPT(CFG, backend, 2, 16, init, recompute=recompute,
                storage=make_storage(zero, backend, LAYOUT, CFG.n_layer, comm))
    optimizer = AdamW(backend, model, comm, AdamWConfig(), zero_stage=zero, initial_params=init)
    planned = memory.plan(CFG, 2, 16, world, zero, recompute, "numpy")
    assert memory.allocated(model, optimizer) == {k: v for k, v in planned.items() if k != "workspace"}
    assert planned["workspace"] == 0


def test_higher_stages_hold_less_per_rank():
    cfg = config_from_descriptor("d48")
    totals = [sum(memory.plan(cfg, 8, 1024, 8, zero, 1).values()) for zero in range(4)]
    assert totals[0] > totals[1] > totals[2] > totals[3]
    by_recompute = [memory.plan(cfg, 8, 1024, 1, 0, r)["activations"] for r in range(4)]
    assert by_recompute == sorted(by_recompute, reverse=True)


# the GPT-3 paper's Table 2.1 (13B: 40 heads x 128 = 5120 channels)
GPT3 = {"125M": (12, 768, 12, 64), "350M": (24, 1024, 16, 64), "760M": (24, 1536, 16, 96),
        "1.3B": (24, 2048, 32, 64), "2.7B": (32, 2560, 32, 80), "6.7B": (32, 4096, 32, 128),
        "13B": (40, 5120, 40, 128), "175B": (96, 12288, 96, 128)}


@pytest.mark.parametrize("size", list(GPT3))
def test_gpt3_descriptors(size):
    cfg = config_from_descriptor(f"gpt3:{size}")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size) == GPT3[size]
    assert cfg.max_seq_len == 2048 and cfg.vocab_size == 50257
    nominal = float(size[:-1]) * (1e6 if size.endswith("M") else 1e9)
    assert abs(cfg.num_parameters() - nominal) < 0.05 * nominal, cfg.num_parameters()


def test_unknown_gpt3_size():
    with pytest.raises(ValueError, match="175B"):
        config_from_descriptor("gpt3:100B")


def test_smallest_fitting_ranks_against_a_scan():
    cfg = config_from_descriptor("d24")
    total = lambda n: sum(memory.plan(cfg, 4, 1024, n, 3, 3).values())
    limit = total(5) + 1
    assert plan.smallest_fitting_ranks(total, limit) == next(n for n in range(1, 100) if total(n) <= limit)
    assert plan.smallest_fitting_ranks(total, 1) is None


def test_plan_cli(capsys):
    assert plan.main(["-e", "gpt3:175B", "-b", "1", "-t", "2048", "--ranks", "64", "-z", "3", "-r", "3",
                      "--gpu-memory", "141"]) == 0
    out = capsys.readouterr().out
    for group in memory.GROUPS + ("total",):
        assert group in out
    assert "smallest number of ranks that fits 141 GB:" in out
    with pytest.raises(SystemExit):
        plan.main(["-e", "gpt3:175B", "-b", "1", "-t", "4096"])


@pytest.mark.parametrize("skip_norm_z", [0.0, 3.0], ids=["decided_on_device", "outlier_rules_on_host"])
def test_a_non_finite_step_is_skipped(skip_norm_z):
    """A NaN in token 0's embedding makes the loss and the gradient norm NaN: the step reports itself skipped
    (with the outlier rules off the backend decides, adamw_scalars_clipped; with a rule on the host reads the
    values first), and every parameter and moment keeps its value."""
    params = init_params(CFG, seed=1)
    params[0] = np.nan
    assert any((x == 0).any() for x, _ in BATCHES[:1])
    config = TrainConfig(batch_size=2, seq_len=16, max_steps=2, skip_norm_z=skip_norm_z,
                         adamw=AdamWConfig(lr=1e-2, weight_decay=0.1))
    trainer = Trainer(CFG, params, get_backend("numpy"), SingleProcess(), config, InMemoryBatches(BATCHES))
    with np.errstate(invalid="ignore"):
        result = trainer.step()
    assert result.skipped and not np.isfinite(result.loss) and not np.isfinite(result.norm)
    np.testing.assert_array_equal(trainer.model.host_params(), params)
    assert not trainer.optimizer.m.any() and not trainer.optimizer.v.any()


def test_queued_steps_read_in_order():
    """step_async's results: a later step's result() reads the earlier unread ones first (the outlier
    detectors see the steps in order), and the results are step()'s."""
    config = TrainConfig(batch_size=2, seq_len=16, max_steps=3, adamw=AdamWConfig(lr=1e-2, weight_decay=0.1))
    waited = Trainer(CFG, init_params(CFG, seed=1), get_backend("numpy"), SingleProcess(), config,
                     InMemoryBatches(BATCHES))
    queued = Trainer(CFG, init_params(CFG, seed=1), get_backend("numpy"), SingleProcess(), config,
                     InMemoryBatches(BATCHES))
    want = [waited.step() for _ in range(3)]
    pending = [queued.step_async() for _ in range(3)]
    last = pending[2].result()
    assert all(p.result_ is not None for p in pending)
    got = [p.result() for p in pending]
    assert last is got[2]
    assert [(r.step, r.loss, r.norm, r.skipped) for r in got] == [(r.step, r.loss, r.norm, r.skipped) for r in want]
