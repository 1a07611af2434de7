"""Advantages from terminal rewards: the paper's global batch normalisation, and two options.

- batch: (r - mean) / (std + 1e-7) over the whole global batch, all workers (the paper);
- per_prompt: DDPO's running statistics per prompt, falling back to batch statistics until a
  prompt has been seen `min_count` times;
- group: GRPO-style, each reward minus the mean of its group (the images that share a prompt in this
  batch), divided by the standard deviation of those differences over the batch. One scale for the
  batch, not one per group: a group whose rewards almost tie (four failures that differ in the third
  decimal) gets small advantages, not +-1 made of noise.
All are clamped to +-clip. `task_ids` normalises each task's samples on their own (multi-task).
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Callable, Optional, Sequence

import numpy as np

EPS = 1e-7


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / (x.std() + EPS)


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    return normalise(rewards)


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    centred = np.zeros_like(rewards)
    for g in np.unique(group_ids):
        mask = group_ids == g
        centred[mask] = rewards[mask] - rewards[mask].mean()
    return centred / (centred.std() + EPS)


class PerPromptStatTracker:
    """Running reward statistics per prompt (the last `buffer_size` rewards of each)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[int, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompt_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        out = np.empty_like(rewards)
        for pid in np.unique(prompt_ids):
            self.buffers[int(pid)].extend(rewards[prompt_ids == pid].tolist())
        for pid in np.unique(prompt_ids):
            mask = prompt_ids == pid
            buf = np.asarray(self.buffers[int(pid)])
            ref = buf if len(buf) >= self.min_count else rewards
            out[mask] = (rewards[mask] - ref.mean()) / (ref.std() + EPS)
        return out

    def state_dict(self) -> dict:
        return {str(k): list(v) for k, v in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for k, v in state.items():
            self.buffers[int(k)].extend(v)


def _per_prompt(rewards, prompt_ids, group_ids, tracker: Optional[PerPromptStatTracker]) -> np.ndarray:
    if tracker is None:
        raise ValueError("per_prompt advantages need a PerPromptStatTracker")
    return tracker.update(prompt_ids, rewards)


# name -> estimator(rewards, prompt_ids, group_ids, tracker): the advantage modes a config may name
ADVANTAGES: dict[str, Callable[..., np.ndarray]] = {
    "batch": lambda rewards, prompt_ids, group_ids, tracker: batch_advantages(rewards),
    "per_prompt": _per_prompt,
    "group": lambda rewards, prompt_ids, group_ids, tracker: group_advantages(rewards, group_ids),
}


def check_advantage(mode: str, key: str, images_per_prompt: int, group_key: str, fail) -> None:
    """A config's advantage mode at dotted `key`, for a task whose group size is at `group_key`."""
    if mode not in ADVANTAGES:
        fail(key, f"{mode!r} is not one of {', '.join(ADVANTAGES)}")
    if mode == "group" and images_per_prompt < 2:
        fail(key, f"'group' needs {group_key} of 2 or more")


def compute_advantages(rewards: np.ndarray, mode: str | Sequence[str], clip: float, prompt_ids: np.ndarray,
                       group_ids: Optional[np.ndarray] = None, task_ids: Optional[np.ndarray] = None,
                       tracker: Optional[PerPromptStatTracker] = None) -> np.ndarray:
    """Advantages [B] float32 of one global batch of rewards [B]; `mode` is one for all, or one per
    task (indexed by task id)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if task_ids is None:
        task_ids = np.zeros(len(rewards), dtype=np.int64)
    out = np.zeros_like(rewards)
    for task in np.unique(task_ids):
        m = task_ids == task
        mode_t = mode if isinstance(mode, str) else mode[int(task)]
        if mode_t not in ADVANTAGES:
            raise ValueError(f"unknown advantage mode {mode_t!r}; modes: {', '.join(ADVANTAGES)}")
        groups = None if group_ids is None else group_ids[m]
        out[m] = ADVANTAGES[mode_t](rewards[m], prompt_ids[m], groups, tracker)
    return np.clip(out, -clip, clip).astype(np.float32)
