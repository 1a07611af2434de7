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


def _alpha_prod_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    """alpha-bar_t (diffusers' alphas_cumprod[t], the DDIM paper's alpha_t), float32; the final
    value past the first timestep."""
    alphas = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=t.device, dtype=torch.float32)
    return torch.where(t >= 0, alphas[t.clamp(min=0)], final)


def ddim_step_mean(scheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                   eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of p(x_{t-1} | x_t), both float32 and broadcastable to `sample`
    [B, C, H, W]; `timestep` is a scalar or one per batch element [B]. The notation is diffusers'
    (`DDIMScheduler.step`), the equations those of the DDIM paper (Song et al., arXiv 2010.02502),
    whose alpha_t is diffusers' alpha_prod_t."""
    model_output, x_t = model_output.float(), sample.float()
    t = torch.as_tensor(timestep, device=x_t.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(x_t.shape[0])
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alpha_prod_t = _alpha_prod_at(scheduler, t).view(shape)
    alpha_prod_t_prev = _alpha_prod_at(scheduler, previous_timestep(scheduler, t)).view(shape)
    beta_prod_t = 1 - alpha_prod_t

    # the predicted x_0 and epsilon, from the model's epsilon (or v, for SD 2.x at 768 px)
    if scheduler.config.prediction_type == "epsilon":
        pred_epsilon = model_output
        pred_original_sample = (x_t - beta_prod_t.sqrt() * pred_epsilon) / alpha_prod_t.sqrt()
    elif scheduler.config.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t.sqrt() * x_t - beta_prod_t.sqrt() * model_output
        pred_epsilon = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * x_t
    else:
        raise ValueError(f"scheduler prediction_type {scheduler.config.prediction_type!r} is not supported")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-r, r)
        pred_epsilon = (x_t - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()

    # sigma_t(eta), eq. (16): eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1})
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.clamp(min=1e-20).sqrt()
    # eq. (12): x_{t-1} = sqrt(a_{t-1}) x0_pred + sqrt(1 - a_{t-1} - sigma_t^2) eps_pred + sigma_t z
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction
    return prev_sample_mean, std_dev_t


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

    Shapes: `model_output` and `sample` (x_t) are [B, C, H, W]; `timestep` is a scalar or one per
    batch element [B]; `generator` is one per batch element, so that a chain's noise does not depend
    on the batch it was drawn in. Returns x_{t-1} [B, C, H, W] float32 and log p [B] float32: the
    Gaussian log-density averaged over all non-batch dimensions (`ddim_step_mean` gives the Gaussian).
    """
    prev_sample_mean, std_dev_t = ddim_step_mean(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = batch_randn(sample.shape, generator, sample.device)
        prev_sample = prev_sample_mean + std_dev_t * noise
    prev = prev_sample.float()
    log_prob = (
        -((prev.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2)
        - torch.log(std_dev_t)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev, log_prob.mean(dim=tuple(range(1, sample.ndim)))


def step_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """KL(p_theta || p_ref) of one step, two Gaussians with the same std: |mu - mu_ref|^2 / (2 sigma^2),
    averaged over the non-batch dimensions as the log-prob is, [B]."""
    kl = (mean - reference_mean) ** 2 / (2 * std_dev_t**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))
