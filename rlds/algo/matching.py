"""The forward (noising) process on the policy's own clean samples: what the forward-process
objectives (`nft`, `awm`) share, their update loop (`forward_update`) included.

They train the denoising (score-matching) loss of pretraining on x_0 that the policy drew itself,
weighted by reward, so they need only x_0, the prompt embeddings and the advantages: no stored
chain, no behaviour log-probs, any sampler. Their old and reference policies are the same UNet
with other values of the trainable parameters (`rlds.policy.pipeline.WithParams`),
so LoRA and full fine-tuning work alike and no second model is built.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from rlds.policy.pipeline import WithParams, trainable_parameters
from rlds.policy.sampling import autocast, guided_noise
from rlds.stats import reduce_metrics


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


def noised(scheduler, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
           draws: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, noise): the forward process q(x_t | x_0) at timesteps t [B]; with `draws` [B] (indices
    into max(draws) + 1 noise draws), the rows with the same index share their noise."""
    if draws is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    else:
        shared = torch.randn((int(draws.max()) + 1, *x0.shape[1:]), generator=generator, device=x0.device)
        noise = shared[torch.as_tensor(draws, device=x0.device)]
    return scheduler.add_noise(x0, noise, t), noise


def noise_draws(groups: Optional[np.ndarray], count: int) -> Optional[np.ndarray]:
    """Per sample [count], the index of the noise draw it uses: its group's (0, 1, ... in order of
    first appearance), or None (each its own) without groups."""
    if groups is None:
        return None
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    # numbered by first appearance, so that groups of one draw exactly what independent noise draws
    order = np.argsort(np.argsort(first))
    if len(inverse) != count:
        raise ValueError(f"{len(inverse)} group ids for a batch of {count} samples")
    return order[inverse]


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


def check_timesteps(algo, fail) -> None:
    k, steps = algo.timesteps_per_iteration, algo.optimizer_steps
    if k < 1:
        fail("algo.timesteps_per_iteration", "must be at least 1 (noise levels trained per sample)")
    if steps is not None and (steps < 1 or k % steps):
        fail("algo.optimizer_steps", f"{steps} must divide algo.timesteps_per_iteration ({k})")


def forward_update(policy, trajectories, advantages, optimizer, algo, rng, no_sync, dtype,
                   term, groups=None) -> dict[str, float]:
    """The update loop the forward-process objectives share: K stratified noise levels per sample
    (`draw_timesteps`), each a fresh x_t of the sample's own x_0, trained in `algo.optimizer_steps`
    optimizer steps; `term(policy, output, predict_with, x_t, x0, t, target, advantages, fresh)` gives a
    term's loss and figures: `predict_with(params)` is the same output with other values of the
    trainable parameters (an old or reference policy, no gradient), `fresh` says the term is in the
    first optimizer step, while the weights are the update's start; the chains sampled with guidance
    are trained on `algo.guided_noisiest_fraction` of the noise levels where it is set. The output is the conditional
    one, or with algo.guided_training the guided one at the sampler's guidance scale; a share
    `algo.caption_dropout` of the terms have the empty prompt in place of the sample's own. With
    `algo.group_shared_noise` and `groups` (per trajectory batch, [B] group ids), the samples of a
    group share their noise levels and noise.
    Shapes: x_0 [B, C, H, W] per trajectory batch, advantages [B]."""
    scheduler = policy.scheduler
    device = next(unwrap(policy.unet).parameters()).device
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    k_total = algo.timesteps_per_iteration
    per_step = k_total // (algo.optimizer_steps or k_total)
    T = scheduler.config.num_train_timesteps
    shared = algo.group_shared_noise and groups is not None
    draws = [noise_draws(groups[i] if shared else None, len(traj)) for i, traj in enumerate(trajectories)]

    def draw(fraction, i):  # [B, K] noise levels of trajectory batch i, a group's shared with draws
        if draws[i] is None:
            return draw_timesteps(T, fraction, k_total, len(trajectories[i]), rng)
        return draw_timesteps(T, fraction, k_total, int(draws[i].max()) + 1, rng)[draws[i]]

    steps = [draw(algo.noisiest_fraction, i) for i in range(len(trajectories))]
    if algo.guided_noisiest_fraction is not None:  # the guided chains' own window
        for i, traj in enumerate(trajectories):
            guided = np.asarray(traj.guidance_scale).reshape(-1) != 1.0
            steps[i] = np.where(guided[:, None], draw(algo.guided_noisiest_fraction, i), steps[i])
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
                if algo.caption_dropout > 0:  # these terms train the unconditional branch on the sample
                    drop = torch.as_tensor(rng.random(len(traj)) < algo.caption_dropout, device=device)
                    cond = torch.where(drop.view(-1, 1, 1), uncond.expand_as(cond), cond)
                scale = traj.guidance_scale if algo.guided_training else 1.0
                t = torch.as_tensor(steps[i][:, k], device=device)
                x_t, noise = noised(scheduler, x0, t, generator, draws[i])

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
    metrics = {**reduce_metrics(term_stats), **reduce_metrics(step_stats)}
    if shared:  # what the option shares in practice: 1.0 would mean the group ids never came
        metrics["images_per_noise_draw"] = sum(map(len, draws)) / sum(int(d.max()) + 1 for d in draws)
    return metrics
