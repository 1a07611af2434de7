"""Objectives by name: what `algo.objective` may say, and how each one updates the policy.

An objective is made once per learner (`Objective(unet, algo)`; it may keep state, such as an old
policy) and then called once per task and iteration (`update`), and once more at the end of each
iteration (`end_iteration`). `needs_chain` tells the samplers whether to keep the denoising chain
and its log-probs (PPO trains on them) or only x_0 (the forward-process objectives), so that the
object store and the learners move only what is trained on.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from rlds.config import AlgoConfig, SamplingConfig


class Objective:
    needs_chain = True
    summary = ""

    def __init__(self, unet: torch.nn.Module, algo: AlgoConfig):
        self.algo = algo

    @staticmethod
    def check(algo: AlgoConfig, sampling: SamplingConfig, fail) -> None:
        """The config keys this objective reads."""

    def update(self, policy, trajectories: Sequence, advantages: Sequence[np.ndarray],
               optimizer: torch.optim.Optimizer, rng: np.random.Generator,
               no_sync: Optional[Callable] = None, dtype: torch.dtype = torch.float32,
               groups: Optional[Sequence[np.ndarray]] = None) -> dict[str, float]:
        """One task's optimizer steps; `groups`: per trajectory batch, [B] ids of the images that share a prompt."""
        raise NotImplementedError

    def end_iteration(self, unet: torch.nn.Module) -> dict[str, float]:
        """After every task's update of an iteration; returns figures to log."""
        return {}


class PPO(Objective):
    summary = "the paper's clipped surrogate on per-step log-probs of the stored chain"

    def __init__(self, unet, algo):
        from rlds.algo.matching import snapshot

        super().__init__(unet, algo)
        self.reference = snapshot(unet) if algo.kl_beta > 0 else None

    @staticmethod
    def check(algo, sampling, fail) -> None:
        from rlds.algo.ppo import check_ppo

        check_ppo(algo, sampling, fail)

    def update(self, policy, trajectories, advantages, optimizer, rng, no_sync=None, dtype=torch.float32, groups=None):
        from rlds.algo.ppo import ppo_update

        return ppo_update(policy, trajectories, advantages, optimizer, self.algo, rng, no_sync, dtype, self.reference)


def _nft():
    from rlds.algo.nft import NFT
    return NFT


def _awm():
    from rlds.algo.awm import AWM
    return AWM


# name -> the objective's class (imported when named, so the registry is light to import)
OBJECTIVES: dict[str, Callable[[], type]] = {"ppo": lambda: PPO, "nft": _nft, "awm": _awm}


def objective_class(name: str) -> type:
    return OBJECTIVES[name]()


def check_objective(algo: AlgoConfig, sampling: SamplingConfig, fail) -> None:
    if algo.objective not in OBJECTIVES:
        fail("algo.objective", f"{algo.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if algo.kl_beta < 0:
        fail("algo.kl_beta", "must be 0 (off) or more")
    objective_class(algo.objective).check(algo, sampling, fail)
