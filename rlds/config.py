"""The run configuration: typed dataclasses, YAML loading with validation, CLI overrides.

Every error names the dotted key and the file (or the command-line override) it came from.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TinyModelConfig:
    """A random-weight text-to-image model built in-process (same on every actor for a seed)."""
    sample_size: int = 16
    in_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    text_layers: int = 2
    max_prompt_length: int = 16
    seed: int = 0


@dataclass
class ModelConfig:
    # "tiny" builds TinyModelConfig; anything else is a hub id or a local diffusers folder.
    source: str = "tiny"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    revision: Optional[str] = None
    dtype: str = "float32"  # weights and activations: float32 | bfloat16 | float16
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SamplingConfig:
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 4.0
    resolution: Optional[int] = None  # default: the UNet's sample size times the VAE factor


@dataclass
class PromptConfig:
    # one of: items (inline list), file (one prompt a line), or shapes (a ShapesWorld task's
    # training prompts: composition | fairness | quality; the held-out ones are for `rlds eval`)
    items: list[str] = field(default_factory=list)
    file: Optional[str] = None
    shapes: Optional[str] = None


@dataclass
class RewardConfig:
    name: str = ""
    weight: float = 1.0
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)
    pip: list[str] = field(default_factory=list)  # own Ray runtime_env, for clashing dependencies


@dataclass
class SamplerConfig:
    num_workers: int = 2
    batch_size: int = 4  # trajectories per sampler call; also the learner's micro-batch
    images_per_prompt: int = 1  # a group of this many images shares a prompt
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class LearnerConfig:
    num_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    backend: Optional[str] = None  # default: nccl with GPUs, gloo without


@dataclass
class AlgoConfig:
    batch_size: int = 16  # global batch: trajectories per iteration, over all learners
    timesteps_per_iteration: int = 5  # K random denoising steps, one optimizer step each
    clip_range: float = 1e-4
    advantage: str = "batch"  # batch | per_prompt | group
    advantage_clip: float = 10.0
    per_prompt_buffer: int = 32
    per_prompt_min_count: int = 16
    learning_rate: float = 2e-6
    lr_schedule: str = "constant"  # constant | linear | cosine
    warmup_iterations: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # L_pre, the paper's regulariser: one step on beta * noise-prediction MSE after the RL steps,
    # on an image-caption Parquet set (columns `image`: encoded bytes, `caption`: text).
    pretrain_beta: float = 0.0
    pretrain_data: Optional[str] = None
    pretrain_batch_size: int = 16


@dataclass
class ReplayConfig:
    max_staleness: int = 0  # 0: the paper's synchronous on-policy loop
    capacity: Optional[int] = None  # default: (max_staleness + 1) * algo.batch_size


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: join a running cluster if there is one, else start one
    num_cpus: Optional[int] = None  # only when starting a local instance
    num_gpus: Optional[int] = None
    actor_timeout_s: float = 600.0  # a wait longer than this is a hang and fails the run


@dataclass
class Config:
    name: str = "tiny"
    seed: int = 0
    iterations: int = 10
    run_dir: Optional[str] = None  # default: runs/<name>-<time>
    resume: Optional[str] = None  # a checkpoint folder to continue from
    checkpoint_every: int = 10
    sample_grid_every: int = 5
    torch_threads: int = 1  # per actor; several actors share the cores
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    """Check `value` against annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{_join(where, key)}: unknown key (known keys here: {', '.join(sorted(known))})")
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(where: str, key) -> str:
    prefix, _, path = where.rpartition(": ")
    path = f"{path}.{key}" if path else str(key)
    return f"{prefix}: {path}" if prefix else path


