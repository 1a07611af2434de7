"""The policy's components, and the one builder of every model rlds makes from scratch.

`build_policy(architecture)` makes the tests' tiny model (`tiny_architecture`), the ShapesWorld
base model before pretraining (`rlds.pretrain.model.shapes_architecture`) and Stable Diffusion 2's
UNet and text encoder for the GPU benchmark (`rlds.bench.gpu.sd2_architecture`). An Architecture
names the diffusers UNet and the CLIP text encoder by their own config keys; the same architecture
gives the same weights in every process, so the samplers and learners of a run agree on a model
that was never saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from rlds.config import TinyModelConfig

# The tiny model's vocabulary: words of the built-in prompt sets; anything else is [UNK].
TINY_VOCAB = sorted(set("""
a an the of and with on in to at near next beside above below left right side photo picture
painting drawing red green blue yellow black white orange purple pink brown gray bright dark
circle square triangle shape shapes cat dog bird horse fish cow sheep rabbit fox bear lion tiger
owl duck frog mouse elephant monkey tree flower house car boat sun moon star mountain river sky
""".split()))
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


@dataclass
class Policy:
    """The components of a text-to-image diffusion model, in rlds' terms."""
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: DDIMScheduler
    vae: Optional[torch.nn.Module] = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "Policy":
        for m in (self.text_encoder, self.unet, self.vae):
            if m is not None:
                m.to(device)
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)


@dataclass
class Architecture:
    """Everything that fixes a from-scratch model's shapes and its initial weights."""
    unet: dict  # UNet2DConditionModel keyword arguments
    text_encoder: dict  # CLIPTextConfig keyword arguments; vocab_size defaults to the tokenizer's
    max_prompt_length: int
    vocab: Optional[list[str]] = None  # the tokenizer's words (default TINY_VOCAB)
    vae: Optional[dict] = None  # AutoencoderKL keyword arguments, for a latent model
    seed: int = 0
    frozen_dtype: torch.dtype = torch.float32  # the weights of the frozen parts: text encoder, VAE


def unet_blocks(levels: int, cross_attention_at_top: bool) -> dict:
    """Down and up block types for `levels` resolutions. Stable Diffusion has cross-attention at every
    level but the lowest; rlds' pixel models at every level but the top (full-resolution) one."""
    if cross_attention_at_top:
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    else:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return {"down_block_types": down, "up_block_types": up}


def build_tokenizer(max_length: int, vocab: Optional[list[str]] = None) -> PreTrainedTokenizerFast:
    """A word-level, lower-casing tokenizer over `vocab` (default TINY_VOCAB); other words are [UNK]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = TINY_VOCAB if vocab is None else sorted({w.lower() for w in vocab} - set(SPECIAL_TOKENS))
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", ids["[BOS]"]), ("[EOS]", ids["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", model_max_length=max_length)


def sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's settings: scaled-linear betas 0.00085-0.012 over 1000 steps, and
    the last step keeps a little noise (no alpha-to-one), so every step is stochastic."""
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_policy(arch: Architecture, device: str | torch.device = "cpu") -> Policy:
    """Random weights of `arch`, made on `device` (on a GPU that takes seconds, not minutes)."""
    tokenizer = build_tokenizer(arch.max_prompt_length, arch.vocab)
    text_config = CLIPTextConfig(**{"vocab_size": len(tokenizer), **arch.text_encoder},
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(arch.seed)
        text_encoder = CLIPTextModel(text_config).to(arch.frozen_dtype)
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae).to(arch.frozen_dtype) if arch.vae is not None else None
    return Policy(tokenizer, text_encoder, unet, sd_scheduler(), vae)


def tiny_architecture(spec: TinyModelConfig) -> Architecture:
    """`model.source: tiny`: a random-weight pixel-space model of about 1 M parameters."""
    d = spec.cross_attention_dim
    return Architecture(
        unet=dict(sample_size=spec.sample_size, in_channels=spec.in_channels, out_channels=spec.in_channels,
                  block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
                  **unet_blocks(len(spec.block_out_channels), cross_attention_at_top=False),
                  cross_attention_dim=d, attention_head_dim=8, norm_num_groups=min(8, spec.block_out_channels[0])),
        text_encoder=dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=spec.text_layers,
                          num_attention_heads=4, max_position_embeddings=spec.max_prompt_length),
        max_prompt_length=spec.max_prompt_length, seed=spec.seed)


def build_tiny_policy(spec: TinyModelConfig) -> Policy:
    return build_policy(tiny_architecture(spec))
