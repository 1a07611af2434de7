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


def trainable_steps(num_steps: int, noisiest_fraction: float) -> int:
    """How many of the chain's first (noisiest) denoising steps may be trained."""
    return max(1, int(round(num_steps * noisiest_fraction)))


def choose_steps(num_steps: int, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct steps among the first `num_steps` for each of `count` trajectory batches, [count, K]."""
    return np.stack([rng.choice(num_steps, size=k, replace=False) for _ in range(count)])


def ppo_update(policy: Policy, trajectories: Sequence[Trajectory], advantages: Sequence[np.ndarray],
               optimizer: torch.optim.Optimizer, cfg: AlgoConfig, rng: np.random.Generator,
               no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
               dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """K denoising steps per trajectory batch, in `cfg.optimizer_steps` optimizer steps; returns the
    mean of the step statistics.

    With optimizer_steps = K (the default) each optimizer step trains one denoising step; fewer steps
    accumulate several denoising steps' gradients into each, which averages out more of the noise of a
    small batch before AdamW, whose step size does not shrink with the gradient, takes a step.
    `no_sync` (DDP's) skips the gradient all-reduce on all but the last backward of a step.
    Each trajectory batch is one micro-batch, in the sampler's own layout, so the first ratio is 1.
    """
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    k_total = cfg.timesteps_per_iteration
    window = trainable_steps(len(trajectories[0].timesteps), cfg.noisiest_fraction)
    steps = choose_steps(window, k_total, len(trajectories), rng)
    sums: dict[str, float] = defaultdict(float)
    n = len(trajectories)
    per_step = k_total // (cfg.optimizer_steps or k_total)  # denoising steps per optimizer step
    ratio_min, ratio_max = math.inf, -math.inf
    for first in range(0, k_total, per_step):
        optimizer.zero_grad(set_to_none=True)
        terms = [(i, k) for k in range(first, first + per_step) for i in range(n)]
        for count, (i, k) in enumerate(terms):
            traj, adv = trajectories[i], advantages[i]
            last = count == len(terms) - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                j = int(steps[i, k])
                logp = step_log_prob(policy, traj, j, dtype)
                old = torch.tensor(traj.log_probs[:, j], device=logp.device)
                a = torch.tensor(adv, device=logp.device, dtype=torch.float32)
                loss, stats = clipped_policy_loss(logp, old, a, cfg.clip_range)
                (loss / len(terms)).backward()
            ratio_min = min(ratio_min, stats.pop("ratio/min"))
            ratio_max = max(ratio_max, stats.pop("ratio/max"))
            for key, v in stats.items():
                sums[key] += v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        sums["grad_norm"] += float(grad_norm) * len(terms)
        optimizer.step()
    count = n * k_total
    out = {key: v / count for key, v in sums.items()}
    out.update({"ratio/min": ratio_min, "ratio/max": ratio_max})
    out["steps"] = steps.tolist()  # which denoising steps were trained, per trajectory batch
    return out
