"""The CUDA training step against a PyTorch GPT-2 (bf16 autocast), checkpoint interchange with the numpy
backend, and bit-exact resume on the GPU. Skipped without a GPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpt2cu.data import InMemoryBatches
from gpt2cu.optim import AdamW, AdamWConfig
from gpt2cu.trainer import TrainConfig, Trainer
from gpt2cu.models.gpt2 import GPTConfig, GPT, init_params

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus_batches(B, T, count):
    from gpt2cu.corpus import default_corpus
    from gpt2cu.data import DataLoader
    train, _ = default_corpus()
    loader = DataLoader(train, B, T, shuffle=False)
    return [loader.next_batch() for _ in range(count)]


# the GPT-2 124M recipe's optimizer settings (scripts/run_gpt2_124M.sh: -l 0.0006 -u 700 -q 0.0 -x 18865 -c 0.1)
RECIPE_LR, RECIPE_WARMUP, RECIPE_STEPS, RECIPE_DECAY = 6e-4, 700, 18865, 0.1


def test_loss_tracks_pytorch_for_100_steps():
    """The first 100 steps of the GPT-2 124M recipe (d12, B=8, T=1024, the default corpus, same init and
    batches, AdamW with its weight decay, clipping at 1.0 and its learning-rate schedule) against PyTorch
    with bf16 autocast: |loss - torch loss| < 0.05 at every step and < 0.015 on average (issue 5's bar;
    measured max 0.004, mean 0.0006). Gradients after the first micro-step agree per tensor within 5%
    relative norm (two bf16 computations of the same fp32 quantity: each is ~1% off; measured 0.2-0.3%).
    With a 14x shorter warmup the training turns chaotic enough that PyTorch's own attention kernels
    disagree by up to 0.15 (bench/parity_vs_torch.py, docs/perf.md): no implementation can meet an
    every-step bar there."""
    from gpt2cu.backends import get_backend
    from gpt2cu.dist import SingleProcess
    from gpt2cu.reference.torch_gpt2 import TorchGPT

    cfg, B, T, steps = GPTConfig.from_descriptor("d12"), 8, 1024, 100
    init = init_params(cfg, seed=0)
    batches = corpus_batches(B, T, steps)
    config = TrainConfig(batch_size=B, seq_len=T, max_steps=RECIPE_STEPS, recompute=1, seed=0, warmup=RECIPE_WARMUP,
                         adamw=AdamWConfig(lr=RECIPE_LR, weight_decay=RECIPE_DECAY), final_lr_frac=0.0)
    trainer = Trainer(cfg, init, get_backend("cuda"), SingleProcess(), config, InMemoryBatches(batches))

    ref = TorchGPT.from_flat(cfg, init).cuda()
    ref_opt = ref.configure_optimizer(weight_decay=RECIPE_DECAY, lr=RECIPE_LR, betas=(0.9, 0.95), eps=1e-8,
                                      fused=True)

    def compare_first_gradients(phase):
        if phase != "backward" or trainer.step_count:
            return
        model = trainer.model
        ours_g = model.layout.views(trainer.backend.to_numpy(model.grads[:model.layout.total]))
        theirs_g = model.layout.views(ref.grads_to_flat())
        rels = {name: float(np.linalg.norm(g - theirs_g[name]) / max(np.linalg.norm(theirs_g[name]), 1e-12))
                for name, g in ours_g.items()}
        print("step-1 gradient relative errors:", {k: round(v, 4) for k, v in rels.items()})
        assert max(rels.values()) < 5e-2, rels

    assert_loss_tracks_torch(trainer, ref, ref_opt, batches, compare_first_gradients)


def assert_loss_tracks_torch(trainer, ref, ref_opt, batches, mark=None):
    """Steps the trainer and a PyTorch reference (bf16 autocast, clipping at 1.0, the trainer's learning
    rates) on the same batches: the loss falls by 2 and |loss - torch loss| < 0.05 at every step, < 0.015 on
    average. mark: the trainer's step hook."""
    import torch
    ours, theirs = [], []
    for step, (x, y) in enumerate(batches):
        xt, yt = torch.from_numpy(x).long().cuda(), torch.from_numpy(y).long().cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = ref(xt, yt)
        loss.backward()
        theirs.append(loss.item())
        ours.append(trainer.step(mark).loss)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for group in ref_opt.param_groups:
            group["lr"] = trainer.lr(step)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    diff = np.abs(np.array(ours) - np.array(theirs))
    print(f"loss ours {ours[0]:.4f}->{ours[-1]:.4f}, torch {theirs[0]:.4f}->{theirs[-1]:.4f}, "
          f"max |diff| {diff.max():.4f} at step {diff.argmax() + 1}, mean {diff.mean():.4f}")
    print("ours ", np.round(ours, 3).tolist())
    print("torch", np.round(theirs, 3).tolist())
    assert ours[-1] < ours[0] - 2.0, "the loss did not fall"
    assert diff.max() < 0.05, diff
    assert diff.mean() < 0.015, diff.mean()


