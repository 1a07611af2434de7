"""Turning prompts into trajectories, and scoring a stored step under the current policy.

The sampler and the learner call the same `guided_noise` with the same batch layout, so on
unchanged weights the learner's log-prob of a stored step equals the sampler's to the bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from rlds.config import SamplingConfig
from rlds.policy.ddim import batch_randn, ddim_step_mean, ddim_step_with_logprob, step_kl
from rlds.policy.pipeline import Policy, WithParams


@dataclass
class Trajectory:
    """One sampler batch of denoising chains, as numpy arrays (zero-copy in Ray's object store)."""
    latents: np.ndarray  # [B, T+1, C, H, W] float32: x_T ... x_0 (without the chain [B, 1, ...]: x_0)
    timesteps: np.ndarray  # [T] int64
    log_probs: np.ndarray  # [B, T] float32: behaviour log p(x_{t-1} | x_t) (without the chain [B, 0])
    prompt_embeds: np.ndarray  # [B, L, D]
    negative_embeds: np.ndarray  # [1, L, D]: the empty prompt, for classifier-free guidance
    images: np.ndarray  # [B, H, W, 3] uint8
    prompts: list[str]
    prompt_ids: np.ndarray  # [B] int64, index into the run's prompt list
    sample_ids: np.ndarray  # [B] int64, unique in the run
    policy_version: int
    guidance_scale: np.ndarray  # [B] float32: each chain's classifier-free guidance scale (1: none)
    step_etas: np.ndarray  # [T] float32: each step's eta (0: a deterministic step, never trained by PPO)

    def __len__(self) -> int:
        return len(self.prompts)


def step_etas(cfg: SamplingConfig) -> np.ndarray:
    """Each step's eta, [num_steps]: sampling.eta inside sampling.stochastic_window, 0 outside."""
    etas = np.full(cfg.num_steps, cfg.eta, dtype=np.float32)
    if cfg.stochastic_window is not None:
        position = np.arange(cfg.num_steps) / cfg.num_steps
        start, end = cfg.stochastic_window
        etas[(position < start) | (position >= end)] = 0.0
    return etas


def eval_sampling(cfg: SamplingConfig) -> SamplingConfig:
    """The sampling settings the model is used (and evaluated) with: sampling.eval_guidance_scale,
    when a run trains at another guidance scale (CFG-free training, say)."""
    if cfg.eval_guidance_scale is None:
        return cfg
    return dataclasses.replace(cfg, guidance_scale=cfg.eval_guidance_scale, eval_guidance_scale=None)


def autocast(policy: Policy, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(policy.device.type, dtype=dtype)


def encode_prompts(policy: Policy, prompts: list[str], grad: bool = False) -> torch.Tensor:
    """Text embeddings [B, L, D]; `grad=True` only where the text encoder trains (pretraining)."""
    tok = policy.tokenizer(prompts, padding="max_length", truncation=True,
                           max_length=policy.tokenizer.model_max_length, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        return policy.text_encoder(tok.input_ids.to(policy.device))[0].float()


def guided_noise(policy: Policy, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor,
                 guidance_scale) -> torch.Tensor:
    """The UNet's output (epsilon, or v) with classifier-free guidance: x [B, C, H, W], cond [B, L, D],
    uncond [1, L, D] -> [B, C, H, W] float32. `guidance_scale` is one scale or each sample's [B]; the
    guided samples go through one batched call of both branches, the unguided ones (scale 1) through
    one of the conditional branch only, so a batch's layout fixes its output to the bit."""
    b = x.shape[0]
    scale = (guidance_scale if torch.is_tensor(guidance_scale) else
             torch.as_tensor(np.asarray(guidance_scale, np.float32), device=x.device)).reshape(-1).expand(b)
    guided = scale != 1.0
    per_sample_t = torch.is_tensor(t) and t.ndim == 1  # one timestep per sample (the forward-process objectives)
    if not guided.any():
        return policy.unet(x, t, encoder_hidden_states=cond).sample.float()
    if not guided.all():
        plain, rest = (guided_noise(policy, x[rows], t[rows] if per_sample_t else t, cond[rows], uncond, scale[rows])
                       for rows in (~guided, guided))
        out = plain.new_empty((b,) + plain.shape[1:])
        out[~guided], out[guided] = plain, rest
        return out
    emb = torch.cat([uncond.expand(b, -1, -1), cond])
    t = torch.cat([t, t]) if per_sample_t else t
    out = policy.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.float()
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + scale.view(-1, *[1] * (out.ndim - 1)) * (out_cond - out_uncond)


@torch.no_grad()
def decode_images(policy: Policy, x0: torch.Tensor) -> np.ndarray:
    if policy.vae is not None:
        vae = policy.vae
        x0 = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample
    img = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_trajectories(policy: Policy, prompts: list[str], cfg: SamplingConfig, seeds,
                        policy_version: int = 0, prompt_ids=None, sample_ids=None,
                        dtype: torch.dtype = torch.float32, keep_chain: bool = True,
                        guidance_scale=None, start_seeds=None) -> Trajectory:
    """One chain per prompt; chain i draws all its noise from `seeds[i]`, or its x_T from
    `start_seeds[i]` where given (a group sharing its start). `keep_chain=False` keeps only x_0 of the
    chain (what the forward-process objectives train on); `guidance_scale` (one, or each chain's [B])
    overrides the config's (evaluation samples at sampling.eval_guidance_scale; a mixed task's sets at
    their prompts.guidance_scale_by_set)."""
    device = policy.device
    b = len(prompts)
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} prompts")
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    cond = encode_prompts(policy, prompts)
    uncond = encode_prompts(policy, [""])
    policy.scheduler.set_timesteps(cfg.num_steps, device=device)
    timesteps = policy.scheduler.timesteps
    starts = generators if start_seeds is None else [torch.Generator(device).manual_seed(int(s)) for s in start_seeds]
    x = batch_randn((b,) + policy.latent_shape, starts, device)
    x = x * policy.scheduler.init_noise_sigma
    scale = np.broadcast_to(np.asarray(cfg.guidance_scale if guidance_scale is None else guidance_scale,
                                       np.float32), (b,)).copy()
    etas = step_etas(cfg)
    latents, log_probs = [x], []
    with autocast(policy, dtype):
        for t, eta in zip(timesteps, etas):
            model_output = guided_noise(policy, x, t, cond, uncond, scale)
            x, logp = ddim_step_with_logprob(policy.scheduler, model_output, t, x, float(eta), generator=generators)
            if keep_chain:
                latents.append(x)
                log_probs.append(logp)
    images = decode_images(policy, x)
    if keep_chain:
        chain, chain_log_probs = torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)
    else:
        chain, chain_log_probs = x[:, None], torch.zeros((b, 0), device=device)
    return Trajectory(
        latents=chain.cpu().numpy(),
        timesteps=timesteps.cpu().numpy().astype(np.int64),
        log_probs=chain_log_probs.cpu().numpy(),
        prompt_embeds=cond.cpu().numpy(),
        negative_embeds=uncond.cpu().numpy(),
        images=images,
        prompts=list(prompts),
        prompt_ids=np.asarray(prompt_ids if prompt_ids is not None else np.zeros(b), dtype=np.int64),
        sample_ids=np.asarray(sample_ids if sample_ids is not None else np.arange(b), dtype=np.int64),
        policy_version=int(policy_version),
        guidance_scale=scale,
        step_etas=etas,
    )


def step_log_prob(policy: Policy, traj: Trajectory, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p_theta(x_{t-1} | x_t) of the stored step `step` (0 <= step < T) of every chain in `traj`,
    with gradient: [B] float32, from x_t = traj.latents[:, step] and x_{t-1} = traj.latents[:, step + 1]
    (each [B, C, H, W]), through the same guided UNet call and DDIM step as the sampler's."""
    return step_log_prob_and_kl(policy, traj, step, dtype)[0]


def step_log_prob_and_kl(policy: Policy, traj: Trajectory, step: int, dtype: torch.dtype = torch.float32,
                         reference: Optional[dict] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`step_log_prob`, and with `reference` (values of the trainable parameters) the step's KL to
    that policy in closed form (`rlds.policy.ddim.step_kl`), [B]; else None."""
    device = policy.device
    # torch.tensor copies: object-store arrays are read-only, and only one step is needed.
    x_t = torch.tensor(traj.latents[:, step], device=device)
    x_prev = torch.tensor(traj.latents[:, step + 1], device=device)
    t = torch.as_tensor(traj.timesteps[step], device=device)
    cond = torch.tensor(traj.prompt_embeds, device=device)
    uncond = torch.tensor(traj.negative_embeds, device=device)
    with autocast(policy, dtype):
        model_output = guided_noise(policy, x_t, t, cond, uncond, traj.guidance_scale)
    eta = float(traj.step_etas[step])
    _, logp = ddim_step_with_logprob(policy.scheduler, model_output, t, x_t, eta, prev_sample=x_prev)
    if reference is None:
        return logp, None
    with autocast(policy, dtype):
        ref_output = guided_noise(replace(policy, unet=WithParams(policy.unet, reference)), x_t, t, cond, uncond,
                                  traj.guidance_scale)
    mean, std = ddim_step_mean(policy.scheduler, model_output, t, x_t, eta)
    ref_mean, _ = ddim_step_mean(policy.scheduler, ref_output, t, x_t, eta)
    return logp, step_kl(mean, ref_mean, std)
