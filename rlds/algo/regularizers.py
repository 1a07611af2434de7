"""L_pre: the paper's pretraining loss, taken as its own gradient step after the RL steps.

Plain noise-prediction MSE on a held image-caption set; it anchors the policy to the data it was
trained on and keeps reward hacking down.
"""
from __future__ import annotations

import numpy as np
import torch

from rlds.policy.pipeline import Policy
from rlds.policy.sampling import encode_prompts


def pretraining_loss(policy: Policy, images: np.ndarray, captions: list[str],
                     generator: torch.Generator, text_grad: bool = False,
                     noise_range: tuple[float, float] = (0.0, 1.0), caption_dropout: float = 0.0) -> torch.Tensor:
    """DDPM loss on uint8 images [B, H, W, 3] with their captions (epsilon or v target).

    The noising process is the sampler's own scheduler's; `text_grad` trains the text encoder too
    (pretraining from scratch; in RL it stays frozen). Timesteps are uniform over `noise_range`,
    [start, end) as fractions of the schedule from its clean end: (0, 1) is the whole of it.
    `caption_dropout` replaces that share of the captions by "", so that the unconditional branch,
    which classifier-free guidance subtracts at sampling, is held to the data too (drawn after the
    noise and timesteps: the rest of the batch sees the same ones at any dropout)."""
    device = policy.device
    x0 = torch.tensor(images, device=device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if policy.vae is not None:
        with torch.no_grad():
            dist = policy.vae.encode(x0.to(policy.vae.dtype)).latent_dist
            x0 = dist.sample(generator).float() * policy.vae.config.scaling_factor
    sched = policy.scheduler
    noise = torch.randn(x0.shape, generator=generator, device=device)
    n = sched.config.num_train_timesteps
    start = min(round(noise_range[0] * n), n - 1)
    t = torch.randint(start, max(start + 1, round(noise_range[1] * n)), (x0.shape[0],), generator=generator,
                      device=device)
    x_t = sched.add_noise(x0, noise, t)
    if caption_dropout > 0:
        drop = torch.rand(len(captions), generator=generator, device=device) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    cond = encode_prompts(policy, captions, grad=text_grad)
    pred = policy.unet(x_t, t, encoder_hidden_states=cond).sample.float()
    target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    return torch.nn.functional.mse_loss(pred, target)


def pretrain_step(policy: Policy, optimizer: torch.optim.Optimizer, images: np.ndarray, captions: list[str],
                  beta: float, max_grad_norm: float, generator: torch.Generator,
                  noise_range: tuple[float, float] = (0.0, 1.0), caption_dropout: float = 0.0) -> dict[str, float]:
    """One optimizer step on beta * L_pre; returns L_pre and the norm of beta * its gradient (before
    clipping), which tells how much of the optimizer's moment estimates L_pre takes from the RL steps."""
    optimizer.zero_grad(set_to_none=True)
    loss = pretraining_loss(policy, images, captions, generator, noise_range=noise_range,
                            caption_dropout=caption_dropout)
    (beta * loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {"pretrain_loss": loss.item(), "pretrain_grad_norm": float(grad_norm)}
