"""The one place the newest policy weights live: (version, ObjectRef of one flat buffer).

The learner publishes; samplers pull when they see a newer version. Nobody pushes to a busy actor.
"""
from __future__ import annotations

from typing import Optional

import ray


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self):
        self.version = -1
        self.ref: Optional[ray.ObjectRef] = None

    def publish(self, version: int, wrapped: list) -> None:
        # The ref comes wrapped in a list so that Ray hands over the reference, not the buffer.
        if version <= self.version:
            raise ValueError(f"weights version {version} published after {self.version}")
        self.version, self.ref = version, wrapped[0]

    def newer_than(self, version: int):
        """(version, [ref]) when the store holds something newer than `version`, else None."""
        if self.version > version:
            return self.version, [self.ref]
        return None

    def latest_version(self) -> int:
        return self.version
