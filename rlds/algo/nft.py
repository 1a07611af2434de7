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

import torch

from rlds.algo.matching import (check_timesteps, forward_update, kl_to_reference, per_sample_mean, predicted_x0,
                                snapshot, unwrap)
from rlds.algo.objectives import Objective
from rlds.policy.pipeline import trainable_parameters


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
        # True while the old policy's values are the current ones (at the start, and after a soft
        # update with eta = 0): its output is then the current output, and its forward pass is skipped
        self.old_is_current = True
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

    def update(self, policy, trajectories, advantages, optimizer, rng, no_sync=None, dtype=torch.float32,
               groups=None):
        stats = forward_update(policy, trajectories, advantages, optimizer, self.algo, rng, no_sync, dtype,
                               self._term, groups)
        self.old_is_current = False
        return stats

    def _term(self, policy, output, predict_with, x_t, x0, t, target, a, fresh):
        algo = self.algo
        old = output.detach() if fresh and self.old_is_current else predict_with(self.old)
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
        self.old_is_current = eta == 0
        self.iterations += 1
        return {"old_policy_decay": eta}
