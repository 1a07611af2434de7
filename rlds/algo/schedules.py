"""Learning-rate schedules, by name: the multiplier of the base learning rate at a step.

Each is `factor(progress)` for progress in [0, 1] after a linear warm-up; RL counts steps in
iterations, pretraining in optimizer steps, and both use `lr_factor`.
"""
from __future__ import annotations

import math
from typing import Callable

LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: max(0.0, 1.0 - progress),
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The multiplier at `step` (0-based) of `total`: (step + 1) / warmup during the warm-up, then
    the schedule over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return LR_SCHEDULES[schedule](progress)


def check_schedule(schedule: str, key: str, fail) -> None:
    if schedule not in LR_SCHEDULES:
        fail(key, f"{schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