def test_master_weights_start_from_the_fp32_parameters():
    """AdamW's fp32 master copy holds the host parameters it is given exactly (not their bf16 rounding),
    for a whole model and for a ZeRO shard that runs into the padding past the layout."""
    from gpt2cu.backends import get_backend
    from gpt2cu.models.gpt2 import param_layout
    from types import SimpleNamespace

    from gpt2cu.sharding import zero_shards
    from gpt2cu.zero import FlatStorage
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, max_seq_len=32)
    init = init_params(cfg, seed=5)
    backend = get_backend("cuda")
    shards = zero_shards(param_layout(cfg), 7)
    last_of_seven = SimpleNamespace(rank=6, world_size=7, communicates=True)  # the storage only derives its shard
    alone = SimpleNamespace(rank=0, world_size=1, communicates=False)
    for comm, shard in ((alone, zero_shards(param_layout(cfg), 1).range(0)), (last_of_seven, shards.range(6))):
        storage = FlatStorage(backend, param_layout(cfg), cfg.n_layer, comm, zero_stage=1)
        model = GPT(cfg, backend, 1, 8, init, storage=storage)
        opt = AdamW(backend, model, comm, AdamWConfig(), zero_stage=1, initial_params=init)
        assert (storage.start, storage.end) == shard
        master = backend.to_numpy(opt.master)
        expected = np.zeros(shard[1] - shard[0], np.float32)
        part = init[shard[0]:shard[1]]
        expected[:part.size] = part
        assert np.array_equal(master, expected)
        assert not np.array_equal(master[:part.size], backend.to_numpy(model.params[shard[0]:shard[0] + part.size]))
    assert shards.range(6)[1] > model.layout.total, "the last shard should reach into the padding"


def test_checkpoints_move_between_backends(tmp_path):
    """A bf16 model file written from the GPU gives the same loss on the numpy backend, and a numpy
    fp32 file loads on the GPU (bf16 rounding of the weights: loss within 0.02)."""
    from gpt2cu import checkpoint
    from gpt2cu.backends import get_backend
    cfg, B, T = GPTConfig(n_layer=2, n_head=2, n_embd=128, max_seq_len=128), 2, 128
    x, y = corpus_batches(B, T, 1)[0]
    losses = {}
    for name in ("cuda", "numpy"):
        backend = get_backend(name)
        model = GPT(cfg, backend, B, T, init_params(cfg, seed=3))
        model.forward(backend.set_batch(x, y))
        losses[name] = backend.mean_loss(model.acts["losses"])
        path = str(tmp_path / f"{name}.bin")
        checkpoint.write_model(path, cfg, model.host_params(), dtype=backend.checkpoint_dtype)
        other = get_backend("numpy" if name == "cuda" else "cuda")
        cfg2, params = checkpoint.read_model(path)
        assert cfg2 == cfg
        loaded = GPT(cfg, other, B, T, params)
        loaded.forward(other.set_batch(x, y))
        assert abs(other.mean_loss(loaded.acts["losses"]) - losses[name]) < 0.02
    assert abs(losses["cuda"] - losses["numpy"]) < 0.02


