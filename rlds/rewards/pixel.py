"""Cheap rewards computed from pixels: DDPO's JPEG (in)compressibility, brightness, diversity."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rlds.rewards.base import GroupReward, ImageReward


def jpeg_kilobytes(image: np.ndarray, quality: int) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegCompressibility(ImageReward):
    """Minus the JPEG size in kB: smaller files (simpler images) score higher."""

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images, prompts):
        return np.array([-jpeg_kilobytes(im, self.quality) for im in images])


class JpegIncompressibility(JpegCompressibility):
    """The JPEG size in kB: more detailed images score higher."""

    def score(self, images, prompts):
        return -super().score(images, prompts)


class Brightness(ImageReward):
    """Mean pixel value in [0, 1]."""

    def score(self, images, prompts):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


class Diversity(GroupReward):
    """Mean pairwise L2 distance between the images of a group, in [0, 1] per pixel."""

    def score_group(self, images, prompt):
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        if len(x) < 2:
            return 0.0
        d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(axis=-1))
        return float(d.sum() / (len(x) * (len(x) - 1)))
