"""`python -m gpt2cu.train`: llm.c's train_gpt2cu flags, the training loop, logging and checkpoints.

tokens -> data.DataLoader -> model.GPT.forward -> losses -> GPT.backward -> dist (all-reduce or
reduce-scatter) -> optim.AdamW (clip, update) -> dist (all-gather under ZeRO-1) -> next step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from . import checkpoint, export, optim
from .config import GPTConfig
from .data import DataLoader
from .extras import MissingExtra
from .layout import param_layout
from .model import GPT, init_params

# per-backend defaults for flags left unset: the numpy backend gets a model that trains in minutes on a CPU
BACKEND_DEFAULTS = {
    "numpy": dict(model="d4", batch_size=4, seq_len=128, max_steps=100, learning_rate=1e-3, warmup=10,
                  val_every=25, val_max_steps=4, sample_every=50, gen_tokens=32),
    "cuda": dict(model="d12", batch_size=16, seq_len=1024, max_steps=-1, learning_rate=6e-4, warmup=20,
                 val_every=50, val_max_steps=20, sample_every=100, gen_tokens=64),
}


class ArgumentError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gpt2cu.train", allow_abbrev=False, add_help=False,
        description="Train GPT-2 from scratch (llm.c's train_gpt2cu flags). Unset flags take the defaults of "
                    "the backend in use; bare `python -m gpt2cu.train` trains on the embedded default corpus.")
    a = p.add_argument
    a("-i", dest="train_data", default=None, help="train shards glob (default: the embedded corpus)")
    a("-j", dest="val_data", default=None, help="val shards glob (default: the embedded corpus)")
    a("-e", dest="model", default=None, help="dN descriptor (d12 = GPT-2 124M) or an llm.c model file")
    a("-o", dest="output_dir", default=None, help="directory for main.log and checkpoints")
    a("-b", dest="batch_size", type=int, default=None, help="per-rank micro-batch size B")
    a("-t", dest="seq_len", type=int, default=None, help="sequence length T")
    a("-d", dest="total_batch", type=int, default=None, help="total batch in tokens (default B*T*ranks)")
    a("-x", dest="max_steps", type=int, default=None,
      help="optimization steps (-1: one epoch; 0: only evaluate the loaded model at step 0)")
    a("-k", dest="lr_schedule", default="cosine", help="cosine | linear | constant | wsd")
    a("-l", dest="learning_rate", type=float, default=None)
    a("-u", dest="warmup", type=int, default=None, help="warmup steps")
    a("-q", dest="final_lr_frac", type=float, default=1.0, help="final lr as a fraction of -l")
    a("-c", dest="weight_decay", type=float, default=0.0)
    a("-v", dest="val_every", type=int, default=None, help="val loss every N steps (0: never)")
    a("-m", dest="val_max_steps", type=int, default=None, help="val batches (-1: the whole val set)")
    a("-s", dest="sample_every", type=int, default=None, help="sample every N steps (0: never)")
    a("-g", dest="gen_tokens", type=int, default=None, help="tokens to sample")
    a("-n", dest="checkpoint_every", type=int, default=0, help="checkpoint every N steps (0: never)")
    a("-nk", dest="checkpoints_keep", type=int, default=0, help="keep only the newest K checkpoints (0: all)")
    a("-nm", dest="major_checkpoint_every", type=int, default=0, help="never prune steps divisible by N")
    a("-y", dest="resume", type=int, default=0, choices=(0, 1), help="1: resume from the newest checkpoint in -o")
    a("-r", dest="recompute", type=int, default=1, choices=(0, 1, 2), help="0 none, 1 GeLU, 2 GeLU + layernorm")
    a("-z", dest="zero_stage", type=int, default=0, choices=(0, 1), help="1: ZeRO-1 optimizer sharding")
    a("-sl", dest="skip_loss_z", type=float, default=0.0, help="skip update when loss z-score exceeds this")
    a("-sg", dest="skip_norm_z", type=float, default=0.0, help="skip update when grad-norm z-score exceeds this")
    a("-h", dest="hellaswag", type=int, default=0, choices=(0, 1), help="1: HellaSwag eval every -v steps")
    a("-a", dest="overfit_batch", type=int, default=0, choices=(0, 1), help="1: train on one batch (debug)")
    a("-w", dest="master_weights", type=int, default=1, choices=(0, 1), help="keep fp32 master weights")
    a("--backend", default="auto", choices=("auto", "numpy", "cuda"))
    a("--hellaswag-file", default=os.path.join("dev", "data", "hellaswag", "hellaswag_val.bin"))
    a("--seed", type=int, default=42, help="initialization and shuffling seed")
    a("--stop-after", type=int, default=None, metavar="STEP",
      help="stop after this step, as an interruption would (the schedule still follows -x)")
    a("--overlap-comm", action="store_true",
      help="-z 0 on several ranks: all-reduce each layer's gradients while the backward goes on (same result)")
    a("--collective-timeout", type=float, default=1200.0, metavar="SECONDS",
      help="several ranks: abort every rank when a step makes no progress for this long (a hung rank)")
    a("--no-graphs", action="store_true", help="CUDA backend: launch kernels eagerly (debugging)")
    a("--help", action="help", help="show this message and exit")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, flag in (("batch_size", "-b"), ("seq_len", "-t"), ("total_batch", "-d"), ("gen_tokens", "-g")):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for name, flag in (("val_every", "-v"), ("sample_every", "-s"), ("checkpoint_every", "-n"),
                       ("checkpoints_keep", "-nk"), ("warmup", "-u")):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")
    if args.collective_timeout < 0:
        parser.error(f"--collective-timeout must be >= 0 (0: off), got {args.collective_timeout}")
    if args.max_steps is not None and args.max_steps < -1:
        parser.error(f"-x must be >= -1 (-1: one epoch), got {args.max_steps}")
    if args.learning_rate is not None and not args.learning_rate >= 0:
        parser.error(f"-l must be >= 0, got {args.learning_rate}")
    if not 0.0 <= args.final_lr_frac <= 1.0:
        parser.error(f"-q must be in [0, 1], got {args.final_lr_frac}")
    if args.lr_schedule not in optim.LR_SCHEDULES:
        parser.error(f"-k must be one of {', '.join(optim.LR_SCHEDULES)}, got {args.lr_schedule!r}")
    if args.resume and not args.output_dir:
        parser.error("-y 1 needs -o DIR to resume from")
    if args.overlap_comm and args.zero_stage:
        parser.error("--overlap-comm needs -z 0 (ZeRO-1 reduce-scatters the whole buffer after the backward)")
    return args, parser


def fill_backend_defaults(args, backend_name: str):
    for key, value in BACKEND_DEFAULTS[backend_name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Logger:
    """llm.c's main.log (`s:N trl:X`, `s:N tel:X`, `s:N eval:X`), written by rank 0 only."""

    def __init__(self, output_dir, rank: int, resume: bool):
        self.path = None
        if output_dir and rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, "main.log")
            if not resume:
                open(self.path, "w").close()

    def log(self, step: int, key: str, value: float):
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"s:{step} {key}:{value:.6f}\n")


