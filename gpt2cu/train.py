"""`python -m gpt2cu.train`: llm.c's train_gpt2cu flags. This module is the command line only: it parses
and checks the flags (every usage error before anything is built), fills the backend's defaults, builds a
trainer.Trainer and runs it with evaluation, sampling, checkpoints and llm.c's main.log around its steps.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import checkpoint, export
from .data import DataLoader, RepeatedBatch
from .dist import Watchdog
from .extras import MissingExtra
from .memory import plan, table
from .models import config_from_descriptor, family_of
from .models.gpt2 import RECOMPUTE_LEVELS
from .optim import AdamWConfig
from .schedules import LR_SCHEDULES
from .trainer import TrainConfig, Trainer
from .zero import ZERO_STAGES

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
    a("-e", dest="model", default=None,
      help="dN (d12 = GPT-2 124M), gpt3:SIZE (gpt3:125M .. gpt3:175B), llama:dN (the LLaMA-3 family), an llm.c "
           "model file or a Hugging Face directory")
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
    a("-r", dest="recompute", type=int, default=1, choices=RECOMPUTE_LEVELS,
      help="0 none, 1 GeLU, 2 GeLU + layernorm, 3 whole blocks (each keeps only its input)")
    a("-z", dest="zero_stage", type=int, default=0, choices=ZERO_STAGES,
      help="ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters")
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
    if args.lr_schedule not in LR_SCHEDULES:
        parser.error(f"-k must be one of {', '.join(LR_SCHEDULES)}, got {args.lr_schedule!r}")
    if args.resume and not args.output_dir:
        parser.error("-y 1 needs -o DIR to resume from")
    if args.overlap_comm and args.zero_stage:
        parser.error("--overlap-comm needs -z 0 (ZeRO-1 reduce-scatters the whole buffer after the backward; "
                     "ZeRO-2 and -3 always reduce each layer inside the backward)")
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


def load_initial_params(args):
    """(model config, fp32 flat params) from a descriptor (fresh init) or a model file / HF directory."""
    if os.path.exists(args.model):  # an llm.c model file or a Hugging Face GPT-2 directory
        return export.load_weights(args.model)
    try:
        cfg = config_from_descriptor(args.model)
    except ValueError as e:
        raise ArgumentError(f"-e {args.model}: {e} (and no such file)")
    return cfg, family_of(cfg).init_params(cfg, seed=args.seed)


def resolve_data(args, comm) -> tuple[str, str]:
    """The (train, val) shard globs: -i / -j, else the embedded corpus (rank 0 builds its cache; the
    others wait for it, then read the same files)."""
    if args.train_data is not None and args.val_data is not None:
        return args.train_data, args.val_data
    from .corpus import default_corpus
    if comm.rank == 0:
        train, val = default_corpus()
    comm.barrier()
    if comm.rank != 0:
        train, val = default_corpus()
    return args.train_data or train, args.val_data or val


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
        backend.select_device(comm.local_rank)
        run = build_run(args, parser, backend, comm)
        return train(run, args, comm)


@dataclass
class Run:
    """What the command line builds: the trainer and what surrounds its steps."""
    trainer: Trainer
    val_loader: DataLoader | None
    train_data: str
    val_data: str


def build_run(args, parser, backend, comm) -> Run:
    """Checks every flag against the backend, the ranks, the model and the data (a usage error exits 2
    here, before anything is allocated), then builds the trainer."""
    fill_backend_defaults(args, backend.name)
    B, T, world = args.batch_size, args.seq_len, comm.world_size
    tokens_per_micro = B * T * world
    total_batch = args.total_batch or tokens_per_micro
    if total_batch % tokens_per_micro:
        parser.error(f"-d {total_batch} is not divisible by B*T*ranks = {B}*{T}*{world} = {tokens_per_micro}")
    try:
        cfg, host_params = load_initial_params(args)
    except (ArgumentError, ValueError, OSError, MissingExtra) as e:
        parser.error(str(e))
    if T > cfg.max_seq_len:
        parser.error(f"-t {T} exceeds the model's max sequence length {cfg.max_seq_len}")
    train_data, val_data = resolve_data(args, comm)
    try:
        loader = DataLoader(train_data, B, T, comm.rank, world, shuffle=not args.overfit_batch, seed=args.seed)
        val_loader = DataLoader(val_data, B, T, comm.rank, world, shuffle=False) if args.val_every else None
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if cfg.vocab_size > loader.max_token + 1:
        parser.error(f"-e {args.model}: the model's vocabulary of {cfg.vocab_size:,} tokens is larger than -i's token "
                     f"shards can hold ({loader.max_token + 1:,} ids: version-1 shards are uint16); tokenize the "
                     f"data into version-7 (uint32) shards")
    grad_accum = total_batch // tokens_per_micro
    max_steps = args.max_steps if args.max_steps >= 0 else max(1, loader.num_batches_per_epoch // grad_accum)
    config = TrainConfig(
        batch_size=B, seq_len=T, max_steps=max_steps, grad_accum=grad_accum,
        adamw=AdamWConfig(lr=args.learning_rate, weight_decay=args.weight_decay), lr_schedule=args.lr_schedule,
        warmup=args.warmup, final_lr_frac=args.final_lr_frac, recompute=args.recompute,
        zero_stage=args.zero_stage, master_weights=bool(args.master_weights), skip_loss_z=args.skip_loss_z,
        skip_norm_z=args.skip_norm_z, seed=args.seed, graphs=not args.no_graphs, overlap_comm=args.overlap_comm)
    try:  # everything is allocated here, up front: an out-of-memory says which group and stops cleanly
        trainer = Trainer(cfg, host_params, backend, comm, config,
                          RepeatedBatch(loader) if args.overfit_batch else loader)
    except MemoryError as e:
        message = str(e) if "allocating" in str(e) else (
            f"out of memory allocating the optimizer state: {str(e).rstrip('.')}. Try -z 1 or higher on several "
            f"GPUs (python -m gpt2cu.plan says how many), or -w 0")
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    backend.synchronize()
    return Run(trainer, val_loader, train_data, val_data)


def train(run: Run, args, comm) -> int:
    """Evaluation, sampling and checkpoints at llm.c's steps around the trainer's steps; logs."""
    t, backend, rank = run.trainer, run.trainer.backend, comm.rank
    say = print if rank == 0 else (lambda *a, **k: None)
    start_step = 0
    if args.resume:
        start_step = t.resume(args.output_dir) or 0
        say(f"resumed from step {start_step} in {args.output_dir}" if start_step else
            f"-y 1: no usable checkpoint in {args.output_dir}, starting from step 0")
    logger = Logger(args.output_dir, rank, resume=bool(args.resume))
    report_start(t, args, run, say)
    max_steps, every = t.config.max_steps, lambda n, step: n and (step % n == 0 or step == max_steps)
    step_times, best_val, run_start = [], float("inf"), time.time()
    watchdog = Watchdog(comm, args.collective_timeout) if comm.world_size > 1 and args.collective_timeout > 0 else None
    pending = None  # the step queued last, not reported yet: the next one is queued before it is read

    def report(step_queued):
        r = step_queued.result()
        if r.step > start_step + 1:  # the first step includes compilation and graph capture
            step_times.append(r.seconds)
        say(progress_line(r, t, step_times, max_steps))
        logger.log(r.step, "trl", r.loss)

    for step in range(start_step, max_steps + 1):
        if watchdog:  # evaluation and checkpoints count as progress too
            watchdog.kick()
        evaluate = run.val_loader is not None and every(args.val_every, step)
        hellaswag = args.hellaswag and every(args.val_every, step)
        # under ZeRO-3 every rank samples: the forward's parameter gathers are collectives
        samples_here = rank == 0 or t.config.zero_stage == 3
        sample = samples_here and args.sample_every and ((step > 0 and step % args.sample_every == 0)
                                                         or step == max_steps)
        save = args.output_dir and step > start_step and every(args.checkpoint_every, step)
        last = step == max_steps or step == args.stop_after
        if pending is not None and (evaluate or hellaswag or sample or save or last):
            report(pending)  # its line before what follows it
            pending = None
        if evaluate:
            best_val = min(best_val, val := t.evaluate(run.val_loader, args.val_max_steps))
            say(f"step {step:5d} | val loss {val:.4f}")
            logger.log(step, "tel", val)
        if hellaswag:
            from .eval import evaluate_hellaswag, read_eval_file
            acc = evaluate_hellaswag(t.model, backend, read_eval_file(args.hellaswag_file), comm)
            say(f"step {step:5d} | HellaSwag acc_norm {acc:.4f}")
            logger.log(step, "eval", acc)
        if sample:
            from .sample import generate
            from .tokenizer import EOT, decode
            say(f"step {step:5d} | sample: {decode(generate(t.model, backend, [EOT], args.gen_tokens, seed=1337 + step))!r}")
        if save:
            t.save(args.output_dir)
            if rank == 0 and args.checkpoints_keep:
                checkpoint.prune_checkpoints(args.output_dir, args.checkpoints_keep, args.major_checkpoint_every)
        if last:
            break
        queued = t.step_async()  # queued behind the step before, whose result is read while this one runs
        if pending is not None:
            report(pending)
        pending = queued
    say("done: " + summary(t, args, start_step, step_times, best_val, time.time() - run_start))
    return 0


def report_start(t: Trainer, args, run: Run, say):
    cfg, c = t.cfg, t.config
    mem = plan(cfg, c.batch_size, c.seq_len, t.comm.world_size, c.zero_stage, c.recompute, t.backend.name,
               c.master_weights)
    say(f"gpt2cu | backend {t.backend.name} | {t.backend.device_name()} | ranks {t.comm.world_size} | "
        f"ZeRO-{c.zero_stage}")
    say(f"model {args.model}: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} params {cfg.num_parameters():,}")
    say(f"B={c.batch_size} T={c.seq_len} total batch {t.tokens_per_step} tokens, grad accum {c.grad_accum}, "
        f"steps {c.max_steps}, recompute {c.recompute}")
    say(f"train {run.train_data} ({t.loader.num_tokens:,} tokens); val {run.val_data}")
    say("memory per rank (python -m gpt2cu.plan prints the same without a GPU):\n" + table(mem))


def progress_line(r, t: Trainer, step_times, max_steps) -> str:
    mean_dt = float(np.mean(step_times[-20:])) if step_times else r.seconds
    tok_s = r.tokens / r.seconds
    mfu = t.backend.mfu(t.flops_per_token() * tok_s)
    return (f"step {r.step:5d}/{max_steps} | loss {r.loss:.6f} | norm {r.norm:.4f} | lr {r.lr:.2e} | "
            f"{r.seconds * 1000:.1f} ms | {tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1f}%" if mfu is not None else "")
            + f" | ETA {format_seconds(mean_dt * (max_steps - r.step))}" + (" | update skipped" if r.skipped else ""))


def summary(t: Trainer, args, start_step, step_times, best_val, wall) -> str:
    steps_run = (args.stop_after if args.stop_after is not None else t.config.max_steps) - start_step
    parts = [f"{max(steps_run, 0) * t.tokens_per_step:,} tokens in {format_seconds(wall)}"]
    if step_times:  # the first step (compilation, graph capture) is left out of the mean
        parts.append(f"mean {t.tokens_per_step / np.mean(step_times):,.0f} tok/s")
    if math.isfinite(best_val):
        parts.append(f"best val loss {best_val:.4f}")
    parts.append(f"peak memory {t.backend.peak_memory() / 2**20:.0f} MiB")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
