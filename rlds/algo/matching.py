"""The forward (noising) process on the policy's own clean samples: what the forward-process
objectives (`nft`, `awm`) share.

They train the denoising (score-matching) loss of pretraining on x_0 that the policy drew itself,
weighted by reward, so they need only x_0, the prompt embeddings and the advantages: no stored
chain, no behaviour log-probs, any sampler. Their old and reference policies are the same UNet
with other values of the trainable parameters (`rlds.policy.pipeline.WithParams`),
so LoRA and full fine-tuning work alike and no second model is built.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from rlds.policy.pipeline import trainable_parameters


def draw_timesteps(num_train_timesteps: int, noisiest_fraction: float, k: int, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """K training timesteps for each of `count` samples, [count, K] int64, stratified: stratum j of K
    covers an equal slice of the noisiest `noisiest_fraction` of [0, num_train_timesteps), so every
    sample is trained across the whole window and not at K clustered noise levels."""
    low = int(round(num_train_timesteps * (1 - noisiest_fraction)))
    edges = np.linspace(low, num_train_timesteps, k + 1)
    u = rng.random((count, k))
    t = np.floor(edges[:-1] + u * (edges[1:] - edges[:-1])).astype(np.int64)
    return np.clip(t, low, num_train_timesteps - 1)


def unwrap(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet itself, inside DDP or not."""
    return getattr(unet, "module", unet)


def snapshot(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters: an old or reference policy."""
    return {n: p.detach().clone() for n, p in trainable_parameters(unwrap(unet))}


def predicted_x0(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_0 as the model's output (epsilon, or v) predicts it at x_t, timesteps t [B]."""
    alpha_prod_t = scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, *([1] * (x_t.ndim - 1)))
    beta_prod_t = 1 - alpha_prod_t
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_prod_t.sqrt() * x_t - beta_prod_t.sqrt() * model_output
    return (x_t - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()


def noised(scheduler, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, noise): the forward process q(x_t | x_0) at timesteps t [B]."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return scheduler.add_noise(x0, noise, t), noise


def matching_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model's output should be: the noise, or v for v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def clean_inputs(traj, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 [B, C, H, W] and the prompt embeddings [B, L, D] of a trajectory batch (copies: the
    object store's arrays are read-only)."""
    return (torch.tensor(traj.latents[:, -1], device=device), torch.tensor(traj.prompt_embeds, device=device))


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def kl_to_reference(output: torch.Tensor, reference: Optional[torch.Tensor]) -> torch.Tensor:
    """The matching form of the KL to the reference policy: the mean squared difference of the two
    outputs at the same x_t (per sample, [B]); zero without a reference."""
    if reference is None:
        return torch.zeros(output.shape[0], device=output.device)
    return per_sample_mean((output - reference) ** 2)
