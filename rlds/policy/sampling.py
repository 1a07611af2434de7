"""Turning prompts into trajectories, and scoring a stored step under the current policy.

The sampler and the learner call the same `guided_noise` with the same batch layout, so on
unchanged weights the learner's log-prob of a stored step equals the sampler's to the bit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from rlds.config import SamplingConfig
from rlds.policy.ddim import batch_randn, ddim_step_with_logprob
from rlds.policy.pipeline import Policy


@dataclass
class Trajectory:
    """One sampler batch of denoising chains, as numpy arrays (zero-copy in Ray's object store)."""
    latents: np.ndarray  # [B, T+1, C, H, W] float32: x_T ... x_0
    timesteps: np.ndarray  # [T] int64
    log_probs: np.ndarray  # [B, T] float32: behaviour log p(x_{t-1} | x_t)
    prompt_embeds: np.ndarray  # [B, L, D]
    negative_embeds: np.ndarray  # [1, L, D]: the empty prompt, for classifier-free guidance
    images: np.ndarray  # [B, H, W, 3] uint8
    prompts: list[str]
    prompt_ids: np.ndarray  # [B] int64, index into the run's prompt list
    sample_ids: np.ndarray  # [B] int64, unique in the run
    policy_version: int
    guidance_scale: float
    eta: float

    def __len__(self) -> int:
        return len(self.prompts)


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
                 guidance_scale: float) -> torch.Tensor:
    """The UNet's output (epsilon, or v) with classifier-free guidance, in one batched call: x [B, C, H, W],
    cond [B, L, D], uncond [1, L, D] -> [B, C, H, W] float32."""
    if guidance_scale == 1.0:
        return policy.unet(x, t, encoder_hidden_states=cond).sample.float()
    b = x.shape[0]
    emb = torch.cat([uncond.expand(b, -1, -1), cond])
    out = policy.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.float()
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


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
                        dtype: torch.dtype = torch.float32) -> Trajectory:
    """One chain per prompt; chain i draws all its noise from `seeds[i]`."""
    device = policy.device
    b = len(prompts)
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} prompts")
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    cond = encode_prompts(policy, prompts)
    uncond = encode_prompts(policy, [""])
    policy.scheduler.set_timesteps(cfg.num_steps, device=device)
    timesteps = policy.scheduler.timesteps
    x = batch_randn((b,) + policy.latent_shape, generators, device)
    x = x * policy.scheduler.init_noise_sigma
    latents, log_probs = [x], []
    with autocast(policy, dtype):
        for t in timesteps:
            model_output = guided_noise(policy, x, t, cond, uncond, cfg.guidance_scale)
            x, logp = ddim_step_with_logprob(policy.scheduler, model_output, t, x, cfg.eta, generator=generators)
            latents.append(x)
            log_probs.append(logp)
    images = decode_images(policy, x)
    return Trajectory(
        latents=torch.stack(latents, dim=1).cpu().numpy(),
        timesteps=timesteps.cpu().numpy().astype(np.int64),
        log_probs=torch.stack(log_probs, dim=1).cpu().numpy(),
        prompt_embeds=cond.cpu().numpy(),
        negative_embeds=uncond.cpu().numpy(),
        images=images,
        prompts=list(prompts),
        prompt_ids=np.asarray(prompt_ids if prompt_ids is not None else np.zeros(b), dtype=np.int64),
        sample_ids=np.asarray(sample_ids if sample_ids is not None else np.arange(b), dtype=np.int64),
        policy_version=int(policy_version),
        guidance_scale=float(cfg.guidance_scale),
        eta=float(cfg.eta),
    )


def step_log_prob(policy: Policy, traj: Trajectory, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p_theta(x_{t-1} | x_t) of the stored step `step` (0 <= step < T) of every chain in `traj`,
    with gradient: [B] float32, from x_t = traj.latents[:, step] and x_{t-1} = traj.latents[:, step + 1]
    (each [B, C, H, W]), through the same guided UNet call and DDIM step as the sampler's."""
    device = policy.device
    # torch.tensor copies: object-store arrays are read-only, and only one step is needed.
    x_t = torch.tensor(traj.latents[:, step], device=device)
    x_prev = torch.tensor(traj.latents[:, step + 1], device=device)
    t = torch.as_tensor(traj.timesteps[step], device=device)
    cond = torch.tensor(traj.prompt_embeds, device=device)
    uncond = torch.tensor(traj.negative_embeds, device=device)
    with autocast(policy, dtype):
        model_output = guided_noise(policy, x_t, t, cond, uncond, traj.guidance_scale)
    _, logp = ddim_step_with_logprob(policy.scheduler, model_output, t, x_t, traj.eta, prev_sample=x_prev)
    return logp
