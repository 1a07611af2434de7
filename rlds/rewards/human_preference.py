"""Human preference: ImageReward-v1.0 (Xu et al. 2023), the paper's preference reward.

ImageReward is BLIP's ViT-L image encoder cross-attended by a BERT text encoder, with an MLP head on
the text's [CLS] feature, normalised by the head's mean and std on its training set:

    r(x_0, c) = (MLP(BERT(c | ViT(x_0))[CLS]) - 0.16717) / 1.03334

The `image-reward` package pins libraries that clash with rlds' own (transformers 4.55, timm 0.6.13,
openai-clip), so this reward's actors run in their own Ray environment: by default a pip
`runtime_env` built from `rlds/rewards/envs/image_reward.txt` (once per node, shared by every actor
with the same pins), or an interpreter baked into the cluster's image (`py_executable` in the
reward's config). The package scores one PIL image at a time; here whole batches go through the
ViT and BERT at once, on the actor's GPU when it has one.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rlds.rewards.base import ImageReward
from rlds.rewards.vision import pixel_values, reward_device

FILES = ("ImageReward.pt", "med_config.json")
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35  # the package's prompt length
# BLIP's preprocessing: bicubic resize of the shortest edge to 224, centre crop, CLIP's normalisation
BLIP_IMAGES = SimpleNamespace(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              do_center_crop=True, resample=3, image_mean=(0.48145466, 0.4578275, 0.40821073),
                              image_std=(0.26862954, 0.26130258, 0.27577711))
_TORCHVISION_SCHEMAS = None


class ImageRewardScore(ImageReward):
    """`image_reward`: ImageReward-v1.0's normalised score.

    args: model (a hub repo with ImageReward.pt and med_config.json, default THUDM/ImageReward, or a
    local folder with both), tokenizer (BLIP's BERT tokenizer: a hub id, default bert-base-uncased,
    or a folder with its vocab.txt), device (auto | cpu | cuda), batch_size (images per forward)."""

    requirements = Path(__file__).parent / "envs" / "image_reward.txt"  # its own Ray environment

    def __init__(self, model: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased",
                 device: str = "auto", batch_size: int = 8):
        weights, med_config = weight_files(model)
        allow_torchvision_without_its_ops()
        from ImageReward.ImageReward import ImageReward as ImageRewardModel
        from ImageReward.models.BLIP import blip_pretrain
        from transformers import BertTokenizer

        self.device = reward_device(device)
        self.tokenizer = blip_tokenizer(BertTokenizer, tokenizer)
        blip_pretrain.init_tokenizer = lambda: self.tokenizer  # the package's own would fetch from the hub
        self.model = ImageRewardModel(med_config=str(med_config), device=self.device)
        state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only, never code
        missing, _ = self.model.load_state_dict(state, strict=False)  # the file also holds BLIP's unused heads
        needed = [k for k in missing if k.startswith(("mlp.", "blip.visual_encoder.", "blip.text_encoder."))]
        if needed:
            raise ValueError(f"image_reward: {weights} is not an ImageReward checkpoint: it lacks {len(needed)} "
                             f"weights the score needs, e.g. {needed[:3]}")
        self.model.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, images, prompts):
        out = []
        for start in range(0, len(images), self.batch_size):
            x = pixel_values(images[start:start + self.batch_size], BLIP_IMAGES, self.device)
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length",
                                    truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            out.append(self.model.score_gard(tokens.input_ids, tokens.attention_mask, x).float().reshape(-1))
        return torch.cat(out).cpu().numpy().astype(np.float64)


def weight_files(model: str) -> tuple[Path, Path]:
    """ImageReward.pt and med_config.json from a local folder or a hub repo (from its cache when offline)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"image_reward: {folder} lacks {', '.join(missing)}; download both from the "
                                    f"hub repo THUDM/ImageReward (`hf download THUDM/ImageReward {' '.join(FILES)} "
                                    f"--local-dir {folder}`)")
        return folder / FILES[0], folder / FILES[1]
    from huggingface_hub import hf_hub_download

    try:
        return tuple(Path(hf_hub_download(model, f)) for f in FILES)
    except Exception as e:  # offline, no cache entry, unknown repo: all end here
        raise FileNotFoundError(f"image_reward: cannot get {' and '.join(FILES)} from {model!r} "
                                f"({type(e).__name__}). Offline, download them first (`hf download {model} "
                                f"{' '.join(FILES)} --local-dir DIR`) and give args.model: DIR") from None


def blip_tokenizer(tokenizer_cls, source: str):
    """BLIP's BERT tokenizer with its two extra tokens, [DEC] and [ENC], as the package makes it."""
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"image_reward: tokenizer folder {folder} lacks vocab.txt (bert-base-uncased's)")
    try:
        tok = tokenizer_cls.from_pretrained(str(folder) if folder.is_dir() else source)
    except OSError as e:
        raise FileNotFoundError(f"image_reward: cannot load the tokenizer {source!r} ({type(e).__name__}). "
                                "Offline, give args.tokenizer: a folder with bert-base-uncased's vocab.txt") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.additional_special_tokens_ids[0]
    return tok


def allow_torchvision_without_its_ops() -> None:
    """Let a torchvision whose C++ ops cannot load (PyPI's CUDA wheel beside a CPU torch) import.

    torchvision registers fake kernels for `torchvision::nms` and `qnms` at import, which fails when
    its library did not define them; ImageReward only needs torchvision's transforms (and timm its
    layers), never those ops. So when the library does not load, define the two schemas first; any
    call of the ops themselves still fails loudly."""
    global _TORCHVISION_SCHEMAS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TORCHVISION_SCHEMAS is not None:
        return
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        torch.ops.load_library(libraries[0])
        return
    except (OSError, IndexError, RuntimeError):
        pass
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