def test_cli_resume_on_gpu_is_bit_exact(tmp_path):
    def run(*flags):
        r = subprocess.run([sys.executable, "-m", "gpt2cu.train", "--backend", "cuda", "-e", "d2", "-b", "4",
                            "-t", "256", "-x", "10", "-n", "5", "-v", "0", "-s", "0", "-l", "1e-3", *flags],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return {int(m.group(1)): m.group(2) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss ([\d.]+)", r.stdout)}
    full = run("-o", str(tmp_path / "full"))
    run("-o", str(tmp_path / "part"), "--stop-after", "5")
    resumed = run("-o", str(tmp_path / "part"), "-y", "1")
    assert sorted(resumed) == list(range(6, 11))
    assert all(full[s] == resumed[s] for s in resumed), (full, resumed)


def test_queued_steps_train_as_waited_steps():
    """Four steps queued before any result is read (step_async, as the CLI and the benchmark run them, here
    further ahead) give the same losses, norms and parameters, bit for bit, as four steps each waited for:
    every step's loss and norm are copied out behind it, though the next step reuses the norm's buffer."""
    from gpt2cu.backends import get_backend
    from gpt2cu.dist import SingleProcess
    cfg, B, T = GPTConfig(n_layer=2, n_head=2, n_embd=128, max_seq_len=128), 4, 128
    batches = corpus_batches(B, T, 4)

    def run(queued):
        config = TrainConfig(batch_size=B, seq_len=T, max_steps=len(batches), lr_schedule="constant", seed=0,
                             adamw=AdamWConfig(lr=1e-3, weight_decay=0.1, grad_clip=0.5))
        trainer = Trainer(cfg, init_params(cfg, seed=1), get_backend("cuda"), SingleProcess(), config,
                          InMemoryBatches(batches))
        if queued:
            pending = [trainer.step_async() for _ in batches]
            results = [pending[2].result()] + [p.result() for p in pending]  # a later one first: reads in order
        else:
            results = [None] + [trainer.step() for _ in batches]
        return [(r.step, r.loss, r.norm, r.skipped) for r in results[1:]], trainer.model.host_params()

    waited, waited_params = run(False)
    queued, queued_params = run(True)
    assert queued == waited
    assert len({norm for _, _, norm, _ in waited}) == len(waited)  # distinct norms: a stale read would show
    assert np.array_equal(queued_params, waited_params)


def test_nccl_with_one_rank_matches_no_communicator():
    """The NCCL path (per-layer all-reduces for -z 0, also started from inside the backward; reduce-scatter,
    sharded AdamW, all-gather for -z 1) with world size 1 gives bit-identical training to the
    single-process path."""
    from gpt2cu.backends import get_backend
    from gpt2cu.dist import MPIComm, NCCLComm, SingleProcess
    cfg, B, T = GPTConfig(n_layer=2, n_head=2, n_embd=128, max_seq_len=128), 4, 128
    batches = corpus_batches(B, T, 3)
    backend = get_backend("cuda")
    nccl = NCCLComm(MPIComm(), stream=backend.stream)

    def run(comm, zero, overlap=False):
        config = TrainConfig(batch_size=B, seq_len=T, max_steps=len(batches), zero_stage=zero, overlap_comm=overlap,
                             adamw=AdamWConfig(lr=1e-3, weight_decay=0.1), lr_schedule="constant", seed=0)
        trainer = Trainer(cfg, init_params(cfg, seed=1), backend, comm, config, InMemoryBatches(batches))
        losses = [trainer.step().loss for _ in batches]
        return losses, trainer.model.host_params()

    for zero, overlap in ((0, False), (0, True), (1, False)):
        ref_losses, ref_params = run(SingleProcess(), zero)
        losses, params = run(nccl, zero, overlap)
        assert losses == ref_losses, (zero, overlap, losses, ref_losses)
        assert np.array_equal(params, ref_params), (zero, overlap)


def zero_host_grads(storage):
    """The gradients a storage holds after the reduction, as a host fp32 buffer in layout order (one rank:
    ZeRO-1's flat buffer, or ZeRO-2/3's shard, which then holds every unit)."""
    if storage.zero_stage <= 1:
        return storage.backend.to_numpy(storage.grads[:storage.layout.total])
    unit_major = storage.backend.to_numpy(storage.grad_shard)
    out = np.zeros(storage.layout.total, dtype=np.float32)
    for unit in storage.units:
        storage._layout_order(unit, unit_major[unit.shard_offset:unit.shard_offset + unit.shard_size], out)
    return out


def test_nccl_with_one_rank_zero2_zero3_match_zero1():
    """ZeRO-2 and -3 through NCCL with world size 1 (per-layer reduce-scatters inside the backward, ZeRO-3's
    gathers prefetched on the communication stream) against ZeRO-1 on the same communicator, with -r 3
    too, two micro-steps per step. The first loss is bit-identical (same forward). The first step's
    gradients differ by rounding only: ZeRO-1's backward accumulates the second micro-step in the matmul
    (one bf16 rounding), ZeRO-2/3 add each micro-step's bf16 gradient into the shard (two): within 1% relative
    norm per tensor. After 3 updates weights are within 1% per tensor, except where the gradient is rounding
    noise, which Adam (dividing by sqrt(v)) turns into steps of ~lr whose signs differ between any two
    roundings; those elements are only bounded by what Adam can move them (3 steps of at most ~lr each, with
    room for the bias correction). They are the key bias (softmax ignores it: its exact gradient is 0) and the
    few elements (at most 1% of a tensor) whose first gradients in the two runs differ by more than half their
    size (an H200 run had ln1b's at 0 against -1.1e-6 and fcb's at 0 against -3.2e-7, each element moved
    ~9e-4 apart, 2.5% and 1.1% of its tensor's norm)."""
    from gpt2cu.backends import get_backend
    from gpt2cu.dist import MPIComm, NCCLComm
    from gpt2cu.models.gpt2 import param_layout
    cfg, B, T = GPTConfig(n_layer=3, n_head=2, n_embd=128, max_seq_len=128), 4, 128
    C, lr, steps = cfg.n_embd, 1e-3, 3
    batches = corpus_batches(B, T, 2 * steps)
    backend = get_backend("cuda")
    nccl = NCCLComm(MPIComm(), stream=backend.stream)
    layout = param_layout(cfg)

    def run(zero, recompute=1):
        config = TrainConfig(batch_size=B, seq_len=T, max_steps=steps, grad_accum=2, zero_stage=zero,
                             recompute=recompute, adamw=AdamWConfig(lr=lr, weight_decay=0.1),
                             lr_schedule="constant", seed=0)
        trainer = Trainer(cfg, init_params(cfg, seed=1), backend, nccl, config, InMemoryBatches(batches))
        grads = {}
        first = trainer.step(lambda phase: phase == "reduced" and grads.setdefault(
            "g", zero_host_grads(trainer.model.storage)))
        losses = [first.loss] + [trainer.step().loss for _ in range(steps - 1)]
        return losses, grads["g"], trainer.model.host_params()

    def split_key_bias(views):
        """qkvb's key part apart from the rest of the tensors."""
        views = dict(views)
        qkvb = views.pop("qkvb")
        views["qkvb (query, value)"] = np.concatenate([qkvb[:, :C], qkvb[:, 2 * C:]], axis=1)
        return views, qkvb[:, C:2 * C]

    rel = lambda x, y: np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)
    ref_losses, ref_grads, ref_params = run(1)
    ref_g, _ = split_key_bias(layout.views(ref_grads))
    ref_p, ref_key = split_key_bias(layout.views(ref_params))
    for zero, recompute in ((2, 1), (3, 1), (3, 3)):
        losses, grads, params = run(zero, recompute)
        g, _ = split_key_bias(layout.views(grads))
        p, key = split_key_bias(layout.views(params))
        grad_err = {name: rel(g[name], ref_g[name]) for name in ref_g}
        noise = {name: np.abs(g[name] - ref_g[name]) > 0.5 * np.abs(ref_g[name]) for name in ref_g}
        param_err = {name: rel(p[name][~noise[name]], ref_p[name][~noise[name]]) for name in ref_p}
        noise_step = max((np.abs(p[name] - ref_p[name])[noise[name]].max(initial=0.0) for name in ref_p))
        key_step = np.abs(key - ref_key).max()
        print(f"-z {zero} -r {recompute}: losses {losses} vs {ref_losses}; worst gradient "
              f"{max(grad_err, key=grad_err.get)} {max(grad_err.values()):.2e}; worst weight "
              f"{max(param_err, key=param_err.get)} {max(param_err.values()):.2e} (noise elements apart: "
              f"{sum(int(n.sum()) for n in noise.values())}, max |diff| {noise_step:.2e}); key bias max |diff| "
              f"{key_step:.2e}")
        assert losses[0] == ref_losses[0], (zero, recompute, losses, ref_losses)
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 0.01, (zero, recompute, losses, ref_losses)
        assert max(grad_err.values()) < 0.01, (zero, recompute, grad_err)
        assert max(param_err.values()) < 0.01, (zero, recompute, param_err)
        assert all(n.mean() <= 0.01 for n in noise.values()), (zero, recompute, {k: n.sum() for k, n in noise.items()})
        assert max(key_step, noise_step) <= 3 * steps * lr, (zero, recompute, key_step, noise_step)


@pytest.mark.parametrize("model,B", [("d12", 16), ("d24", 16), ("d48", 8)])
def test_planner_matches_peak_memory(model, B):
    """python -m gpt2cu.plan's total for one GPU (memory.plan) against the measured peak after two steps
    (CuPy's pool never returns memory by itself, so its growth over this test is this run's peak; earlier
    tests' buffers still held are the baseline; plus the cuBLASLt workspace, outside the pool): within 10%."""
    from gpt2cu import memory
    from gpt2cu.backends import get_backend
    from gpt2cu.dist import SingleProcess
    from gpt2cu.models import config_from_descriptor
    import gc

    import cupy as cp
    gc.collect()  # earlier tests' trainers
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    baseline = pool.total_bytes()
    T = 1024
    cfg = config_from_descriptor(model)
    backend = get_backend("cuda")
    config = TrainConfig(batch_size=B, seq_len=T, max_steps=2, recompute=1)
    trainer = Trainer(cfg, init_params(cfg, seed=0), backend, SingleProcess(), config,
                      InMemoryBatches(corpus_batches(B, T, 2)))
    for _ in range(2):
        trainer.step()
    backend.synchronize()
    measured = pool.total_bytes() - baseline + memory.CUBLASLT_WORKSPACE_BYTES
    planned = sum(memory.plan(cfg, B, T, 1, 0, 1, "cuda").values())
    print(f"{model} B={B}: planned {planned / 2**20:,.0f} MiB, measured peak {measured / 2**20:,.0f} MiB")
    assert abs(measured - planned) <= 0.1 * measured, (planned, measured)


def test_eval_sampling_and_export_on_gpu(tmp_path):
    """-v val loss, -h HellaSwag (on a small file in llm.c's eval format), -s sampling, the sample CLI
    and the Hugging Face export all run on the CUDA backend."""
    from gpt2cu.eval import Example, write_eval_file
    rng = np.random.default_rng()
    examples = [Example(label=int(rng.integers(4)), context=tuple(int(t) for t in rng.integers(0, 50000, 20)),
                        endings=tuple(tuple(int(t) for t in rng.integers(0, 50000, int(rng.integers(3, 9))))
                                      for _ in range(4))) for _ in range(11)]
    eval_file = str(tmp_path / "hellaswag_val.bin")
    write_eval_file(eval_file, examples)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "gpt2cu.train", "--backend", "cuda", "-e", "d2", "-b", "8", "-t", "128",
                        "-x", "4", "-v", "2", "-m", "3", "-h", "1", "--hellaswag-file", eval_file, "-s", "2", "-g", "8",
                        "-n", "4", "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("HellaSwag acc_norm") == 3 and r.stdout.count("| val loss") == 3, r.stdout
    assert "sample:" in r.stdout
    log = (out / "main.log").read_text()
    assert re.search(r"s:4 eval:[\d.]+", log) and re.search(r"s:4 tel:[\d.]+", log), log
    model_file = str(out / "model_00000004.bin")
    s = subprocess.run([sys.executable, "-m", "gpt2cu.sample", model_file, "--prompt", "Hello", "-n", "8",
                        "--backend", "cuda"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert s.returncode == 0 and s.stdout.strip(), s.stderr[-2000:]
    e = subprocess.run([sys.executable, "-m", "gpt2cu.export", model_file, str(tmp_path / "hf")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-2000:]
    from gpt2cu import checkpoint
    from gpt2cu.export import import_hf
    _, exported = import_hf(str(tmp_path / "hf"))
    assert np.array_equal(exported, checkpoint.read_model(model_file)[1])