def load_initial_params(args, cfg_overrides=None):
    """(GPTConfig, fp32 flat params) from a dN descriptor (fresh init) or an llm.c model file."""
    if os.path.exists(args.model):  # an llm.c model file or a Hugging Face GPT-2 directory
        return export.load_weights(args.model)
    try:
        cfg = GPTConfig.from_descriptor(args.model)
    except ValueError as e:
        raise ArgumentError(f"-e {args.model}: {e} (and no such file)")
    return cfg, init_params(cfg, seed=args.seed)


def resolve_data(args, rank: int, comm):
    if args.train_data is None or args.val_data is None:
        from .corpus import default_corpus
        # rank 0 builds the cache; the others wait for it, then read the same files
        if rank == 0:
            train, val = default_corpus()
        comm.barrier()
        if rank != 0:
            train, val = default_corpus()
        args.train_data = args.train_data or train
        args.val_data = args.val_data or val


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    from .backends import get_backend
    from .dist import abort_on_failure, init_distributed, install_abort_on_exception, launcher_env

    try:
        backend = get_backend(args.backend)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--backend {args.backend}: {e}")
    try:
        comm = init_distributed(backend.name)
    except MissingExtra as e:  # no communicator to agree through: each rank stops itself, rank 0 says why
        env = launcher_env()
        parser.exit(2, f"{parser.prog}: error: {e}\n" if env is None or env[1] == 0 else None)
    install_abort_on_exception(comm)
    with abort_on_failure(comm):  # a flag error on one rank must stop every rank, not hang them
        return train(args, parser, backend, comm)


