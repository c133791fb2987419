"""The training step, written once: every caller (the CLI, the benchmark, the parity study, the tests)
trains through a Trainer.

    trainer = Trainer(model_cfg, init_params, backend, comm, TrainConfig(...), train_loader)
    result = trainer.step()            # micro-steps, gradient reduction, clipping, outlier skips,
                                       # AdamW update, ZeRO gather -> StepResult
    pending = trainer.step_async()     # the same, queued; pending.result() later (queue the next step first)
    trainer.evaluate(val_loader, 20)   # mean val loss over ranks
    trainer.save(out_dir) / trainer.resume(out_dir, say)   # llm.c's checkpoints, bit-exact resume

tokens -> loader -> model.forward -> losses -> model.backward -> optimizer.reduce_gradients (all-reduce
or reduce-scatter) -> optimizer.step (clip, AdamW, all-gather) -> the next step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint
from .models import family_of
from .optim import AdamW, AdamWConfig, norm_from_squared
from .outliers import OutlierDetector
from .schedules import LR_SCHEDULES, get_lr
from .zero import make_storage


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training step depends on besides the model, the data and where it runs."""
    batch_size: int                  # B, per rank and micro-step
    seq_len: int                     # T
    max_steps: int                   # the learning-rate schedule's length
    grad_accum: int = 1              # micro-steps per step
    adamw: AdamWConfig = field(default_factory=AdamWConfig)
    lr_schedule: str = "cosine"
    warmup: int = 0
    final_lr_frac: float = 1.0
    recompute: int = 1
    zero_stage: int = 0
    master_weights: bool = True
    skip_loss_z: float = 0.0         # skip the update when the loss z-score exceeds this (0: never)
    skip_norm_z: float = 0.0         # likewise for the gradient norm
    seed: int = 42                   # the stochastic-rounding seed of update t is seed + t - 1
    graphs: bool = True              # capture the micro-step and the update as CUDA graphs
    overlap_comm: bool = False       # ZeRO-0 on several ranks: reduce each layer inside the backward

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size, seq_len and grad_accum must be >= 1: {self}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.lr_schedule!r}")


@dataclass(frozen=True)
class StepResult:
    step: int          # the number of steps done, this one included (llm.c's 1-based step)
    loss: float        # mean over micro-steps and ranks
    norm: float        # global gradient norm before clipping
    lr: float
    skipped: bool      # the update was skipped (outlier, or a non-finite loss or norm)
    seconds: float
    tokens: int        # tokens of this step over all ranks


class PendingStep:
    """A step queued by Trainer.step_async; result() waits for its loss and norm alone (not for later steps)
    and returns its StepResult, reading any earlier unread step first."""

    def __init__(self, trainer: "Trainer", step: int, lr: float, t0: float):
        self.trainer, self.step, self.lr, self.t0 = trainer, step, lr, t0
        self.read = None  # the backend's read_scalars_async of (the loss summed over ranks, the norm squared)
        self.result_: StepResult | None = None

    def result(self) -> StepResult:
        return self.trainer._read_through(self)


def flops_per_token(cfg, T: int) -> int:
    """The training FLOPs of one token at sequence length T, as the model family counts them."""
    return cfg.flops_per_token(T)


