"""Advantage-weighted matching (AWM, Xue et al., arXiv 2509.25050), for rlds' epsilon (or v) models.

DDPO's per-step log-likelihood is score matching with noisy targets (x_{t-1} in place of x_0); AWM
keeps the pretraining loss on the clean sample instead. A sample's log-likelihood is stood in for by
minus its denoising loss at a noise level, log pi(x_0) ~ -|f_theta(x_t, t) - target|^2, and trained
with the paper's clipped surrogate max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) on it, the ratio
against the weights at the start of the update (so it is exactly 1 in the first optimizer step, and
the clip bounds how far later steps of the same iteration move a sample's likelihood).
"""
from __future__ import annotations

import torch

from rlds.algo.loss import clipped_policy_loss
from rlds.algo.matching import check_timesteps, forward_update, kl_to_reference, per_sample_mean, snapshot
from rlds.algo.objectives import Objective


class AWM(Objective):
    needs_chain = False
    summary = "advantage-weighted matching: the clipped surrogate on the denoising loss of x_0"

    def __init__(self, unet, algo):
        super().__init__(unet, algo)
        self.reference = snapshot(unet) if algo.kl_beta > 0 else None

    @staticmethod
    def check(algo, sampling, fail) -> None:
        check_timesteps(algo, fail)

    def update(self, policy, trajectories, advantages, optimizer, rng, no_sync=None, dtype=torch.float32,
               groups=None):
        # the weights later optimizer steps take the ratio against (the first step's ratio is 1)
        multi = (self.algo.optimizer_steps or self.algo.timesteps_per_iteration) > 1
        self.start = snapshot(policy.unet) if multi else None
        return forward_update(policy, trajectories, advantages, optimizer, self.algo, rng, no_sync, dtype,
                              self._term, groups)

    def _term(self, policy, output, predict_with, x_t, x0, t, target, a, fresh):
        log_prob = -per_sample_mean((output - target) ** 2)
        if fresh:  # the weights are still the update's start: the ratio is 1
            old = log_prob.detach()
        else:
            old = -per_sample_mean((predict_with(self.start) - target) ** 2)
        loss, stats = clipped_policy_loss(log_prob, old, a, self.algo.clip_range)
        reference = predict_with(self.reference) if self.reference is not None else None
        kl = kl_to_reference(output, reference)
        stats["kl"] = kl.mean().item()
        stats["denoising_loss"] = -log_prob.mean().item()
        return loss + self.algo.kl_beta * kl.mean(), stats