def train(args, parser, backend, comm) -> int:
    backend.select_device(comm.local_rank)
    if hasattr(comm, "stream"):
        comm.stream = backend.stream
    fill_backend_defaults(args, backend.name)
    rank, world = comm.rank, comm.world_size
    say = print if rank == 0 else (lambda *a, **k: None)

    B, T = args.batch_size, args.seq_len
    tokens_per_micro = B * T * world
    total_batch = args.total_batch or tokens_per_micro
    if total_batch % tokens_per_micro:
        parser.error(f"-d {total_batch} is not divisible by B*T*ranks = {B}*{T}*{world} = {tokens_per_micro}")
    grad_accum = total_batch // tokens_per_micro

    try:
        cfg, host_params = load_initial_params(args)
    except (ArgumentError, ValueError, OSError, MissingExtra) as e:
        parser.error(str(e))
    if T > cfg.max_seq_len:
        parser.error(f"-t {T} exceeds the model's max sequence length {cfg.max_seq_len}")
    resolve_data(args, rank, comm)
    try:
        train_loader = DataLoader(args.train_data, B, T, rank, world, shuffle=not args.overfit_batch,
                                  seed=args.seed)
        val_loader = DataLoader(args.val_data, B, T, rank, world, shuffle=False) if args.val_every else None
    except (ValueError, OSError) as e:
        parser.error(str(e))
    max_steps = args.max_steps if args.max_steps >= 0 else max(1, train_loader.num_batches_per_epoch // grad_accum)

    param_count = cfg.num_parameters()
    shards = optim.zero_shards(param_layout(cfg), world if args.zero_stage else 1)
    rank_shard = shards.range(rank if args.zero_stage else 0)
    adam_cfg = optim.AdamWConfig(lr=args.learning_rate, weight_decay=args.weight_decay)
    try:  # everything is allocated here, up front: an out-of-memory says which group and stops cleanly
        model = GPT(cfg, backend, B, T, host_params, recompute=args.recompute, padded_size=shards.padded_size)
        optimizer = optim.AdamW(backend, model, rank_shard, adam_cfg, master_weights=bool(args.master_weights),
                                graphs=not args.no_graphs, initial_params=host_params)
    except MemoryError as e:
        message = str(e) if "allocating" in str(e) else (
            f"out of memory allocating the optimizer state: {str(e).rstrip('.')}. Try -z 1 (ZeRO-1) on several GPUs or -w 0")
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    backend.synchronize()

    start_step, logger = 0, Logger(args.output_dir, rank, resume=bool(args.resume))
    if args.resume:
        found = newest_usable_checkpoint(args.output_dir, cfg, args.zero_stage, comm)
        if found is None:
            say(f"-y 1: no usable checkpoint in {args.output_dir}, starting from step 0")
        else:
            start_step, state, params = found
            model.load_params(params)
            optimizer.load_state(state.arrays)
            train_loader.load_state_dict(state.extra["train_loader"])
            say(f"resumed from step {start_step} in {args.output_dir}")

    mem = backend.memory_report(model, optimizer)
    say(f"gpt2cu | backend {backend.name} | {backend.device_name()} | ranks {world} | ZeRO-{args.zero_stage}")
    say(f"model {args.model}: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} params {param_count:,}")
    say(f"B={B} T={T} total batch {total_batch} tokens, grad accum {grad_accum}, steps {max_steps}, "
        f"recompute {args.recompute}")
    say(f"train {args.train_data} ({train_loader.num_tokens:,} tokens); val {args.val_data}")
    say("memory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()))

    micro_step = backend.graphed(lambda tok, tgt: (model.forward(tok, tgt, dloss=1.0 / (B * T * grad_accum)),
                                                   model.backward(tok)), enabled=not args.no_graphs)
    overlap = args.overlap_comm and args.zero_stage == 0 and world > 1
    flops_per_token = 6 * param_count + 6 * cfg.n_layer * cfg.n_embd * T
    loss_outliers, norm_outliers = optim.OutlierDetector(), optim.OutlierDetector()
    step_times, best_val = [], float("inf")
    run_start = time.time()
    fixed_batch = train_loader.next_batch() if args.overfit_batch else None

    def prepare_next():
        return backend.prepare_batch(*(fixed_batch if fixed_batch else train_loader.next_batch()))
    prefetched, loader_state = None, train_loader.state_dict()
    from .dist import Watchdog
    watchdog = Watchdog(comm, args.collective_timeout) if world > 1 and args.collective_timeout > 0 else None
    for step in range(start_step, max_steps + 1):
        if watchdog:
            watchdog.kick()
        last = step == max_steps
        if val_loader is not None and (step % args.val_every == 0 or last):
            from .eval import evaluate_val_loss
            val = evaluate_val_loss(model, backend, val_loader, args.val_max_steps, comm)
            best_val = min(best_val, val)
            say(f"step {step:5d} | val loss {val:.4f}")
            logger.log(step, "tel", val)
        if args.hellaswag and args.val_every and (step % args.val_every == 0 or last):
            from .eval import evaluate_hellaswag, read_eval_file
            acc = evaluate_hellaswag(model, backend, read_eval_file(args.hellaswag_file), comm)
            say(f"step {step:5d} | HellaSwag acc_norm {acc:.4f}")
            logger.log(step, "eval", acc)
        if rank == 0 and args.sample_every and ((step > 0 and step % args.sample_every == 0) or last):
            from .sample import generate
            from .tokenizer import decode, EOT
            text = decode(generate(model, backend, [EOT], args.gen_tokens, seed=1337 + step))
            say(f"step {step:5d} | sample: {text!r}")
        if args.checkpoint_every and args.output_dir and step > start_step and (
                step % args.checkpoint_every == 0 or last):
            save_checkpoint(args, step, model, optimizer, loader_state, comm, cfg)
        if last or step == args.stop_after:
            break

        t0 = time.time()
        micro_losses = []
        for micro in range(grad_accum):
            batch, prefetched = prefetched if prefetched is not None else prepare_next(), None
            tok, tgt = backend.upload_batch(batch)
            if overlap and micro == grad_accum - 1:  # eager: collectives start from inside the backward
                model.forward(tok, tgt, dloss=1.0 / (B * T * grad_accum))
                model.backward(tok, layer_done=optimizer.layer_done_hook(comm))
            else:
                micro_step(tok, tgt)
            micro_losses.append(backend.mean_loss_async(model.acts["losses"]))
            # the host work of the next micro-batch (the next step's first one after the last) runs while
            # the GPU works on this one; a checkpoint saves the loader's state from before that read
            if micro == grad_accum - 1:
                loader_state = train_loader.state_dict()
            prefetched = prepare_next()
        loss = sum(float(x) for x in micro_losses) / grad_accum
        loss = comm.all_reduce_scalar(loss) / world
        norm = optimizer.reduce_and_norm(comm, args.zero_stage)
        lr = optim.get_lr(args.lr_schedule, step, max_steps, args.learning_rate, args.warmup, args.final_lr_frac)
        loss_z, norm_z = loss_outliers.update(loss), norm_outliers.update(norm)
        skip = (args.skip_loss_z and loss_z > args.skip_loss_z) or (args.skip_norm_z and norm_z > args.skip_norm_z)
        if not math.isfinite(loss) or not math.isfinite(norm):
            skip = True
        if watchdog:  # evaluation and checkpoints above count as progress too
            watchdog.kick()
        if not skip:
            optimizer.step(lr, step + 1, optim.clip_scale(norm, adam_cfg.grad_clip), seed=args.seed + step)
        optimizer.gather_params(comm, args.zero_stage)
        model.zero_grad()
        backend.synchronize()
        dt = time.time() - t0
        if step > start_step:  # the first step includes compilation and graph capture
            step_times.append(dt)
        mean_dt = float(np.mean(step_times[-20:])) if step_times else dt
        tok_s = total_batch / dt
        mfu = backend.mfu(flops_per_token * tok_s)
        eta = format_seconds(mean_dt * (max_steps - step - 1))
        say(f"step {step + 1:5d}/{max_steps} | loss {loss:.6f} | norm {norm:.4f} | lr {lr:.2e} | "
            f"{dt * 1000:.1f} ms | {tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1f}%" if mfu is not None else "")
            + f" | ETA {eta}" + (" | update skipped" if skip else ""))
        logger.log(step + 1, "trl", loss)
    wall = time.time() - run_start
    steps_run = (args.stop_after if args.stop_after is not None else max_steps) - start_step
    summary = [f"{max(steps_run, 0) * total_batch:,} tokens in {format_seconds(wall)}"]
    if step_times:  # the first step (compilation, graph capture) is left out of the mean
        summary.append(f"mean {total_batch / np.mean(step_times):,.0f} tok/s")
    if math.isfinite(best_val):
        summary.append(f"best val loss {best_val:.4f}")
    summary.append(f"peak memory {backend.peak_memory() / 2**20:.0f} MiB")
    say("done: " + ", ".join(summary))
    return 0


def newest_usable_checkpoint(out_dir, cfg, zero_stage, comm):
    """(step, this rank's TrainingState, fp32 params) of the newest checkpoint in out_dir that every rank
    can load, or None. Each unusable newer one is reported with the reason (no DONE marker, a truncated
    or corrupt file, another model shape) before the search falls back to an older step: a damaged
    newest checkpoint must never go unnoticed. The ranks agree on every step (a collective per step)."""
    for step in reversed(checkpoint.checkpoint_steps(out_dir)):
        problem = checkpoint.checkpoint_problem(out_dir, step)
        if problem is None:
            try:
                state = checkpoint.load_training_state(out_dir, step, comm.rank, comm.world_size, zero_stage)
                cfg_ckpt, params = checkpoint.read_model(checkpoint.model_path(out_dir, step))
                if cfg_ckpt != cfg:
                    problem = f"its model {cfg_ckpt} is not the run's {cfg}"
            except (OSError, checkpoint.CheckpointError) as e:
                problem = str(e)
        if problem is not None:
            print(f"-y 1: skipping the checkpoint of step {step}" +
                  (f" (rank {comm.rank})" if comm.world_size > 1 else "") + f": {problem}", flush=True)
        if comm.all_reduce_scalar(problem is not None) == 0:
            return step, state, params
    return None


def save_checkpoint(args, step, model, optimizer, loader_state, comm, cfg):
    """Every rank writes its optimizer state, rank 0 the model; DONE marks the step complete.
    loader_state: the train loader's state after the batches of the steps done so far."""
    out, backend = args.output_dir, model.ops
    arrays = {name: backend.to_numpy(a) for name, a in optimizer.state_arrays().items()}
    state = checkpoint.TrainingState(args.zero_stage, arrays, {"train_loader": loader_state})
    params = model.host_params() if comm.rank == 0 else None
    checkpoint.save_checkpoint(out, step, comm.rank, comm.world_size,
                               lambda path: checkpoint.write_model(path, cfg, params, dtype=backend.checkpoint_dtype),
                               state, comm.barrier)
    if comm.rank == 0:
        if args.checkpoints_keep:
            checkpoint.prune_checkpoints(out, args.checkpoints_keep, keep_every=args.major_checkpoint_every)


if __name__ == "__main__":
    sys.exit(main())
