"""The paper's clipped surrogate, per denoising step."""
from __future__ import annotations

import torch


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = exp(logp - logp_old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        diff = log_prob - old_log_prob
        stats = {
            "loss": loss.item(),
            "clipfrac": (torch.abs(ratio - 1.0) > clip_range).float().mean().item(),
            "approx_kl": (0.5 * diff.pow(2)).mean().item(),
            "ratio/mean": ratio.mean().item(),
            "ratio/min": ratio.min().item(),
            "ratio/max": ratio.max().item(),
        }
    return loss, stats
