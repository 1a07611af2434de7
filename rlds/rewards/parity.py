"""The paper's distribution-level fairness reward, over any attribute classifier.

For a group G of images made from one prompt, a classifier gives each image a label among the
attribute's classes A, or NONE when the image has nothing to classify (no person in a portrait, no
shape on a canvas). Then

    R(G) = -[(1 - s_none) * SP(classified labels) + s_none * SP_worst],   SP = sum_a (share_a - 1/|A|)^2

with s_none the share of NONE and SP_worst = 1 - 1/|A|, the parity of a one-class group. An image
without a subject is thus counted apart, never given a class, and costs as much as the worst case: a
group cannot buy balance by drawing nothing. Each image gets R(G) plus its leave-one-out credit
(`rlds.rewards.base.leave_one_out_credit`).
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np

from rlds.rewards.base import GroupReward, leave_one_out_credit

NONE = "none"


def statistical_parity(labels, classes) -> float:
    """sum_a (share_a - 1/|A|)^2 over the classified labels (NONE left out); 0 = balanced.

    With no classified label at all, the worst value 1 - 1/|A| (all of one class)."""
    labels = [lab for lab in labels if lab != NONE]
    if not labels:
        return 1.0 - 1.0 / len(classes)
    unknown = set(labels) - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the classes {list(classes)}")
    shares = np.array([labels.count(a) for a in classes], np.float64) / len(labels)
    return float(((shares - 1.0 / len(classes)) ** 2).sum())


def parity_reward(labels: list[str], classes) -> float:
    """R(G) of the module docstring, in [-(1 - 1/|A|), 0]."""
    s_none = labels.count(NONE) / len(labels)
    worst = 1.0 - 1.0 / len(classes)
    return -((1 - s_none) * statistical_parity(labels, classes) + s_none * worst)


class ParityReward(GroupReward):
    """A GroupReward made of a classifier: subclasses give `classes` and `labels`. Every image of a
    batch is classified at once (one batched forward for a neural classifier), then scored by group."""

    classes: tuple[str, ...] = ()

    @abstractmethod
    def labels(self, images: np.ndarray, prompts: list[str]) -> list[str]:
        """One label per image: one of `classes`, or NONE."""

    def score_group(self, images, prompt):
        return parity_reward(self.labels(images, [prompt] * len(images)), self.classes)

    def __call__(self, images, prompts, group_ids):
        labels = self.labels(images, list(prompts))
        out = np.empty(len(images), dtype=np.float32)
        for g in np.unique(group_ids):
            idx = np.flatnonzero(group_ids == g)
            group = [labels[i] for i in idx]
            out[idx] = leave_one_out_credit(
                lambda keep: parity_reward([group[i] for i in keep], self.classes), len(idx))
        return out
