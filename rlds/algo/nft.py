"""Negative-aware fine-tuning on the forward process (DiffusionNFT, Zheng et al., arXiv 2509.16117),
for rlds' epsilon (or v) prediction models.

With the current output f_theta and an old policy's f_old at the same x_t, the implicit positive
and negative policies are
    f+ = beta f_theta + (1 - beta) f_old,        f- = (1 + beta) f_old - beta f_theta,
and each sample x_0 with optimality r in [0, 1] (its clipped advantage mapped to [0, 1]) is trained
with r * L(f+) + (1 - r) * L(f-), L the pretraining loss, here on the predicted x_0 and divided by
its own mean absolute error (the paper's adaptive weight). Written out with d = f_theta - f_old and
e = f_old - target, the loss is beta |d|^2 + 2 (2r - 1) d.e + |e|^2 / beta: at the old policy its
gradient is the advantage-weighted denoising loss's, and the beta |d|^2 term keeps each update in a
trust region around the old policy (its minimum is d = -(2r - 1) e / beta, a bounded step towards
the noise for good samples and away from it for bad ones). The old policy is a soft-updated copy:
old <- eta_i old + (1 - eta_i) theta after iteration i, eta_i = min(rate * i, max).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from dataclasses import replace

from rlds.algo.matching import (clean_inputs, draw_timesteps, kl_to_reference, matching_target, noised,
                                per_sample_mean, predicted_x0, snapshot, unwrap)
from rlds.algo.objectives import Objective
from rlds.policy.pipeline import WithParams, trainable_parameters
from rlds.policy.sampling import autocast, guided_noise
from rlds.stats import reduce_metrics


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """r in [0, 1]: 1/2 for an average sample, 0 and 1 at -clip and +clip."""
    return (advantages.clamp(-clip, clip) / clip + 1) / 2


def adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error of x_0 divided by its (detached) mean absolute error, [B]."""
    error = x0_pred - x0
    scale = per_sample_mean(error.detach().abs()).clamp(min=1e-5)
    return per_sample_mean(error**2) / scale


def nft_loss(output: torch.Tensor, old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, scheduler) -> torch.Tensor:
    """The per-sample NFT loss [B] (module docstring); `old` carries no gradient."""
    positive = beta * output + (1 - beta) * old
    negative = (1 + beta) * old - beta * output
    loss_pos = adaptive_x0_loss(predicted_x0(scheduler, positive, x_t, t), x0)
    loss_neg = adaptive_x0_loss(predicted_x0(scheduler, negative, x_t, t), x0)
    return (r * loss_pos + (1 - r) * loss_neg) / beta


class NFT(Objective):
    needs_chain = False
    summary = "DiffusionNFT: positive and negative implicit policies around a soft-updated old policy"

    def __init__(self, unet, algo):
        super().__init__(unet, algo)
        self.old = snapshot(unet)
        self.reference = snapshot(unet) if algo.kl_beta > 0 else None
        self.iterations = 0

    @staticmethod
    def check(algo, sampling, fail) -> None:
        if algo.nft_beta <= 0:
            fail("algo.nft_beta", "must be above 0")
        if not 0 <= algo.old_policy_decay_max < 1:
            fail("algo.old_policy_decay_max", "must be in [0, 1): 0 keeps the old policy equal to the current one")
        if algo.old_policy_decay_rate < 0:
            fail("algo.old_policy_decay_rate", "must be 0 or more")
        check_timesteps(algo, fail)

    def update(self, policy, trajectories, advantages, optimizer, rng, no_sync=None, dtype=torch.float32):
        return forward_update(policy, trajectories, advantages, optimizer, self.algo, rng, no_sync, dtype,
                              self._term)

    def _term(self, policy, output, predict_with, x_t, x0, t, target, a, fresh):
        algo = self.algo
        old = predict_with(self.old)
        loss = nft_loss(output, old, x_t, x0, t, optimality(a, algo.advantage_clip), algo.nft_beta, policy.scheduler)
        reference = predict_with(self.reference) if self.reference is not None else None
        kl = kl_to_reference(output, reference)
        stats = {"loss": loss.mean().item(), "kl": kl.mean().item(),
                 "old_deviation": per_sample_mean((output.detach() - old) ** 2).mean().item()}
        return loss.mean() + algo.kl_beta * kl.mean(), stats

    def end_iteration(self, unet) -> dict[str, float]:
        """old <- eta old + (1 - eta) theta, eta = min(rate * i, max) after iteration i (0-based)."""
        a = self.algo
        eta = min(a.old_policy_decay_rate * self.iterations, a.old_policy_decay_max)
        with torch.no_grad():
            for name, p in trainable_parameters(unwrap(unet)):
                self.old[name].mul_(eta).add_(p.detach(), alpha=1 - eta)
        self.iterations += 1
        return {"old_policy_decay": eta}


