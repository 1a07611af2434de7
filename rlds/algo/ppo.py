"""The paper's objective: the clipped surrogate on K random denoising steps, one optimizer step each."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from rlds.algo.loss import clipped_policy_loss
from rlds.config import AlgoConfig, SamplingConfig
from rlds.policy.pipeline import Policy
from rlds.policy.sampling import Trajectory, step_log_prob_and_kl
from rlds.stats import reduce_metrics


def make_optimizer(params, cfg: AlgoConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def trainable_steps(num_steps: int, noisiest_fraction: float) -> int:
    """How many of the chain's first (noisiest) denoising steps may be trained."""
    return max(1, int(round(num_steps * noisiest_fraction)))


def choose_steps(candidates, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct steps among `candidates` (step indices; a count n means the first n) for each of
    `count` trajectory batches, [count, K]. Generator.choice draws the same from n as from arange(n)."""
    return np.stack([rng.choice(candidates, size=k, replace=False) for _ in range(count)])


def trainable_step_indices(step_etas: np.ndarray, noisiest_fraction: float) -> np.ndarray:
    """The steps PPO may train: stochastic (eta > 0) and among the chain's noisiest fraction."""
    window = trainable_steps(len(step_etas), noisiest_fraction)
    return np.flatnonzero(np.asarray(step_etas[:window]) > 0)


def check_ppo(algo: AlgoConfig, sampling: SamplingConfig, fail) -> None:
    if sampling.eta <= 0:
        fail("sampling.eta", "must be above 0 for algo.objective ppo: its policy is the stochastic DDIM step")
    if algo.caption_dropout:
        fail("algo.caption_dropout", "is for nft and awm: ppo trains each stored chain's log-prob under its own prompt")
    if algo.guided_noisiest_fraction is not None:
        fail("algo.guided_noisiest_fraction", "is for nft and awm: ppo's trained steps are algo.noisiest_fraction's")
    if algo.group_shared_noise:
        fail("algo.group_shared_noise", "is for nft and awm: ppo trains the stored chain's own noise")
    from rlds.policy.sampling import step_etas

    window = len(trainable_step_indices(step_etas(sampling), algo.noisiest_fraction))
    if not 1 <= algo.timesteps_per_iteration <= window:
        fail("algo.timesteps_per_iteration", f"must be between 1 and the {window} trainable steps (the "
             f"stochastic ones among sampling.num_steps {sampling.num_steps} x algo.noisiest_fraction "
             f"{algo.noisiest_fraction})")
    k, steps = algo.timesteps_per_iteration, algo.optimizer_steps
    if steps is not None and (steps < 1 or k % steps):
        fail("algo.optimizer_steps", f"{steps} must divide algo.timesteps_per_iteration ({k}): each "
             "optimizer step trains the same number of denoising steps")


def ppo_update(policy: Policy, trajectories: Sequence[Trajectory], advantages: Sequence[np.ndarray],
               optimizer: torch.optim.Optimizer, cfg: AlgoConfig, rng: np.random.Generator,
               no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
               dtype: torch.dtype = torch.float32, reference: Optional[dict] = None) -> dict[str, float]:
    """One update on N trajectory batches; returns the step statistics, reduced (rlds.stats).

    Shapes: each trajectory batch holds B chains of T denoising steps (`Trajectory`: latents
    [B, T+1, C, H, W], log_probs [B, T]); its advantages are [B] float32. K =
    `cfg.timesteps_per_iteration` distinct steps are drawn per trajectory batch among the first
    `trainable_steps(T, cfg.noisiest_fraction)`, and trained in `cfg.optimizer_steps` optimizer steps
    (default K: one denoising step each). Fewer optimizer steps accumulate several denoising steps'
    gradients into each, which averages out more of the noise of a small batch before AdamW, whose
    step size does not shrink with the gradient, takes a step. `no_sync` (DDP's) skips the gradient
    all-reduce on all but the last backward of a step. Each trajectory batch is one micro-batch of B,
    in the sampler's own layout, so the first ratio is exactly 1. With `reference` (values of the
    trainable parameters) each term adds cfg.kl_beta x the step's closed-form KL to that policy.
    """
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    k_total = cfg.timesteps_per_iteration
    candidates = trainable_step_indices(trajectories[0].step_etas, cfg.noisiest_fraction)
    steps = choose_steps(candidates, k_total, len(trajectories), rng)  # [N, K]
    per_step = k_total // (cfg.optimizer_steps or k_total)  # denoising steps per optimizer step
    term_stats, step_stats = [], []
    for first in range(0, k_total, per_step):
        optimizer.zero_grad(set_to_none=True)
        terms = [(i, k) for k in range(first, first + per_step) for i in range(len(trajectories))]
        for count, (i, k) in enumerate(terms):
            last = count == len(terms) - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                j = int(steps[i, k])
                logp, kl = step_log_prob_and_kl(policy, trajectories[i], j, dtype, reference)  # [B], [B]
                old = torch.tensor(trajectories[i].log_probs[:, j], device=logp.device)
                a = torch.tensor(advantages[i], device=logp.device, dtype=torch.float32)
                loss, stats = clipped_policy_loss(logp, old, a, cfg.clip_range)
                if kl is not None:
                    loss = loss + cfg.kl_beta * kl.mean()
                    stats["kl"] = kl.mean().item()
                (loss / len(terms)).backward()
            term_stats.append(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        step_stats.append({"grad_norm": float(grad_norm)})
        optimizer.step()
    # every optimizer step has as many terms, so the mean over steps is the mean over terms
    return {**reduce_metrics(term_stats), **reduce_metrics(step_stats)}
