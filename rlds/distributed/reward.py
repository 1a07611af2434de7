"""Reward actors: one pool per reward, each actor scoring whole sampler batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from rlds.config import RewardConfig
from rlds.rewards.base import checked_images, checked_scores
from rlds.stats import timer


@ray.remote
class RewardActor:
    def __init__(self, name: str, args: dict, torch_threads: int = 1):
        import torch
        from ray.util import metrics

        from rlds.rewards import build_reward

        torch.set_num_threads(torch_threads)
        self.name = name
        self.reward = build_reward(name, args)
        self.latency = metrics.Histogram(
            "rlds_reward_latency_s", "Seconds to score one sampler batch",
            boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30], tag_keys=("reward",))
        self.latency.set_default_tags({"reward": name})

    def score(self, images: np.ndarray, prompts: list[str], group_ids: np.ndarray) -> np.ndarray:
        took: dict = {}
        checked_images(self.name, images, len(prompts), getattr(self.reward, "min_image_size", 1))
        with timer("score", took):
            scores = self.reward(images, prompts, group_ids)
        self.latency.observe(took["score"])
        return checked_scores(self.name, scores, len(images))  # any reward class, GroupReward too


def reward_runtime_env(cfg: RewardConfig) -> dict:
    """The Ray environment of a reward's actors: a baked interpreter, the config's pip list, or the
    reward's own shipped pins (a reward whose dependencies clash with rlds'); else rlds' own."""
    from rlds.rewards import reward_class

    if cfg.py_executable:
        return {"py_executable": cfg.py_executable}
    if cfg.pip:
        return {"pip": list(cfg.pip)}
    shipped = getattr(reward_class(cfg.name), "requirements", None)
    if shipped:
        lines = [ln.split("#")[0].strip() for ln in Path(shipped).read_text().splitlines()]
        return {"pip": [ln for ln in lines if ln]}
    return {}


class RewardPool:
    """The actors of one reward; a plain object, so samplers can hold it and call it directly."""

    def __init__(self, cfg: RewardConfig, torch_threads: int):
        self.name = cfg.name
        # Scoring is idempotent: a restarted actor may safely retry the call it died in.
        options = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": 3,
                   "max_task_retries": 1}
        env = reward_runtime_env(cfg)
        if env:
            options["runtime_env"] = env
        self.actors = [RewardActor.options(**options).remote(cfg.name, cfg.args, torch_threads)
                       for _ in range(cfg.num_actors)]

    def score(self, images_ref, prompts: list[str], group_ids: np.ndarray, key: int) -> ray.ObjectRef:
        actor = self.actors[key % len(self.actors)]
        return actor.score.remote(images_ref, prompts, group_ids)
