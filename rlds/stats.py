"""One timer and one metric reduction, for every part that reports figures.

A key ending in `/min` reduces by the minimum, one ending in `/max` by the maximum, every other key
by the mean over the rows that have it. The same rule holds over the terms of one update, over the
tasks of an iteration and over the learner ranks, so a figure means the same wherever it is read.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Mapping

import numpy as np


def reduce_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Many rows of figures into one (see the module docstring); keys come out sorted."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            values.setdefault(key, []).append(float(value))
    out = {}
    for key in sorted(values):
        v = values[key]
        out[key] = min(v) if key.endswith("/min") else max(v) if key.endswith("/max") else sum(v) / len(v)
    return out


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image figures that move when a reward is hacked (washed-out, saturated or flat images),
    each [B] in [0, 1], from uint8 images [B, H, W, 3]."""
    x = images.astype(np.float32) / 255.0
    return {"brightness": x.mean(axis=(1, 2, 3)), "contrast": x.std(axis=(1, 2, 3)),
            "saturation": (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2))}


def group_diagnostics(rewards: np.ndarray, group_ids: np.ndarray) -> dict[str, float]:
    """The share of groups (images of one prompt) whose rewards all tie, which give group-relative
    advantages nothing to learn from, and the mean spread of rewards within a group."""
    groups = [rewards[group_ids == g] for g in np.unique(group_ids)]
    return {"zero_std_groups": float(np.mean([np.ptp(r) == 0 for r in groups])),
            "group_std": float(np.mean([r.std() for r in groups]))}


@contextlib.contextmanager
def timer(key: str, into: dict) -> Iterator[None]:
    """Add the seconds the block takes to `into[key]` (created at 0), also when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


class FirstDrawBaseline:
    """A reward's rise with the prompt draw taken out.

    An iteration's mean reward moves with which prompts it drew as much as with learning (ShapesWorld:
    a single shape scores about 0.8, a relation about 0.3, and eight groups an iteration). So each
    prompt's first group's mean is kept, and a later group of the same prompt reports its mean minus
    that: 0 in expectation while nothing is learnt, above 0 when the policy scores better on prompts
    it has seen drawn before. Up to `max_entries` (reward, prompt) pairs get a baseline (one float
    each, saved in checkpoints); a stream that never repeats a prompt reports nothing.
    """

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self.first: dict[str, float] = {}  # "reward|prompt id" -> that prompt's first group mean

    def gains(self, reward: str, scores: np.ndarray, prompt_ids: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
        """One figure per group of a prompt drawn in an earlier group; records the new prompts."""
        out = []
        for g in np.unique(group_ids):
            mine = group_ids == g
            key, mean = f"{reward}|{int(prompt_ids[mine][0])}", float(np.mean(scores[mine]))
            if key in self.first:
                out.append(mean - self.first[key])
            elif len(self.first) < self.max_entries:
                self.first[key] = mean
        return np.asarray(out, np.float64)

    def state_dict(self) -> dict:
        return {"first": dict(self.first)}

    def load_state_dict(self, state: dict) -> None:
        self.first = {str(k): float(v) for k, v in state.get("first", {}).items()}
