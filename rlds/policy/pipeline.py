"""Loading the policy: a diffusers text-to-image model from a hub id or a folder, or a tiny one.

A model folder is laid out as diffusers lays out Stable Diffusion (model_index.json, unet/,
text_encoder/, tokenizer/, scheduler/, and vae/ where there is one), so one `load_policy` serves
Stable Diffusion, rlds' own pixel-space models, and the tiny random-weight models of the tests.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from rlds.config import LoraConfig, ModelConfig, TinyModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def build_tokenizer(max_length: int, vocab: Optional[list[str]] = None) -> PreTrainedTokenizerFast:
    """A word-level, lower-casing tokenizer over `vocab` (default TINY_VOCAB); other words are [UNK]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = TINY_VOCAB if vocab is None else sorted({w.lower() for w in vocab} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", model_max_length=max_length)


def tiny_scheduler() -> DDIMScheduler:
    # Stable Diffusion's settings: the last step keeps a little noise, so every step is stochastic.
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_policy(spec: TinyModelConfig) -> Policy:
    """A random-weight pixel-space model; the same `spec` gives the same weights in every process."""
    tokenizer = build_tokenizer(spec.max_prompt_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=spec.cross_attention_dim,
            intermediate_size=2 * spec.cross_attention_dim, num_hidden_layers=spec.text_layers,
            num_attention_heads=4, max_position_embeddings=spec.max_prompt_length,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))
        n = len(spec.block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=spec.sample_size, in_channels=spec.in_channels, out_channels=spec.in_channels,
            block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=spec.cross_attention_dim, attention_head_dim=8,
            norm_num_groups=min(8, spec.block_out_channels[0]))
    return Policy(tokenizer, text_encoder, unet, tiny_scheduler())


def save_policy(policy: Policy, path: str | Path) -> None:
    """Write a diffusers-style model folder that `load_policy` (and diffusers) can read back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    parts = {"tokenizer": policy.tokenizer, "text_encoder": policy.text_encoder,
             "unet": policy.unet, "scheduler": policy.scheduler, "vae": policy.vae}
    index = {"_class_name": "StableDiffusionPipeline" if policy.vae is not None else "RldsPixelPipeline"}
    for name, part in parts.items():
        if part is None:
            continue
        part.save_pretrained(path / name)
        library = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


# Models that ship inside the package, by name.
SHIPPED_MODELS = {"shapes": Path(__file__).resolve().parent.parent / "models" / "shapes-base"}


def model_location(source: str) -> str:
    """A shipped model's folder, else `source` itself (a local folder or a hub id)."""
    return str(SHIPPED_MODELS.get(source, source))


def load_policy(model: ModelConfig, device: str | torch.device = "cpu") -> Policy:
    """The policy named by the config: `tiny`, a shipped model (`shapes`), a local diffusers folder,
    or a hub id."""
    if model.source == "tiny":
        policy = build_tiny_policy(model.tiny)
    else:
        policy = load_pretrained(model_location(model.source), model.revision, DTYPES[model.dtype])
    policy.unet.requires_grad_(False)
    policy.text_encoder.requires_grad_(False).eval()
    if policy.vae is not None:
        policy.vae.requires_grad_(False).eval()
    if model.lora.enabled:
        add_lora(policy.unet, model.lora)
    else:
        policy.unet.requires_grad_(True)
    policy.unet.eval()  # no dropout: sampler and learner must compute the same function
    return policy.to(device)


def load_pretrained(source: str, revision: Optional[str] = None, dtype=torch.float32) -> Policy:
    local = Path(source)
    index_file = local / "model_index.json"
    if local.exists() and not index_file.is_file():
        raise FileNotFoundError(f"model.source {source!r}: a folder without model_index.json; "
                                "expected a diffusers model folder (see rlds.policy.save_policy)")
    if index_file.is_file():
        index = json.loads(index_file.read_text())
    else:
        from diffusers import DiffusionPipeline
        index = DiffusionPipeline.load_config(source, revision=revision)
    kw = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **kw)
    # The trained UNet keeps float32 master weights; compute runs under autocast.
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    vae = None
    if index.get("vae"):
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    return Policy(tokenizer, text_encoder, unet, scheduler, vae)


def add_lora(unet: torch.nn.Module, lora: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig

    unet.add_adapter(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                                    target_modules=list(lora.target_modules)))
    # peft's gaussian init gives B = 0, so the adapted model starts as the base model.
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def flatten_trainable(module: torch.nn.Module) -> np.ndarray:
    """All trainable parameters as one float32 buffer (one object-store copy, not one per tensor)."""
    params = [p.detach().reshape(-1).float() for _, p in trainable_parameters(module)]
    return torch.cat(params).cpu().numpy()


def load_flat_trainable(module: torch.nn.Module, flat: np.ndarray, share: bool = False) -> None:
    """Load a `flatten_trainable` buffer. `share=True` (CPU, float32 weights) makes the parameters
    views of the buffer instead of copying it: a sampler that only reads its weights then takes a
    new version from the object store's shared memory with no copy at all."""
    params = trainable_parameters(module)
    total = sum(p.numel() for _, p in params)
    if flat.size != total:
        raise ValueError(f"weight buffer holds {flat.size} values, the model trains {total}: "
                         "sampler and learner were built from different model configs")
    with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.asarray(flat))
    share = share and all(p.device.type == "cpu" and p.dtype == torch.float32 for _, p in params)
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            view = src[offset:offset + n].view_as(p)
            if share:
                p.data = view
            else:
                p.copy_(view)
            offset += n


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(module)}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    params = dict(trainable_parameters(module))
    missing, extra = set(params) - set(state), set(state) - set(params)
    if missing or extra:
        raise ValueError(f"{where}: weights do not match the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}); was it saved with another model.lora setting?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
