"""Validator: scores a weights version on every task's validation prompts while training goes on.

The same prompts and seeds every time, sampled as the model is used (sampling.eval_guidance_scale),
each prompt a whole group (a group-level reward such as parity needs one), scored by the task's own
reward pools. It holds its own copy of the policy, so neither the samplers nor the learners wait.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from rlds.config import Config, actor_threads, validation_prefix
from rlds.distributed.protocol import ValidationResult


@dataclass
class ValidationTask:
    name: str
    prompts: list[str]  # the validation prompts, one group each
    images_per_prompt: int
    pools: list  # the task's RewardPools
    weights: dict[str, float]  # reward name -> its weight in the task's reward


def validation_set(prompts: list[str], images: int, group: int) -> list[str]:
    """`images // group` prompts spread evenly over the split, each repeated for its group."""
    count = min(len(prompts), images // group)
    picked = [prompts[i] for i in np.linspace(0, len(prompts), count, endpoint=False).astype(int)]
    return [p for p in picked for _ in range(group)]


def mixed_validation_set(sets: list[tuple[list[str], float]], images: int, group: int) -> list[str]:
    """`validation_set` of each (prompts, share) pair with its share of the images, at least one
    group each when there are several, so that every set a task mixes is validated."""
    if len(sets) == 1:
        return validation_set(sets[0][0], images, group)
    return [p for prompts, share in sets
            for p in validation_set(prompts, max(group, round(images * share / group) * group), group)]


@ray.remote
class Validator:
    def __init__(self, config: Config, tasks: list[ValidationTask], device: str = "cpu"):
        import torch

        from rlds.policy import load_policy

        torch.set_num_threads(actor_threads(config, config.validation.num_cpus))
        if device == "cpu" and ray.get_gpu_ids():
            device = "cuda"
        self.config, self.tasks = config, tasks
        self.policy = load_policy(config.model, device)

    def validate(self, weight_store) -> ValidationResult:
        """The newest published weights, scored on every task's validation set."""
        from rlds.distributed.weights import WeightLoader
        from rlds.policy import load_flat_trainable, sample_trajectories
        from rlds.policy.sampling import eval_sampling

        start = time.perf_counter()
        loader = WeightLoader(weight_store)
        newest = loader.newer_than(-1)
        if newest is None:
            raise RuntimeError("Validator.validate: the WeightStore holds no weights yet; validate after the "
                               "first publication (the trainer publishes version 0 before it starts)")
        version, weights = newest
        load_flat_trainable(self.policy.unet, weights)
        loader.release()
        sampling, seed = eval_sampling(self.config.sampling), self.config.validation.seed
        figures = {}
        for task in self.tasks:
            prompts = task.prompts
            g = task.images_per_prompt
            # a group shares nothing but its prompt: its images are seeds seed, seed + 1, ...
            seeds = [seed + i % g + 1000 * (i // g) for i in range(len(prompts))]
            traj = sample_trajectories(self.policy, prompts, sampling, seeds=seeds, keep_chain=False)
            images, group_ids = ray.put(traj.images), np.repeat(np.arange(len(prompts) // g), g)
            scores = {pool.name: pool.score(images, prompts, group_ids, 0) for pool in task.pools}
            scores = {name: np.asarray(value) for name, value in zip(scores, ray.get(list(scores.values())))}
            prefix = validation_prefix(task.name, len(self.tasks))
            for name, value in scores.items():
                figures[f"{prefix}{name}/mean"] = float(np.mean(value))
            figures[f"{prefix}mean"] = float(np.mean(sum(task.weights[n] * v for n, v in scores.items())))
        return ValidationResult(version, figures, time.perf_counter() - start)


class EarlyStopping:
    """validation.stop_*: stop when the figure has not risen above its best by more than
    `min_delta` for `patience` validations in a row (a NaN never counts as a rise)."""

    def __init__(self, metric: str, patience: int, min_delta: float):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.best, self.best_version, self.stale = -np.inf, None, 0

    def should_stop(self, result: ValidationResult) -> bool:
        value = result.figures[self.metric]
        if value > self.best + self.min_delta:
            self.best, self.best_version, self.stale = value, result.version, 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    def reason(self) -> str:
        return (f"{self.metric} has not risen above its best ({self.best:.4g}, iteration {self.best_version}) "
                f"by more than {self.min_delta} for {self.stale} validations")
