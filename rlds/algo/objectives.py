"""Objectives by name: what `algo.objective` may say, and how each one updates the policy.

An objective is a pure function of the policy, the trajectory batches, their advantages and an
optimizer (`update`, with ppo_update's signature), with a check of the config keys it reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rlds.algo.ppo import check_ppo, ppo_update


@dataclass(frozen=True)
class Objective:
    update: Callable[..., dict]  # (policy, trajectories, advantages, optimizer, algo, rng, no_sync, dtype)
    check: Callable  # (AlgoConfig, SamplingConfig, fail) -> None
    summary: str


OBJECTIVES: dict[str, Objective] = {
    "ppo": Objective(ppo_update, check_ppo, "the paper's clipped surrogate on per-step log-probs"),
}


def check_objective(algo, sampling, fail) -> None:
    if algo.objective not in OBJECTIVES:
        fail("algo.objective", f"{algo.objective!r} is not one of {', '.join(OBJECTIVES)}")
    OBJECTIVES[algo.objective].check(algo, sampling, fail)
