"""The paper's distribution-level fairness reward, over any attribute classifier.

For a group G of images made from one prompt, a classifier gives each image a label among the
attribute's classes A, or NONE when the image has nothing to classify (no person in a portrait, no
shape on a canvas). Then

    R(G) = -[(1 - s_none) * SP(classified labels) + s_none * SP_worst],   SP = sum_a (share_a - 1/|A|)^2

with s_none the share of NONE and SP_worst = 1 - 1/|A|, the parity of a one-class group. An image
without a subject is thus counted apart, never given a class, and costs as much as the worst case: a
group cannot buy balance by drawing nothing. Each image gets R(G) plus its leave-one-out credit
(`rlds.rewards.base.leave_one_out_credit`).

`soft` = s in [0, 1] mixes in the same R over expected shares (each image's class probabilities in
place of its one-hot label): (1 - s) R(labels) + s R(probabilities). A group of one class scores all
its images alike under labels, so group advantages learn nothing from it; under probabilities the
image least sure of that class still scores above the rest. A confident classifier leaves little
between its images (the base ShapesWorld model's reds: p(red) above 0.999 for most), so the
probabilities are first tempered, p^(1/T) renormalised (`soft_temperature` T; for the ShapesWorld
detector's Gaussian colour posterior T = 4 doubles its colour scale). An image the classifier gives
no class (NONE) stays a row of zeros: it cannot buy balance under either. Images of no clear class
still come nearer balance under probabilities (four shapes each half red, half yellow score as two
red and two yellow), so the labels should keep a share.
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


def one_hot(labels: list[str], classes) -> np.ndarray:
    """[n, |A|] rows: 1 at each label's class, a row of zeros for NONE."""
    unknown = set(labels) - set(classes) - {NONE}
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the classes {list(classes)}")
    return np.array([[label == a for a in classes] for label in labels], np.float64).reshape(len(labels), len(classes))


def parity_reward(labels: list[str], classes) -> float:
    """R(G) of the module docstring over labels, in [-(1 - 1/|A|), 0]."""
    return expected_parity_reward(one_hot(labels, classes))


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T) renormalised, row by row; rows of zeros (NONE) stay zeros."""
    probs = np.asarray(probs, np.float64)
    if temperature == 1:
        return probs
    out = probs ** (1.0 / temperature)
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def expected_parity_reward(probs: np.ndarray) -> float:
    """R(G) over expected shares: `probs` [n, |A|] holds each image's class probabilities, a row of
    zeros for NONE; one-hot rows give R(G) of their labels."""
    probs = np.asarray(probs, np.float64)
    worst = 1.0 - 1.0 / probs.shape[1]
    classified = probs.sum(1) > 0
    s_none = 1.0 - classified.mean()
    if not classified.any():
        return -worst
    shares = probs[classified].mean(0)
    return -((1 - s_none) * float(((shares - 1.0 / probs.shape[1]) ** 2).sum()) + s_none * worst)


class ParityReward(GroupReward):
    """A GroupReward made of a classifier: subclasses give `classes` and `probabilities`. Every image
    of a batch is classified at once (one batched forward for a neural classifier), then scored by
    group. `soft` and `soft_temperature` (module docstring) are set by `set_soft`."""

    classes: tuple[str, ...] = ()
    soft: float = 0.0
    soft_temperature: float = 1.0

    def set_soft(self, soft: float, temperature: float, name: str) -> None:
        if not 0.0 <= soft <= 1.0:
            raise ValueError(f"{name}: soft {soft} is not a share in [0, 1] (0: labels only; rlds.rewards.parity)")
        if not temperature >= 1.0:
            raise ValueError(f"{name}: soft_temperature {temperature} is below 1 (1: the classifier's own "
                             "probabilities; higher spreads them; rlds.rewards.parity)")
        self.soft, self.soft_temperature = float(soft), float(temperature)

    @abstractmethod
    def probabilities(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """[B, |A|]: each image's probabilities over `classes`, a row of zeros where it is NONE."""

    def labels(self, images: np.ndarray, prompts: list[str]) -> list[str]:
        """One label per image: its most likely class, or NONE."""
        return _labels(self.probabilities(images, prompts), self.classes)

    def group_reward(self, probs: np.ndarray) -> float:
        """R(G) from the group's probabilities [n, |A|] (module docstring)."""
        hard = parity_reward(_labels(probs, self.classes), self.classes)
        if self.soft == 0:
            return hard
        return (1 - self.soft) * hard + self.soft * expected_parity_reward(tempered(probs, self.soft_temperature))

    def score_group(self, images, prompt):
        return self.group_reward(self.probabilities(images, [prompt] * len(images)))

    def __call__(self, images, prompts, group_ids):
        probs = self.probabilities(images, list(prompts))
        group_ids = np.asarray(group_ids)
        out = np.empty(len(images), dtype=np.float32)
        for g in np.unique(group_ids):
            group = probs[group_ids == g]
            out[group_ids == g] = leave_one_out_credit(lambda keep: self.group_reward(group[keep]), len(group))
        return out


def _labels(probs: np.ndarray, classes) -> list[str]:
    return [classes[int(p.argmax())] if p.sum() > 0 else NONE for p in probs]
