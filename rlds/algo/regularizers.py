"""L_pre: the paper's pretraining loss, taken as its own gradient step after the RL steps.

Plain noise-prediction MSE on a held image-caption set; it anchors the policy to the data it was
trained on and keeps reward hacking down. The same step can hold the guidance direction to the
reference policy's at low noise (`GuidanceAnchor`), on the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rlds.policy.pipeline import Policy, WithParams
from rlds.policy.sampling import encode_prompts


def _noised_batch(policy: Policy, images: np.ndarray, captions: list[str], generator: torch.Generator,
                  text_grad: bool, noise_range: tuple[float, float], caption_dropout: float):
    """(x_t, t, caption embeddings, target) of an image-caption batch, for `pretraining_loss`."""
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
    target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    return x_t, t, cond, target


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
    x_t, t, cond, target = _noised_batch(policy, images, captions, generator, text_grad, noise_range, caption_dropout)
    pred = policy.unet(x_t, t, encoder_hidden_states=cond).sample.float()
    return torch.nn.functional.mse_loss(pred, target)


@dataclass
class GuidanceAnchor:
    """Holds the guidance direction c - u (conditional minus unconditional output) to the reference
    policy's at the quietest `fraction` of noise levels, by moving the unconditional branch alone:
    weight * mean |u - (sg(c) - (c_ref - u_ref))|^2, sg a stop-gradient.

    Guidance at scale s turns changes dc and du of the two branches into du + s (dc - du) of the
    guided output. RL trains the conditional branch, the unconditional one follows only part of the way
    through the shared weights, and at s = 4 the rest shows three times over: ShapesWorld's tuned
    models draw better than the base without guidance and worse with it (docs/results.md, "Where the
    quality goes"). At du = dc the guided output moves by dc alone. Held only where the noise is low, where fine
    detail is drawn, so that guidance still amplifies what RL teaches about layout and colour; and
    only through u, since pulling c back pulls against what RL trains (docs/results.md, seventeenth session)."""
    reference: dict[str, torch.Tensor]  # values of the trainable parameters (rlds.algo.matching.snapshot)
    weight: float
    fraction: float = 0.5

    def loss(self, policy: Policy, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the conditional output at every row, with gradient; the anchor's mean over the quiet rows,
        0 without any): both branches in one UNet call, so DDP sees one forward."""
        quiet = t < self.fraction * policy.scheduler.config.num_train_timesteps
        b, q = len(t), int(quiet.sum())
        if q == 0:
            return policy.unet(x_t, t, encoder_hidden_states=cond).sample.float(), t.new_zeros((), dtype=torch.float32)
        xq, tq, empty = x_t[quiet], t[quiet], uncond.expand(q, -1, -1)
        out = policy.unet(torch.cat([x_t, xq]), torch.cat([t, tq]),
                          encoder_hidden_states=torch.cat([cond, empty])).sample.float()
        pred, u = out[:b], out[b:]
        ref_u, ref_c = WithParams(policy.unet, self.reference)(
            torch.cat([xq, xq]), torch.cat([tq, tq]), encoder_hidden_states=torch.cat([empty, cond[quiet]])
        ).sample.float().chunk(2)
        return pred, (u - (pred[quiet].detach() - (ref_c - ref_u))).pow(2).mean()


def pretrain_step(policy: Policy, optimizer: torch.optim.Optimizer, images: np.ndarray, captions: list[str],
                  beta: float, max_grad_norm: float, generator: torch.Generator,
                  noise_range: tuple[float, float] = (0.0, 1.0), caption_dropout: float = 0.0,
                  anchor: Optional[GuidanceAnchor] = None) -> dict[str, float]:
    """One optimizer step on beta * L_pre (plus the guidance anchor's term on the same batch, where
    given); returns L_pre and the norm of the step's gradient (before clipping), which tells how much of
    the optimizer's moment estimates L_pre takes from the RL steps."""
    optimizer.zero_grad(set_to_none=True)
    x_t, t, cond, target = _noised_batch(policy, images, captions, generator, False, noise_range, caption_dropout)
    if anchor is None:
        pred, held = policy.unet(x_t, t, encoder_hidden_states=cond).sample.float(), None
    else:
        pred, held = anchor.loss(policy, x_t, t, cond, encode_prompts(policy, [""]))
    loss = torch.nn.functional.mse_loss(pred, target)
    (beta * loss + (0 if held is None else anchor.weight * held)).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    stats = {"pretrain_loss": loss.item(), "pretrain_grad_norm": float(grad_norm)}
    return stats if held is None else {**stats, "guidance_anchor": held.item()}
