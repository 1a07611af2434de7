"""WeightStore: the newest trainable weights, in one place, as PublishedWeights (version, reference).

The learner publishes; samplers pull when they see a newer version. Nobody pushes to a busy actor.
The store puts the weights in the object store itself, so it owns them: they outlive the learner
rank that sent them (Ray frees an object with its owner), and samplers keep loading them while a
failed learner group is rebuilt.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import ray

from rlds.distributed.protocol import PublishedWeights


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self):
        self.latest: Optional[PublishedWeights] = None

    def publish(self, version: int, flat: np.ndarray) -> None:
        """`flat`: the trainable weights as one array (rlds.policy.flatten_trainable)."""
        if version <= self.latest_version():
            raise ValueError(f"weights version {version} published after {self.latest_version()}")
        self.latest = PublishedWeights(version, ray.put(flat))

    def newer_than(self, version: int) -> Optional[PublishedWeights]:
        """The newest weights if they are newer than `version`, else None."""
        if self.latest is not None and self.latest.version > version:
            return self.latest
        return None

    def latest_version(self) -> int:
        return -1 if self.latest is None else self.latest.version
