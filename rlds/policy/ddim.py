"""The policy's action: one stochastic DDIM step, with the Gaussian log-probability of its result.

Pure functions of tensors and a scheduler's alphas; all log-prob math in float32 so that the
sampler and the learner agree to the bit when they see the same inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def batch_randn(shape, generators: Optional[list[torch.Generator]], device) -> torch.Tensor:
    if generators is None:
        return torch.randn(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])


def previous_timestep(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return timestep - step


def _alpha_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=t.device, dtype=torch.float32)
    return torch.where(t >= 0, alphas[t.clamp(min=0)], final)


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[list[torch.Generator]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample x_{t-1} ~ p(. | x_t) (or score the given `prev_sample`) and return (x_{t-1}, log p).

    `timestep` is a scalar or one timestep per batch element; `generator` is one per batch element,
    so that a chain's noise does not depend on the batch it was drawn in. The log-prob is the Gaussian
    log-density averaged over all non-batch dimensions, shape [batch].
    """
    eps = model_output.float()  # the model's output: epsilon, or v for v-prediction models
    x_t = sample.float()
    t = torch.as_tensor(timestep, device=x_t.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(x_t.shape[0])
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alpha_t = _alpha_at(scheduler, t).view(shape)
    alpha_prev = _alpha_at(scheduler, previous_timestep(scheduler, t)).view(shape)
    beta_t = 1 - alpha_t

    if scheduler.config.prediction_type == "v_prediction":  # SD 2.x at 768 px
        eps, pred_x0 = alpha_t.sqrt() * eps + beta_t.sqrt() * x_t, alpha_t.sqrt() * x_t - beta_t.sqrt() * eps
    elif scheduler.config.prediction_type == "epsilon":
        pred_x0 = (x_t - beta_t.sqrt() * eps) / alpha_t.sqrt()
    else:
        raise ValueError(f"scheduler prediction_type {scheduler.config.prediction_type!r} is not supported")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-r, r)
        eps = (x_t - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=1e-20).sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    mean = alpha_prev.sqrt() * pred_x0 + direction

    if prev_sample is None:
        noise = batch_randn(x_t.shape, generator, x_t.device)
        prev_sample = mean + std * noise
    prev = prev_sample.float()
    log_prob = (
        -((prev.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev, log_prob.mean(dim=tuple(range(1, x_t.ndim)))
