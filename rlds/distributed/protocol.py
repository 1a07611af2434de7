"""What the actors exchange, defined once.

    SamplerLoop ──SampledBatch──▶ ReplayStore ──TrainingBatch──▶ Trainer
    Trainer ──LearnerShard (one per rank)──▶ LearnerActor ──UpdateResult──▶ Trainer
    LearnerActor ──PublishedWeights──▶ WeightStore ──PublishedWeights──▶ SamplerLoop, Validator
    Validator ──ValidationResult──▶ Trainer

Ray resolves an ObjectRef passed as a top-level argument of a remote call into its value, and
passes a reference nested inside another object on as a reference. Every message that carries a
reference is a dataclass here, so references travel as references: no other module wraps one in
a list to keep Ray from fetching it, or unwraps one. What is fetched is fetched by `ray.get` where
it is needed (`LearnerShard.fetch`, a WeightLoader taking `PublishedWeights.flat`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import ray

from rlds.stats import reduce_metrics


@dataclass
class SampledBatch:
    """One sampler batch as its sampler hands it to the store, its rewards still being computed."""
    sampler: str  # the actor id of the sampler that made (and owns) it
    task: int
    trajectory: ray.ObjectRef  # a rlds.policy.Trajectory
    scores: dict[str, ray.ObjectRef]  # reward name -> [B] float32 scores, from the reward pools
    version: int  # the weights version that sampled it
    prompt_ids: np.ndarray  # [B] int64
    group_ids: np.ndarray  # [B] int64: images that share a prompt share a group
    image_stats: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [B] (rlds.stats.image_stats)
    created: float = field(default_factory=time.time)
    # a streamed prompt file: the sampler's (epoch, drawn) in its shard after drawing this batch
    prompt_position: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def scored(self, scores: dict[str, np.ndarray]) -> "ScoredBatch":
        return ScoredBatch(self.sampler, self.task, self.trajectory, scores, self.version,
                           self.prompt_ids, self.group_ids, self.created, self.image_stats, self.prompt_position)


@dataclass
class ScoredBatch:
    """A sampler batch with every reward's scores in."""
    sampler: str
    task: int
    trajectory: ray.ObjectRef
    scores: dict[str, np.ndarray]  # reward name -> [B] float32
    version: int
    prompt_ids: np.ndarray
    group_ids: np.ndarray
    created: float
    image_stats: dict[str, np.ndarray] = field(default_factory=dict)
    prompt_position: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class TrainingBatch:
    """One iteration's global batch, as the store hands it to the trainer: sampler batches, task by task."""
    parts: list[ScoredBatch]
    learner_version: int  # the weights version it is trained from

    @property
    def tasks(self) -> list[int]:
        return [p.task for p in self.parts]

    @property
    def trajectories(self) -> list[ray.ObjectRef]:
        return [p.trajectory for p in self.parts]

    @property
    def prompt_ids(self) -> np.ndarray:
        return np.concatenate([p.prompt_ids for p in self.parts])

    @property
    def group_ids(self) -> np.ndarray:
        return np.concatenate([p.group_ids for p in self.parts])

    @property
    def lags(self) -> list[int]:
        """Policy lag of each sampler batch: learner version minus the version that sampled it."""
        return [self.learner_version - p.version for p in self.parts]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


@dataclass
class LearnerShard:
    """One learner rank's share of an iteration: its sampler batches and their advantages."""
    trajectories: list[ray.ObjectRef]
    advantages: list[np.ndarray]  # one [B] float32 array per trajectory
    tasks: list[int]  # the task of each trajectory
    iteration: int
    groups: Optional[list[np.ndarray]] = None  # one [B] int64 array of group ids per trajectory

    def fetch(self) -> Optional[list]:
        """The trajectories, or None when one is lost (its sampler died after handing it on)."""
        try:
            return ray.get(self.trajectories)
        except ray.exceptions.ObjectLostError:
            return None


@dataclass
class UpdateResult:
    """What a learner rank reports after an update. `lost`: the batch could not be trained (every
    rank skipped it together), and there are no statistics."""
    stats: dict[str, float] = field(default_factory=dict)
    lost: bool = False

    @staticmethod
    def reduce(results: list["UpdateResult"]) -> "UpdateResult":
        """The ranks' results as one (rlds.stats.reduce_metrics); lost if any rank lost the batch."""
        if any(r.lost for r in results):
            return UpdateResult(lost=True)
        return UpdateResult(reduce_metrics(r.stats for r in results))


@dataclass(frozen=True)
class PublishedWeights:
    """A version of the trainable weights: one flat float32 buffer (rlds.policy.flatten_trainable),
    in the object store (`flat`) or, for readers on the WeightStore's node, in a shared-memory slot
    there (`slot`, a path: rlds.distributed.weight_slots)."""
    version: int
    flat: Optional[ray.ObjectRef] = None
    slot: Optional[str] = None


@dataclass(frozen=True)
class ValidationResult:
    """The validation figures of one weights version (rlds.config.validation_keys name them)."""
    version: int
    figures: dict[str, float]
    seconds: float
