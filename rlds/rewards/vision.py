"""What the neural rewards share: loading a transformers model and its processor from a hub id or a
local folder with errors that say how to fix them, and turning a batch of uint8 images into the
model's pixel values in one batched torch call on the reward actor's device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlds.hf import no_progress_bars

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 and 5 names


def reward_device(device: str) -> torch.device:
    """`auto`: the actor's GPU when Ray gave it one (a reward pool's `num_gpus`), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_vision_model(model_cls, processor_cls, source: str, what: str):
    """(model, processor) from a local folder or a hub id, weights in safetensors only.

    A local folder must hold config.json, the weights and the processor's files; a hub id must be in
    the local cache when the machine is offline. Either failure names the file or id and the fix."""
    folder = Path(source).expanduser()
    if folder.exists() or source.startswith((".", "/", "~")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: {source} is not a folder (give a local model folder or a hub id)")
        missing = [] if (folder / "config.json").is_file() else ["config.json"]
        for alternatives in (WEIGHT_FILES, PROCESSOR_FILES):
            if not any((folder / f).is_file() for f in alternatives):
                missing.append(" or ".join(alternatives))
        if missing:
            raise FileNotFoundError(f"{what}: {folder} lacks {', '.join(missing)}; save the model there with "
                                    "model.save_pretrained(folder) and processor.save_pretrained(folder)")
    try:
        with no_progress_bars():
            processor = processor_cls.from_pretrained(source)
            model = model_cls.from_pretrained(source, use_safetensors=True)
    except OSError as e:
        raise OSError(f"{what}: cannot load {source!r} ({e}). Offline, download it first on a machine "
                      f"with network (`hf download {source}`, then set HF_HUB_OFFLINE=1), or give a local "
                      "folder") from None
    return model.eval(), processor


def pixel_values(images: np.ndarray, image_processor, device: torch.device) -> torch.Tensor:
    """The model's input for uint8 images [B, H, W, 3], as its image processor would make them:
    rescale to [0, 1]; pad to a square at the bottom and right (OWLv2's `do_pad`, with 0); resize
    (to `size` height x width, or the shortest edge to `size.shortest_edge` and centre-crop to
    `crop_size`, as CLIP does) with antialiasing; normalise by `image_mean` and `image_std`."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [batch, height, width, 3]; got {images.dtype} {list(images.shape)}")
    ip = image_processor
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if getattr(ip, "do_pad", False):
        side = max(x.shape[-2:])
        x = F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]), value=0.0)
    mode = "bicubic" if int(getattr(ip, "resample", 2)) == 3 else "bilinear"  # PIL's resampling codes
    size = {k: v for k, v in dict(ip.size).items() if v is not None}
    if "shortest_edge" in size:
        h, w = x.shape[-2:]
        scale = size["shortest_edge"] / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode=mode, antialias=True,
                          align_corners=False)
        if getattr(ip, "do_center_crop", False):
            ch, cw = ip.crop_size["height"], ip.crop_size["width"]
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
    else:
        x = F.interpolate(x, size=(size["height"], size["width"]), mode=mode, antialias=True, align_corners=False)
    if mode == "bicubic":
        x = x.clamp(0, 1)
    mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
