"""One policy update: K random denoising steps, one optimizer step each (the paper's loop)."""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from rlds.algo.loss import clipped_policy_loss
from rlds.config import AlgoConfig
from rlds.policy.pipeline import Policy
from rlds.policy.sampling import Trajectory, step_log_prob


def make_optimizer(params, cfg: AlgoConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at `step` of `total`: linear warm-up, then constant, linear or cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def lr_factor(cfg: AlgoConfig, iteration: int, total_iterations: int) -> float:
    return schedule_factor(cfg.lr_schedule, iteration, total_iterations, cfg.warmup_iterations)


def choose_steps(num_steps: int, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct denoising steps for each of `count` trajectory batches, shape [count, K]."""
    return np.stack([rng.choice(num_steps, size=k, replace=False) for _ in range(count)])


def ppo_update(policy: Policy, trajectories: Sequence[Trajectory], advantages: Sequence[np.ndarray],
               optimizer: torch.optim.Optimizer, cfg: AlgoConfig, rng: np.random.Generator,
               no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
               dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """K optimizer steps on this worker's trajectories; returns the mean of the step statistics.

    `no_sync` (DDP's) skips the gradient all-reduce on all but the last micro-batch of a step.
    Each trajectory batch is one micro-batch, in the sampler's own layout, so the first ratio is 1.
    """
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    steps = choose_steps(len(trajectories[0].timesteps), cfg.timesteps_per_iteration, len(trajectories), rng)
    sums: dict[str, float] = defaultdict(float)
    n = len(trajectories)
    ratio_min, ratio_max = math.inf, -math.inf
    for k in range(cfg.timesteps_per_iteration):
        optimizer.zero_grad(set_to_none=True)
        for i, (traj, adv) in enumerate(zip(trajectories, advantages)):
            last = i == n - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                j = int(steps[i, k])
                logp = step_log_prob(policy, traj, j, dtype)
                old = torch.tensor(traj.log_probs[:, j], device=logp.device)
                a = torch.tensor(adv, device=logp.device, dtype=torch.float32)
                loss, stats = clipped_policy_loss(logp, old, a, cfg.clip_range)
                (loss / n).backward()
            ratio_min = min(ratio_min, stats.pop("ratio/min"))
            ratio_max = max(ratio_max, stats.pop("ratio/max"))
            for key, v in stats.items():
                sums[key] += v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        sums["grad_norm"] += float(grad_norm) * n
        optimizer.step()
    count = n * cfg.timesteps_per_iteration
    out = {key: v / count for key, v in sums.items()}
    out.update({"ratio/min": ratio_min, "ratio/max": ratio_max})
    out["steps"] = steps.tolist()  # which denoising steps were trained, per trajectory batch
    return out
