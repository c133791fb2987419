"""Training throughput: gpt2cu's CUDA step vs the same model in PyTorch under torch.compile, same GPU,
same run.

    python bench/bench_train.py [--model d12[,llama:d12]] [--T 1024] [--batch-sizes 16,32,64] [--steps 20]
                                [--recompute 0,1] [--zero 0]

Several models (comma separated) are timed one after the other in the same run, each against its family's
reference (gpt2cu.reference: TorchGPT, or TorchLlama with SDPA over grouped key/value heads). --zero
times the ZeRO stages through NCCL with one rank (stage 0: no communicator), as `mpirun -np 1` would run them.

Both sides train the same model (same init, same random token batches) with AdamW and grad clipping,
gpt2cu through trainer.Trainer, the step `python -m gpt2cu.train` runs (each step queued before the one
before it is read);
PyTorch uses bf16 autocast, SDPA flash attention and fused AdamW. Rows: tok/s, ms/step, MFU (the family's
FLOPs per token, llm.c's 6N + 6LCT for GPT-2, over the GPU's dense bf16 peak), peak GPU memory (allocator peak for
torch, memory-pool peak plus the cuBLASLt workspace for gpt2cu), and over the timed steps the board's energy per step,
mean power and mean SM clock (gpt2cu.energy, from NVML: at the power limit, where an H100 or H200 runs these steps,
speed follows energy per step). Timings compare only within one run.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

from gpt2cu.data import InMemoryBatches
from gpt2cu.energy import EnergyMeter
from gpt2cu.memory import plan
from gpt2cu.models import config_from_descriptor, family_of, gpt2, llama
from gpt2cu.optim import AdamWConfig
from gpt2cu.trainer import TrainConfig, Trainer, flops_per_token


def random_batches(cfg, B, T, count, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, size=(count, B, T + 1), dtype=np.int32)
    return [(t[:, :-1].copy(), t[:, 1:].copy()) for t in toks]


_NCCL = []  # one communicator for the whole run


def communicator(zero, backend):
    """No communicator for ZeRO-0; NCCL with this one rank for the sharded stages."""
    from gpt2cu.dist import MPIComm, NCCLComm, SingleProcess
    if zero == 0:
        return SingleProcess()
    if not _NCCL:
        _NCCL.append(NCCLComm(MPIComm(), stream=backend.stream))
    return _NCCL[0]


_METER = []  # [EnergyMeter or None], opened once


def energy_meter():
    """The NVML meter of the current CUDA device, or None (and a line saying why)."""
    if not _METER:
        _METER.append(EnergyMeter.open_cuda())
        if _METER[0] is None:
            print(f"energy not measured: {EnergyMeter.why_not}", flush=True)
    return _METER[0]


def energy_per_step(reading, steps):
    """{j_step, watts, sm_mhz} over the timed steps, or None where not measured"""
    if reading is None:
        return None
    return dict(j_step=reading.joules / steps, watts=reading.watts, sm_mhz=reading.sm_mhz)


def bench_gpt2cu(cfg, B, T, steps, warmup, recompute, zero=0):
    """The trainer's own step (trainer.Trainer, as python -m gpt2cu.train runs it) on random batches."""
    import cupy as cp
    from gpt2cu.backends import get_backend

    backend = get_backend("cuda")
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    config = TrainConfig(batch_size=B, seq_len=T, max_steps=warmup + steps, recompute=recompute, zero_stage=zero,
                         adamw=AdamWConfig(lr=6e-4, weight_decay=0.1), lr_schedule="constant", seed=0)
    trainer = Trainer(cfg, family_of(cfg).init_params(cfg, seed=0), backend, communicator(zero, backend), config,
                      InMemoryBatches(random_batches(cfg, B, T, 4)))
    start, end = cp.cuda.Event(), cp.cuda.Event()
    losses, phases = [], []  # phases: CUDA events at the step's phases ("start", "backward", ...)
    unread = []  # as python -m gpt2cu.train runs: a step's result read once the next one is queued

    def step():
        events = {}

        def mark(phase):
            events[phase] = cp.cuda.Event()
            events[phase].record(backend.stream)
        unread.append(trainer.step_async(mark))
        if len(unread) > 1:
            losses.append(unread.pop(0).result().loss)
        return events

    def drain():
        losses.extend(p.result().loss for p in unread)
        unread.clear()

    for _ in range(warmup):
        step()
    drain()
    backend.synchronize()
    meter = energy_meter()
    if meter:
        meter.start()
    start.record(backend.stream)
    for _ in range(steps):
        phases.append(step())
    end.record(backend.stream)
    drain()
    end.synchronize()
    reading = meter.stop() if meter else None
    ms = cp.cuda.get_elapsed_time(start, end) / steps
    fwd_bwd_ms = sum(cp.cuda.get_elapsed_time(e["start"], e["backward"]) for e in phases) / steps
    update_ms = sum(cp.cuda.get_elapsed_time(e["reduced"], e["updated"]) for e in phases) / steps
    peak = backend.peak_memory() + 32 * 2**20  # + cuBLASLt workspace (cudaMalloc'd outside the pool)
    name = backend.device_name()
    mfu = backend.mfu(flops_per_token(cfg, T) * B * T / (ms / 1e3))
    del trainer
    gc.collect()
    pool.free_all_blocks()
    return dict(ms=ms, peak=peak, mfu=mfu, device=name, first_loss=losses[0], last_loss=losses[-1],
                fwd_bwd_ms=fwd_bwd_ms, update_ms=update_ms, energy=energy_per_step(reading, steps))


