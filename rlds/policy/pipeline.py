"""Loading the policy: a diffusers text-to-image model from a hub id or a folder, or a tiny one.

A model folder is laid out as diffusers lays out Stable Diffusion (model_index.json, unet/,
text_encoder/, tokenizer/, scheduler/, and vae/ where there is one), so one `load_policy` serves
Stable Diffusion, rlds' own pixel-space models, and the tiny random-weight models of the tests.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from rlds.config import LoraConfig, ModelConfig
from rlds.hf import no_progress_bars
from rlds.policy.builder import Policy, build_policy, tiny_architecture

# model.dtype: the samplers' and learners' compute dtype (autocast, on a GPU or a CPU: bfloat16 pays on
# CPUs with bf16 matrix units, which `rlds bench --parts compute` measures) and the frozen parts' weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model(model: ModelConfig, fail) -> None:
    if model.dtype not in DTYPES:
        fail("model.dtype", f"{model.dtype!r} is not one of {', '.join(DTYPES)}")
    if model.lora.enabled and model.lora.rank < 1:
        fail("model.lora.rank", "must be at least 1")

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
        policy = build_policy(tiny_architecture(model.tiny))
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
    """The parts of a diffusers model folder (or hub id)."""
    with no_progress_bars():
        return _load_parts(source, revision, dtype)


def _load_parts(source: str, revision: Optional[str], dtype) -> Policy:
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
    out = np.empty(sum(p.numel() for _, p in trainable_parameters(module)), dtype=np.float32)
    write_flat_trainable(module, out)
    return out


def write_flat_trainable(module: torch.nn.Module, out: np.ndarray) -> None:
    """`flatten_trainable` into `out` (a shared-memory slot, say): one copy of each parameter."""
    dst, offset = torch.from_numpy(out), 0
    with torch.no_grad():
        for _, p in trainable_parameters(module):
            n = p.numel()
            dst[offset:offset + n].copy_(p.detach().reshape(-1))
            offset += n


def load_flat_trainable(module: torch.nn.Module, flat: np.ndarray, share: bool = False) -> bool:
    """Load a `flatten_trainable` buffer. `share=True` (CPU, float32 weights) makes the parameters
    views of the buffer instead of copying it: a sampler that only reads its weights then takes a
    new version from shared memory with no copy at all. Returns whether it did (the buffer must
    then stay valid for as long as the module is used)."""
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
    return share


class WithParams:
    """A UNet called with other values of its trainable parameters (an old or reference policy), no
    gradient: one model in memory, and LoRA and full fine-tuning alike. Unwraps DDP."""

    def __init__(self, unet: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.module, self.params = getattr(unet, "module", unet), params
        self.config = self.module.config

    def parameters(self):
        return self.module.parameters()

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.module, self.params, args, kwargs, strict=False)


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(module)}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    params = dict(trainable_parameters(module))
    missing, extra = set(params) - set(state), set(state) - set(params)
    if missing or extra:
        raise ValueError(f"{where}: weights do not match the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}); was it saved with another model.lora setting?")
    shapes = [f"{n} {tuple(state[n].shape)} (the model's: {tuple(p.shape)})" for n, p in params.items()
              if state[n].shape != p.shape]
    if shapes:
        raise ValueError(f"{where}: weights of another model: {len(shapes)} tensors differ in shape, e.g. "
                         f"{shapes[0]}; was it saved with another model.source?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
