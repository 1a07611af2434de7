"""The ShapesWorld base model before pretraining, its start from an earlier folder, and its EMA."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlds.config import ConfigError
from rlds.policy.builder import Architecture, Policy, build_policy, unet_blocks
from rlds.pretrain.config import SHAPES_VOCAB, PretrainConfig


def shapes_architecture(cfg: PretrainConfig) -> Architecture:
    """A pixel-space UNet on 32x32x3 with cross-attention below the top level, and a CLIP-style text
    encoder over the ShapesWorld grammar."""
    return Architecture(
        unet=dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=tuple(cfg.block_out_channels),
                  layers_per_block=cfg.layers_per_block,
                  **unet_blocks(len(cfg.block_out_channels), cross_attention_at_top=False),
                  cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_head_dim,
                  norm_num_groups=cfg.norm_num_groups),
        text_encoder=dict(hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                          max_position_embeddings=cfg.max_prompt_length),
        max_prompt_length=cfg.max_prompt_length, vocab=SHAPES_VOCAB, seed=cfg.seed)


def build_shapes_policy(cfg: PretrainConfig) -> Policy:
    """The untrained ShapesWorld model; the same config gives the same weights."""
    return build_policy(shapes_architecture(cfg))


def load_start_weights(policy: Policy, folder: Path) -> None:
    """Load an earlier model folder's UNet and text encoder into `policy` (init_from), through the
    loader every rlds model goes through."""
    from rlds.policy.pipeline import load_pretrained

    start = load_pretrained(str(folder))
    for name in ("unet", "text_encoder"):
        try:
            getattr(policy, name).load_state_dict(getattr(start, name).state_dict())
        except RuntimeError as e:
            raise ConfigError(f"init_from: {folder / name} does not fit this config's model "
                              f"({str(e).splitlines()[0]}); keep block_out_channels, text_hidden and the other "
                              f"model keys of {folder / 'pretrain_config.yaml'}") from None


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class EMA:
    """An exponential moving average of some modules' parameters, with the usual warm-up
    (decay min(d, (1 + k) / (10 + k)) at update k) so a short run is not dominated by its start."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay, self.updates = decay, 0
        self.shadows = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]
        self.pairs = [(list(s.parameters()), list(m.parameters())) for s, m in zip(self.shadows, modules)]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for shadow, live in self.pairs:
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [p.detach() for p in live], alpha=1 - d)