def torch_reference(cfg):
    """The PyTorch model class of cfg's family."""
    from gpt2cu.reference.torch_gpt2 import TorchGPT
    from gpt2cu.reference.torch_llama import TorchLlama
    return {gpt2: TorchGPT, llama: TorchLlama}[family_of(cfg)]


def bench_torch(cfg, B, T, steps, warmup, compile_model=True):
    import torch

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = torch_reference(cfg).from_flat(cfg, family_of(cfg).init_params(cfg, seed=0)).cuda()
    opt = model.configure_optimizer(weight_decay=0.1, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    run = torch.compile(model) if compile_model else model
    batches = [(torch.from_numpy(x).long().cuda(), torch.from_numpy(y).long().cuda())
               for x, y in random_batches(cfg, B, T, 4)]
    torch.cuda.reset_peak_memory_stats()
    losses = []

    def step(i):
        x, y = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    meter = energy_meter()
    if meter:
        meter.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(warmup, warmup + steps):
        step(i)
    end.record()
    torch.cuda.synchronize()
    reading = meter.stop() if meter else None
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated()
    del model, opt, run, batches
    gc.collect()
    torch.cuda.empty_cache()
    return dict(ms=ms, peak=peak, first_loss=float(losses[0]), last_loss=float(losses[-1]),
                energy=energy_per_step(reading, steps))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d12", help="descriptors, comma separated (e.g. d12,llama:d12)")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--recompute", default="0,1", help="gpt2cu recompute settings to time (-r)")
    ap.add_argument("--zero", default="0", help="ZeRO stages to time (-z), each with every recompute setting")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--attention", choices=("auto", "mma"), default="auto",
                    help="gpt2cu's attention kernels: auto (Hopper wgmma/TMA on sm_90) or mma (the mma.sync ones)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.attention == "mma":
        from gpt2cu._native import load_kernels
        load_kernels().attention_set_backend(1)
    tables = {desc: bench_model(config_from_descriptor(desc), args) for desc in args.model.split(",")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(tables, f, indent=1)
    for desc, rows in tables.items():
        print_table(desc, config_from_descriptor(desc), rows, args.T)


def bench_model(cfg, args) -> list:
    """One row per batch size: gpt2cu at each recompute setting, and torch.compile."""
    peak_flops = None
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        tokens = B * args.T
        row = dict(B=B, T=args.T, ours=[])
        settings = [(int(z), int(r)) for z in args.zero.split(",") for r in args.recompute.split(",")]
        for z, r in settings:
            t0 = time.time()
            ours = bench_gpt2cu(cfg, B, args.T, args.steps, args.warmup, r, z)
            print(f"gpt2cu B={B} -r {r} -z {z}: {ours['ms']:.2f} ms/step: forward+backward {ours['fwd_bwd_ms']:.2f}, "
                  f"AdamW graph {ours['update_ms']:.2f}, the rest (batch upload, norm, host gaps) "
                  f"{ours['ms'] - ours['fwd_bwd_ms'] - ours['update_ms']:.2f} ({time.time() - t0:.0f}s)", flush=True)
            row["device"] = ours["device"]
            row["ours"].append(dict(recompute=r, zero=z, ms=ours["ms"], tok_s=tokens / ours["ms"] * 1e3,
                                    mfu=ours["mfu"], peak_mib=ours["peak"] / 2**20,
                                    planned_mib=sum(plan(cfg, B, args.T, 1, z, r, "cuda").values()) / 2**20,
                                    loss=(ours["first_loss"], ours["last_loss"]),
                                    energy=ours["energy"]))
            if ours["mfu"]:
                peak_flops = flops_per_token(cfg, args.T) * row["ours"][-1]["tok_s"] / (ours["mfu"] / 100)
        if not args.skip_torch:
            t0 = time.time()
            ref = bench_torch(cfg, B, args.T, args.steps, args.warmup)
            print(f"torch.compile B={B}: {ref['ms']:.2f} ms/step ({time.time() - t0:.0f}s)", flush=True)
            row.update(torch_ms=ref["ms"], torch_tok_s=tokens / ref["ms"] * 1e3, torch_peak_mib=ref["peak"] / 2**20,
                       torch_loss=(ref["first_loss"], ref["last_loss"]),
                       torch_energy=ref["energy"])
            row["torch_mfu"] = (100 * flops_per_token(cfg, args.T) * row["torch_tok_s"] / peak_flops
                                if peak_flops else None)
        rows.append(row)
    return rows


def energy_cells(e) -> str:
    """J/step, W, SM MHz; blanks where not measured"""
    if e is None:
        return f"{'':>7} | {'':>5} | {'':>6}"
    return f"{e['j_step']:>7.1f} | {e['watts']:>5.0f} | {e['sm_mhz']:>6.0f}"


def print_table(desc, cfg, rows, T):
    print(f"\n{desc}: {cfg.n_layer} layers, C={cfg.n_embd}, {cfg.num_parameters():,} parameters, T={T}, bf16, "
          f"{rows[0]['device']}")
    print(f"{'B':>4} | {'impl':<19} | {'tok/s':>10} | {'ms/step':>8} | {'MFU':>6} | {'peak MiB':>9} | {'planned':>9} | "
          f"{'J/step':>7} | {'W':>5} | {'SM MHz':>6} | loss first->last")
    for r in rows:
        for o in r["ours"]:
            ratio = f" ({o['tok_s'] / r['torch_tok_s']:.3f}x torch.compile)" if "torch_tok_s" in r else ""
            impl = f"gpt2cu -r {o['recompute']}" + (f" -z {o['zero']}" if o["zero"] else "")
            print(f"{r['B']:>4} | {impl:<19} | {o['tok_s']:>10,.0f} | {o['ms']:>8.2f} | "
                  f"{o['mfu'] or 0:>5.1f}% | {o['peak_mib']:>9,.0f} | {o['planned_mib']:>9,.0f} | {energy_cells(o['energy'])} | "
                  f"{o['loss'][0]:.3f}->{o['loss'][1]:.3f}{ratio}")
        if "torch_ms" in r:
            print(f"{r['B']:>4} | {'torch.compile':<19} | {r['torch_tok_s']:>10,.0f} | {r['torch_ms']:>8.2f} | "
                  f"{r['torch_mfu'] or 0:>5.1f}% | {r['torch_peak_mib']:>9,.0f} | {'':>9} | "
                  f"{energy_cells(r['torch_energy'])} | {r['torch_loss'][0]:.3f}->{r['torch_loss'][1]:.3f}")

if __name__ == "__main__":
    main()