def check_timesteps(algo, fail) -> None:
    k, steps = algo.timesteps_per_iteration, algo.optimizer_steps
    if k < 1:
        fail("algo.timesteps_per_iteration", "must be at least 1 (noise levels trained per sample)")
    if steps is not None and (steps < 1 or k % steps):
        fail("algo.optimizer_steps", f"{steps} must divide algo.timesteps_per_iteration ({k})")


def forward_update(policy, trajectories, advantages, optimizer, algo, rng, no_sync, dtype,
                   term) -> dict[str, float]:
    """The update loop the forward-process objectives share: K stratified noise levels per sample
    (`draw_timesteps`), each a fresh x_t of the sample's own x_0, trained in `algo.optimizer_steps`
    optimizer steps; `term(policy, output, predict_with, x_t, x0, t, target, advantages, fresh)` gives a
    term's loss and figures: `predict_with(params)` is the same output with other values of the
    trainable parameters (an old or reference policy, no gradient), `fresh` says the term is in the
    first optimizer step, while the weights are the update's start. The output is the conditional
    one, or with algo.guided_training the guided one at the sampler's guidance scale.
    Shapes: x_0 [B, C, H, W] per trajectory batch, advantages [B]."""
    scheduler = policy.scheduler
    device = next(unwrap(policy.unet).parameters()).device
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    k_total = algo.timesteps_per_iteration
    per_step = k_total // (algo.optimizer_steps or k_total)
    T = scheduler.config.num_train_timesteps
    steps = [draw_timesteps(T, algo.noisiest_fraction, k_total, len(traj), rng) for traj in trajectories]
    generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
    term_stats, step_stats = [], []
    for first in range(0, k_total, per_step):
        optimizer.zero_grad(set_to_none=True)
        terms = [(i, k) for k in range(first, first + per_step) for i in range(len(trajectories))]
        for count, (i, k) in enumerate(terms):
            ctx = no_sync() if (no_sync is not None and count < len(terms) - 1) else contextlib.nullcontext()
            with ctx:
                traj = trajectories[i]
                x0, cond = clean_inputs(traj, device)
                uncond = torch.tensor(traj.negative_embeds, device=device)
                scale = traj.guidance_scale if algo.guided_training else 1.0
                t = torch.as_tensor(steps[i][:, k], device=device)
                x_t, noise = noised(scheduler, x0, t, generator)

                def predict(unet, x_t=x_t, t=t, cond=cond, uncond=uncond, scale=scale):
                    with autocast(policy, dtype):
                        return guided_noise(replace(policy, unet=unet), x_t, t, cond, uncond, scale)

                output = predict(policy.unet)
                a = torch.tensor(np.asarray(advantages[i]), device=device, dtype=torch.float32)
                target = matching_target(scheduler, x0, noise, t)
                loss, stats = term(policy, output, lambda params, p=predict: p(WithParams(policy.unet, params)),
                                   x_t, x0, t, target, a, first == 0)
                (loss / len(terms)).backward()
            term_stats.append(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, algo.max_grad_norm)
        step_stats.append({"grad_norm": float(grad_norm)})
        optimizer.step()
    return {**reduce_metrics(term_stats), **reduce_metrics(step_stats)}
