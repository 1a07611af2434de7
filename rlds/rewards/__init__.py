"""Rewards by name. A config names built-ins (below) or any `package.module:ClassName`."""
from __future__ import annotations

import importlib

from rlds.rewards.base import GroupReward, ImageReward
from rlds.rewards.detector import DetectorComposition
from rlds.rewards.fairness import ClipParity
from rlds.rewards.human_preference import ImageRewardScore
from rlds.rewards.pixel import Brightness, Diversity, JpegCompressibility, JpegIncompressibility
from rlds.rewards.shapes import ShapesComposition, ShapesParity, ShapesQuality

REWARDS = {
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": JpegIncompressibility,
    "brightness": Brightness,
    "diversity": Diversity,
    "shapes_composition": ShapesComposition,
    "shapes_parity": ShapesParity,
    "shapes_quality": ShapesQuality,
    "detector_composition": DetectorComposition,
    "clip_parity": ClipParity,
    "image_reward": ImageRewardScore,
}


def check_rewards(rewards: list, key: str, fail) -> None:
    """A task's `rewards` list at dotted `key`: at least one, each known, each with an actor."""
    if not rewards:
        fail(key, "name at least one reward, e.g. [{name: jpeg_compressibility}]")
    for i, r in enumerate(rewards):
        if r.name not in REWARDS and ":" not in r.name:
            fail(f"{key}[{i}].name", f"unknown reward {r.name!r}; built in: {', '.join(sorted(REWARDS))}, "
                 "or a package.module:ClassName")
        if r.num_actors < 1:
            fail(f"{key}[{i}].num_actors", "must be at least 1")
        if r.pip and r.py_executable:
            fail(f"{key}[{i}]", "give pip (Ray builds the environment) or py_executable (one already on every "
                 "node), not both")


def reward_class(name: str):
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise KeyError(f"unknown reward {name!r}; built in: {', '.join(sorted(REWARDS))}, "
                       "or give package.module:ClassName")
    return getattr(importlib.import_module(module), attr)


def build_reward(name: str, args: dict):
    cls = reward_class(name)
    try:
        reward = cls(**args)
    except TypeError as e:
        raise TypeError(f"reward {name!r}: bad args {args}: {e}") from None
    if not isinstance(reward, (ImageReward, GroupReward)):
        raise TypeError(f"reward {name!r} is neither an ImageReward nor a GroupReward")
    return reward


__all__ = ["REWARDS", "GroupReward", "ImageReward", "build_reward", "check_rewards", "reward_class"]