class Trainer:
    """One model, its optimizer and its data stream, stepped on one backend and communicator."""

    def __init__(self, model_cfg, init_params: np.ndarray, backend, comm, config: TrainConfig, train_loader):
        """init_params: fp32 host parameters (a fresh init or a loaded model file); train_loader: an object
        with next_batch() -> (inputs, targets), state_dict() and load_state_dict() (data.DataLoader)."""
        self.cfg, self.backend, self.comm, self.config, self.loader = model_cfg, backend, comm, config, train_loader
        comm.use_stream(backend.stream)  # NCCL collectives queue behind the backend's work
        self.family = family_of(model_cfg)
        B, T = config.batch_size, config.seq_len
        storage = make_storage(config.zero_stage, backend, self.family.param_layout(model_cfg), model_cfg.n_layer,
                               comm)
        self.model = self.family.Model(model_cfg, backend, B, T, init_params, recompute=config.recompute,
                                       storage=storage)
        self.optimizer = AdamW(backend, self.model, comm, config.adamw, zero_stage=config.zero_stage,
                               master_weights=config.master_weights, graphs=config.graphs,
                               initial_params=init_params)
        self.step_count = 0
        self.tokens_per_step = B * T * config.grad_accum * comm.world_size
        self._dloss = 1.0 / (B * T * config.grad_accum)  # llm.c: every position of the step counts once
        # ZeRO-2/3 collectives run inside the micro-step, between kernels on two streams: not captured
        # (docs/architecture.md, "ZeRO-2 and ZeRO-3"); the update stays a graph
        graph_micro_steps = config.graphs and not storage.collectives_in_backward
        if config.graphs and not graph_micro_steps and backend.stream is not None and comm.rank == 0:
            print(f"ZeRO-{config.zero_stage}: the micro-steps run without CUDA graphs (their collectives are "
                  f"not captured); the AdamW update is still a graph", flush=True)
        self._micro_step = backend.graphed(self._forward_backward, enabled=graph_micro_steps)
        self._overlap = config.overlap_comm and self.optimizer.overlaps_backward
        self._loss_outliers, self._norm_outliers = OutlierDetector(), OutlierDetector()
        self._prefetched = None
        self._loader_state = train_loader.state_dict()  # after the batches of the steps done, no further
        self._unread: list[PendingStep] = []  # queued steps whose results are not read yet, oldest first
        self._last_read = 0.0

    def _forward_backward(self, batch):
        self.model.forward(batch, dloss=self._dloss)
        self.model.backward(batch)

    def _next_batch(self):
        """The host half of the next micro-batch: it runs while the device works on the current one."""
        return self.backend.prepare_batch(*self.loader.next_batch())

    def lr(self, step: int) -> float:
        c = self.config
        return get_lr(c.lr_schedule, step, c.max_steps, c.adamw.lr, c.warmup, c.final_lr_frac)

    def step(self, mark=None) -> StepResult:
        """One optimization step, waited for (the device idle after it): step_async(mark), then its result."""
        pending = self.step_async(mark)
        self.backend.synchronize()
        return pending.result()

    def step_async(self, mark=None) -> "PendingStep":
        """One optimization step, queued: grad_accum micro-steps, reduction, clipping, the update (unless
        skipped), and the parameters gathered on every rank. Nothing waits for the device unless an outlier
        rule (skip_loss_z, skip_norm_z) must read the loss and norm before the update: the clip and the skip of
        a non-finite step are decided on the device. Queue the next step before reading this one's result()
        and the device runs them back to back, the host's reads, logging and next batch overlapping its work.
        mark(phase), when given, is called as each phase is queued -- "start", "backward" (the micro-steps
        are queued; gradients complete once they run), "reduced", "updated" -- for a benchmark's CUDA events
        or a test's look at the gradients."""
        c, backend, model, opt = self.config, self.backend, self.model, self.optimizer
        mark = mark or (lambda phase: None)
        step = self.step_count
        if step >= c.max_steps:
            raise ValueError(f"the schedule has {c.max_steps} steps, all done")
        t0 = time.time()
        mark("start")
        micro_losses = []
        for micro in range(c.grad_accum):
            staged, self._prefetched = self._prefetched or self._next_batch(), None
            batch = backend.upload_batch(staged)
            last = micro == c.grad_accum - 1
            if self._overlap and last:  # eager: the collectives start from inside the backward
                model.forward(batch, dloss=self._dloss)
                model.backward(batch, layer_done=opt.layer_done)
            else:
                self._micro_step(batch)
            micro_losses.append(backend.mean_loss_async(model.acts["losses"]))
            if last:  # a checkpoint after this step resumes from here, before the read-ahead below
                self._loader_state = self.loader.state_dict()
            self._prefetched = self._next_batch()
        mark("backward")
        loss_sum = backend.loss_sum(micro_losses)  # this rank's, then every rank's: on the device, no wait
        self.comm.all_reduce(loss_sum, op="sum")
        norm = opt.reduce_gradients()
        mark("reduced")
        lr = self.lr(step)
        pending = PendingStep(self, step + 1, lr, t0)
        host_rules = bool(c.skip_loss_z or c.skip_norm_z)
        skip = False  # without the outlier rules the update skips itself on the device (a non-finite norm or loss)
        if host_rules:  # they decide on the host: read both first
            pending.read = backend.read_scalars_async(loss_sum, norm.squared)
            self._unread.append(pending)
            skip = pending.result().skipped
        if skip:
            opt.gather_params()
        else:
            opt.step(lr, step + 1, norm, seed=c.seed + step, loss=loss_sum)
        mark("updated")
        model.zero_grad()
        if not host_rules:  # copied out behind the whole step (the next reduction reuses the norm's buffer)
            pending.read = backend.read_scalars_async(loss_sum, norm.squared)
            self._unread.append(pending)
        self.step_count = step + 1
        return pending

    def _read_through(self, pending: "PendingStep") -> StepResult:
        """Reads the unread steps up to `pending` in order (the outlier detectors see every step, in order):
        each one's mean loss and gradient norm, and whether its update is (or was, on the device) skipped --
        an outlier rule, or a non-finite value."""
        c = self.config
        while pending.result_ is None:
            p = self._unread.pop(0)
            loss_total, norm_squared = p.read.values()
            loss = loss_total / (c.grad_accum * self.comm.world_size)
            norm = norm_from_squared(norm_squared)
            loss_z, norm_z = self._loss_outliers.update(loss), self._norm_outliers.update(norm)
            skip = ((c.skip_loss_z and loss_z > c.skip_loss_z) or (c.skip_norm_z and norm_z > c.skip_norm_z)
                    or not math.isfinite(loss) or not math.isfinite(norm))
            now = time.time()  # a step's time: from its start, or from the previous step's end if it queued earlier
            p.result_ = StepResult(p.step, loss, norm, p.lr, bool(skip), now - max(p.t0, self._last_read),
                                   self.tokens_per_step)
            self._last_read = now
        return pending.result_

    # ---- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, val_loader, max_batches: int) -> float:
        """Mean loss over the first max_batches batches of val_loader (-1: all), averaged over ranks."""
        from .eval import evaluate_val_loss
        return evaluate_val_loss(self.model, self.backend, val_loader, max_batches, self.comm)

    def flops_per_token(self) -> int:
        return flops_per_token(self.cfg, self.config.seq_len)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, out_dir: str):
        """llm.c's checkpoint of the steps done: rank 0 writes the model file, every rank its optimizer
        state and the train loader's position. Every rank must call it."""
        backend, comm = self.backend, self.comm
        arrays = {name: backend.to_numpy(a) for name, a in self.optimizer.state_arrays().items()}
        state = checkpoint.TrainingState(self.config.zero_stage, arrays, {"train_loader": self._loader_state})
        params = self.model.host_params()  # every rank: a collective under ZeRO-3
        checkpoint.save_checkpoint(
            out_dir, self.step_count, comm.rank, comm.world_size,
            lambda path: checkpoint.write_model(path, self.cfg, params, dtype=backend.checkpoint_dtype),
            state, comm.barrier)

    def resume(self, out_dir: str) -> int | None:
        """Loads the newest checkpoint in out_dir that every rank can use; returns its step, or None when
        there is none. Each newer, unusable one is reported with the reason (no DONE marker, a truncated
        or corrupt file, another model shape) before an older one is tried, so a damaged checkpoint never
        goes unnoticed. The ranks agree on every step (one collective per step tried)."""
        comm = self.comm

        def say(step, problem):
            print(f"-y 1: skipping the checkpoint of step {step}"
                  + (f" (rank {comm.rank})" if comm.world_size > 1 else "") + f": {problem}", flush=True)
        found = checkpoint.newest_usable(
            out_dir, comm, self.config.zero_stage,
            lambda cfg, state: None if cfg == self.cfg else f"its model {cfg} is not the run's {self.cfg}", say)
        if found is None:
            return None
        step, state, _, params = found
        self.model.load_params(params)
        self.optimizer.load_state(state.arrays)
        self.loader.load_state_dict(state.extra["train_loader"])
        self._loader_state, self._prefetched = state.extra["train_loader"], None
        self.step_count = step
        return step
