"""The two reward protocols.

- `ImageReward` scores each image on its own: r(x_0, c).
- `GroupReward` scores a group of images made from one prompt at once (a distribution-level reward,
  e.g. the paper's statistical parity); every image of the group gets the group's reward.

Both are called the same way by reward actors: `reward(images, prompts, group_ids) -> [B] float`.
Images are uint8 arrays [B, H, W, 3].
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class ImageReward(ABC):
    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """One float per image."""

    def __call__(self, images: np.ndarray, prompts: list[str], group_ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.score(images, prompts), dtype=np.float32).reshape(len(images))


class GroupReward(ABC):
    @abstractmethod
    def score_group(self, images: np.ndarray, prompt: str) -> float:
        """One float for a group of images that share `prompt`."""

    def __call__(self, images: np.ndarray, prompts: list[str], group_ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(images), dtype=np.float32)
        for g in np.unique(group_ids):
            idx = np.flatnonzero(group_ids == g)
            out[idx] = self.score_group(images[idx], prompts[idx[0]])
        return out
