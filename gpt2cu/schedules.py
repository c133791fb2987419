"""llm.c's learning-rate schedules (llmc/schedulers.h) as a function of the step."""
from __future__ import annotations

import math

LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")


def get_lr(kind: str, step: int, max_steps: int, lr: float, warmup: int, final_frac: float) -> float:
    """The learning rate of 0-based `step` out of `max_steps`, as llm.c's get_learning_rate.

    Every schedule but "constant" warms up linearly over the first `warmup` steps (lr*(step+1)/warmup),
    then decays towards lr*final_frac: "cosine" with half a cosine and "linear" linearly over the steps
    after the warmup; "wsd" holds lr until 80% of max_steps and then decays with 1 - sqrt(progress).
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= step <= max_steps:
        raise ValueError(f"step {step} is outside [0, max_steps={max_steps}]")
    if kind == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if kind == "wsd":
        # llm.c: (int)(0.8f * N); the integer form differs only past ~1.7e7 steps (float32 rounding)
        decay_point = 4 * max_steps // 5
        if step < decay_point:
            return lr
        return min_lr + (1.0 - math.sqrt(_progress(step, decay_point, max_steps))) * (lr - min_lr)
    progress = _progress(step, warmup, max_steps)
    if kind == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    return lr - progress * (lr - min_lr)  # linear


def _progress(step: int, start: int, end: int) -> float:
    # a decay phase of zero length (warmup >= max_steps) counts as finished
    return (step - start) / (end - start) if end > start else 1.0