# ---------------------------------------------------------------- public API


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Load a training YAML config (or the defaults), apply `key=value` overrides, validate."""
    return load_yaml(Config, validate, path, overrides)


def load_yaml(schema, check, path: Optional[str], overrides: tuple[str, ...]):
    """Any rlds config: read with yaml.safe_load, override, build `schema`, `check(config, where)`."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys")
    for item in overrides:
        _apply_override(data, item)
    label = source if not overrides else f"{source} + command-line overrides"
    config = _build(schema, data, f"{label}: ")
    check(config, label)
    return config


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command-line override {item!r}: expected key=value, e.g. iterations=20")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if isinstance(nxt, list) and i + 1 < len(parts) and parts[i + 1].isdigit():
            raise ConfigError(f"command-line override {item!r}: list entries are set in the file")
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"command-line override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def validate(c: Config, where: str = "config") -> None:
    def fail(key, msg):
        raise ConfigError(f"{where}: {key}: {msg}")

    if c.iterations < 1:
        fail("iterations", "must be at least 1")
    if not c.rewards:
        fail("rewards", "name at least one reward, e.g. [{name: jpeg_compressibility}]")
    from rlds.rewards import REWARDS  # late: rewards import torch
    for i, r in enumerate(c.rewards):
        if r.name not in REWARDS and ":" not in r.name:
            fail(f"rewards[{i}].name", f"unknown reward {r.name!r}; built in: {', '.join(sorted(REWARDS))}, "
                 "or a package.module:ClassName")
        if r.num_actors < 1:
            fail(f"rewards[{i}].num_actors", "must be at least 1")
    given = [k for k in ("items", "file", "shapes") if getattr(c.prompts, k)]
    if len(given) != 1:
        fail("prompts", "give one of prompts.items (a list), prompts.file (one prompt a line) or "
             f"prompts.shapes (composition, fairness or quality); got {given or 'none'}")
    if c.prompts.shapes and c.prompts.shapes not in ("composition", "fairness", "quality"):
        fail("prompts.shapes", f"{c.prompts.shapes!r} is not one of composition, fairness, quality")
    if c.prompts.file and not Path(c.prompts.file).is_file():
        fail("prompts.file", f"file not found: {c.prompts.file}")
    s, a = c.sampler, c.algo
    if s.batch_size % s.images_per_prompt:
        fail("sampler.batch_size", f"{s.batch_size} is not a multiple of sampler.images_per_prompt ({s.images_per_prompt})")
    if a.batch_size % s.batch_size:
        fail("algo.batch_size", f"{a.batch_size} is not a multiple of sampler.batch_size ({s.batch_size})")
    chunks = a.batch_size // s.batch_size
    if chunks % c.learner.num_workers:
        fail("learner.num_workers", f"the {chunks} sampler batches of an iteration (algo.batch_size / "
             f"sampler.batch_size) must split evenly over {c.learner.num_workers} learners")
    if not 1 <= a.timesteps_per_iteration <= c.sampling.num_steps:
        fail("algo.timesteps_per_iteration", f"must be between 1 and sampling.num_steps ({c.sampling.num_steps})")
    if a.advantage not in ("batch", "per_prompt", "group"):
        fail("algo.advantage", f"{a.advantage!r} is not one of batch, per_prompt, group")
    if a.advantage == "group" and s.images_per_prompt < 2:
        fail("algo.advantage", "'group' needs sampler.images_per_prompt of 2 or more")
    if a.lr_schedule not in ("constant", "linear", "cosine"):
        fail("algo.lr_schedule", f"{a.lr_schedule!r} is not one of constant, linear, cosine")
    if c.model.dtype not in ("float32", "bfloat16", "float16"):
        fail("model.dtype", f"{c.model.dtype!r} is not one of float32, bfloat16, float16")
    if c.replay.max_staleness < 0:
        fail("replay.max_staleness", "must be 0 or more")
    if c.replay.capacity is not None and c.replay.capacity < a.batch_size:
        fail("replay.capacity", f"must hold at least one batch (algo.batch_size = {a.batch_size})")
    if a.pretrain_beta < 0:
        fail("algo.pretrain_beta", "must be 0 (off) or more")
    if a.pretrain_beta > 0:
        if not a.pretrain_data:
            fail("algo.pretrain_data", "algo.pretrain_beta > 0 needs an image-caption Parquet file or folder")
        if not Path(a.pretrain_data).exists():
            fail("algo.pretrain_data", f"not found: {a.pretrain_data}")
    if c.sampling.eta <= 0:
        fail("sampling.eta", "must be above 0: the policy needs a stochastic DDIM step")


def to_dict(c: Config) -> dict:
    return dataclasses.asdict(c)


def dump_config(c: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(c), sort_keys=False))


def prompt_list(c: Config) -> list[str]:
    if c.prompts.shapes:
        from rlds.data.shapes import training_prompts

        return training_prompts(c.prompts.shapes)
    if c.prompts.file:
        lines = Path(c.prompts.file).read_text().splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    else:
        prompts = list(c.prompts.items)
    if not prompts:
        raise ConfigError(f"prompts: no prompts found in {c.prompts.file or 'prompts.items'}")
    return prompts
