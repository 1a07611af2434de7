"""The two reward protocols.

- `ImageReward` scores each image on its own: r(x_0, c).
- `GroupReward` scores a group of images made from one prompt at once (a distribution-level reward,
  e.g. the paper's statistical parity). Each image gets the group's reward R(G) plus its own share
  of the credit, centred so that the group's mean is still exactly R(G) (see `member_values`).

Both are called the same way by reward actors: `reward(images, prompts, group_ids) -> [B] float`.
Images are uint8 arrays [B, H, W, 3]; a reward that cannot score images smaller than some size says so
with `min_image_size` (pixels, both sides), and the actor refuses smaller ones (`checked_images`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np


class ImageReward(ABC):
    min_image_size = 1

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """One float per image."""

    def __call__(self, images: np.ndarray, prompts: list[str], group_ids: np.ndarray) -> np.ndarray:
        return checked_scores(type(self).__name__, self.score(images, prompts), len(images))


class GroupReward(ABC):
    min_image_size = 1

    @abstractmethod
    def score_group(self, images: np.ndarray, prompt: str) -> float:
        """One float for a group of images that share `prompt`."""

    def member_values(self, images: np.ndarray, prompt: str) -> np.ndarray:
        """What each image of the group is credited with (`leave_one_out_credit`)."""
        return leave_one_out_credit(lambda idx: self.score_group(images[idx], prompt), len(images))

    def __call__(self, images: np.ndarray, prompts: list[str], group_ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(images), dtype=np.float32)
        for g in np.unique(group_ids):
            idx = np.flatnonzero(group_ids == g)
            out[idx] = self.member_values(images[idx], prompts[idx[0]])
        return out


def leave_one_out_credit(score: Callable[[np.ndarray], float], size: int) -> np.ndarray:
    """Per member i of a group G of `size`: R(G) - R(G without i) + mean_j R(G without j), where
    `score(indices)` is R of the members at those indices.

    A reward shared by the whole group credits a blue circle in a red group as much as the reds beside
    it, so the policy gradient learns only from differences between groups, slowly. The leave-one-out
    difference R(G) - R(G without i) is member i's own contribution, and since R(G without i) does not
    depend on member i it is a baseline: the gradient estimate stays unbiased (it is the gradient of the
    same group reward) with far less variance. The last term puts the group's mean back at exactly R(G),
    so reward metrics and the signal between groups are unchanged.
    """
    every = np.arange(size)
    whole = score(every)
    if size < 2:
        return np.full(size, whole)
    without = np.array([score(np.delete(every, i)) for i in range(size)])
    return whole - without + without.mean()


def checked_scores(name: str, scores, count: int) -> np.ndarray:
    """One float per image, or an error that says what the reward returned instead (a non-finite
    score is let through: the store drops and counts it as `nan_reward`)."""
    try:
        out = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {name!r} returned scores that are not numbers ({type(scores).__name__}: {e})")
    if out.shape != (count,):
        raise ValueError(f"reward {name!r} returned scores of shape {out.shape} for {count} images; "
                         f"it must return one number per image, shape ({count},)")
    return out


def checked_images(name: str, images, count: int, min_size: int = 1) -> np.ndarray:
    """The batch a reward scores: uint8 [count, H, W, 3] with H and W at least `min_size`, or an error
    that names the reward, what it was given and what it needs."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"reward {name!r} was given images as {got}; it scores uint8 [B, H, W, 3]")
    if len(images) != count:
        raise ValueError(f"reward {name!r} was given {len(images)} images for {count} prompts")
    h, w = images.shape[1:3]
    if min(h, w) < min_size:
        raise ValueError(f"reward {name!r} needs images of at least {min_size}x{min_size} pixels and was given "
                         f"{h}x{w}: the model's images (model.source) are too small for it")
    return images
