"""The run configuration's schema: typed dataclasses, YAML loading, command-line overrides, and the
checks that need nothing but the config itself.

This module knows nothing of the rest of rlds (it imports no rlds module). The parts that own a
choice (the objective, advantage modes, learning-rate schedules, rewards, prompt sources, model
dtypes) keep their own registries and check their own sections; `rlds.configure.load_config`
runs them all. Every error names the dotted key and the file (or the command-line override) it
came from. Nothing is rewritten behind the user's back: a derived default is None until
`resolve` fills it in, and an explicit value is checked, never replaced.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

import yaml


class ConfigError(ValueError):
    pass


Fail = Callable[[str, str], NoReturn]  # fail(dotted key, message): raise a ConfigError naming both

TASK_MOMENTS = ("shared", "per_task")  # algo.task_moments
DEFAULT_BATCH_SIZE = 16  # algo.batch_size of a single-task config that does not set it


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
    dtype: str = "float32"  # rlds.policy.pipeline.DTYPES: float32 | bfloat16 | float16 (compute, autocast)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SamplingConfig:
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 4.0  # 1: no classifier-free guidance (CFG-free sampling and training)
    # [start, end): the fractions of the chain whose steps are stochastic (eta); the others are
    # deterministic DDIM steps (eta 0), and PPO trains only the stochastic ones. None: every step.
    stochastic_window: Optional[list[float]] = None
    # the images of a group (one prompt) start from the same x_T, so with a deterministic prefix they
    # share the chain up to the window and branch there
    shared_prefix: bool = False
    # the scale `rlds eval` and `rlds sample` use, the one the model is used with; default: guidance_scale
    eval_guidance_scale: Optional[float] = None
    resolution: Optional[int] = None  # default: the UNet's sample size times the VAE factor


@dataclass
class PromptConfig:
    # one of: items (inline list), file (one prompt a line), or shapes (a ShapesWorld task's
    # training prompts: composition | fairness | quality; the held-out ones are for `rlds eval`)
    items: list[str] = field(default_factory=list)
    file: Optional[str] = None
    shapes: Optional[str] = None
    # other ShapesWorld sets drawn beside `shapes` in the same batches, set -> its share of the
    # groups drawn (the rest are `shapes`'); e.g. {fairness: 0.25}: one task whose batches mix
    # colour-free prompts with colour-named ones, scored by the task's rewards together
    mix: dict[str, float] = field(default_factory=dict)
    # a ShapesWorld set (prompts.shapes or one of prompts.mix) -> the guidance scale its training
    # groups are sampled at, where it differs from sampling.guidance_scale; e.g. {fairness: 4.0}:
    # colour-free groups sampled as the model is used (nearly all red at the base), the rest CFG-free
    guidance_scale_by_set: dict[str, float] = field(default_factory=dict)
    # a ShapesWorld set -> the size of its training groups, where it differs from the task's
    # images_per_prompt; e.g. {composition: 4} beside groups of 8: more colour-named prompts an
    # iteration, and colour-free groups large enough to show a balance. prompts.mix stays a share of
    # the groups drawn; the last group of a sampler batch comes from a set whose groups fit in it
    images_per_prompt_by_set: dict[str, int] = field(default_factory=dict)
    # or a generated set for real images (rlds.data.generated): relations | occupations, with its
    # seen/unseen split (the unseen part is held out); generated_args: classes_file, relations, ...
    generated: Optional[str] = None
    generated_args: dict[str, Any] = field(default_factory=dict)
    # a file is streamed, each sampler reading its own shard (rlds.data.sources): .txt, .tsv
    # (PartiPrompts), .parquet (DiffusionDB's metadata.parquet); `column` of a table (default Prompt
    # / prompt); the shares of its prompts held out (for evaluation) and for validation, by a hash
    column: str = ""
    heldout_share: float = 0.0
    validation_share: float = 0.0
    # the validation split, scored while training runs (`validation`), never trained on: a list or
    # a file (one prompt a line); a ShapesWorld task has its own (rlds.data.shapes.split)
    validation_items: list[str] = field(default_factory=list)
    validation_file: Optional[str] = None
    # how a list (items or a ShapesWorld set) is drawn from: random (each group's prompt i.i.d.) or
    # passes (shuffled passes over each set, shared by the samplers, rlds.data.prompts.PromptPasses);
    # a file or generated set is always read in shuffled passes, shard by shard
    order: str = "random"


@dataclass
class RewardConfig:
    name: str = ""
    weight: float = 1.0
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)
    # The reward actors' own Ray environment, for dependencies that clash with rlds' (image_reward):
    # pip requirements (default: the reward's shipped pins, if it has any), or an interpreter
    # already installed on every node (a baked cluster image), given as its path.
    pip: list[str] = field(default_factory=list)
    py_executable: Optional[str] = None


@dataclass
class TaskConfig:
    """One task of a multi-task run (the paper's joint training): its prompts, rewards and share.

    Each iteration trains `batch_size` of its trajectories, scored by its rewards and normalised
    within the task. A config without `tasks` is one task made of the top-level prompts and rewards.
    """
    name: str = ""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    batch_size: int = 0  # trajectories of this task per iteration
    images_per_prompt: int = 1  # a group of this many images shares a prompt (group rewards need > 1)
    advantage: Optional[str] = None  # rlds.algo.advantages.ADVANTAGES; default: algo.advantage
    # The task's optimizer step at this times algo.learning_rate. AdamW's step does not scale with
    # the loss, so each task's step moves the weights about as far as any other's: this is how a
    # task gets a smaller say.
    lr_scale: float = 1.0
    # [first, last]: the iterations (1-based, both included) this task trains in, its learning-rate
    # schedule running over them; None: every iteration. Tasks in turn are a curriculum: a task that
    # learns fast and hurts another's learning (fairness beside composition) can come after it.
    iterations: Optional[list[int]] = None

    def window(self, run_iterations: int) -> tuple[int, int]:
        """[start, end): the 0-based iteration indices this task trains in."""
        return (0, run_iterations) if self.iterations is None else (self.iterations[0] - 1, self.iterations[1])

    def active(self, iteration: int, run_iterations: int) -> bool:
        start, end = self.window(run_iterations)
        return start <= iteration < end


@dataclass
class SamplerConfig:
    # a count, or a range [min, max]: min samplers always, and more, up to max, while the cluster has
    # room for them (an autoscaling cluster is asked for that room)
    num_workers: Union[int, list[int]] = 2
    batch_size: int = 4  # trajectories per sampler call; also the learner's micro-batch
    images_per_prompt: int = 1  # a group of this many images shares a prompt (single-task configs)
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]


@dataclass
class LearnerConfig:
    num_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    backend: Optional[str] = None  # default: nccl with GPUs, gloo without
    # A rank that dies or hangs (ray.actor_timeout_s): the group is rebuilt from the last checkpoint,
    # at most this many times in a run; the iterations since that checkpoint are lost.
    max_restarts: int = 3


@dataclass
class AlgoConfig:
    objective: str = "ppo"  # rlds.algo.objectives.OBJECTIVES: ppo, the paper's clipped surrogate
    # global batch: trajectories per iteration, over all learners; None: the sum of the tasks'
    # batch sizes with `tasks`, else 16 (filled in by `resolve`)
    batch_size: Optional[int] = None
    timesteps_per_iteration: int = 5  # K random denoising steps of each trajectory are trained
    optimizer_steps: Optional[int] = None  # per task and iteration; default K (one denoising step each)
    # Train only the first (noisiest) fraction of the denoising steps, where layout, colour and
    # objects are decided; the low-noise steps' log-prob gradients scale with 1/sigma and can drown
    # the rest in noise about fine detail (measured in ShapesWorld: they lowered composition reward).
    noisiest_fraction: float = 1.0
    clip_range: float = 1e-4  # ppo and awm: the clip of the importance ratio (the paper's 1e-4)
    advantage: str = "batch"  # rlds.algo.advantages.ADVANTAGES: batch | per_prompt | group
    advantage_clip: float = 10.0
    per_prompt_buffer: int = 32
    per_prompt_min_count: int = 16
    learning_rate: float = 2e-6
    lr_schedule: str = "constant"  # rlds.algo.schedules.LR_SCHEDULES: constant | linear | cosine
    warmup_iterations: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Multi-task runs: `shared`, one AdamW for every task's step (the paper's joint training), or
    # `per_task`, AdamW moments of each task's own. Shared moments are sized by the task with the
    # largest gradients, which then sets every other task's step too (the fairness task's gradients ran
    # 2-10x the composition task's; docs/results.md, "Tasks side by side and in turn", for what each gave).
    task_moments: str = "shared"
    # A KL to the frozen reference (the base) policy, its weight: for the forward-process objectives
    # the matching form, the mean squared difference of the two outputs at the same x_t.
    kl_beta: float = 0.0
    # nft: the implicit policies' step (DiffusionNFT's beta) and the old policy's soft update after
    # iteration i, old <- eta old + (1 - eta) theta with eta = min(rate * i, max)
    nft_beta: float = 1.0
    # nft, awm: train the guided output (both branches, at the sampler's guidance scale) instead of
    # the conditional one; PPO's log-prob is always the guided step's
    guided_training: bool = False
    # nft, awm: the share of terms trained with the empty prompt instead of the sample's: the
    # unconditional branch, which guidance subtracts at evaluation, then learns from the policy's
    # samples too (docs/results.md, "Where the quality goes": no better than 0 on four ShapesWorld seeds)
    caption_dropout: float = 0.0
    # nft, awm: the noisiest share of noise levels that the chains sampled with guidance (scale above 1,
    # e.g. prompts.guidance_scale_by_set) train on; None: algo.noisiest_fraction. The conditional
    # output fits those samples, and guidance at evaluation amplifies what it fits, the fine detail too
    guided_noisiest_fraction: Optional[float] = None
    # nft, awm: the images of a group (one prompt) are trained at the same noise levels with the same
    # noise. Group advantages sum to zero, so the part of the loss's gradient that comes from the noise
    # draw and not from the image cancels within the group (common random numbers), and what is left
    # is what tells its good images from its bad ones
    group_shared_noise: bool = False
    old_policy_decay_rate: float = 0.001
    old_policy_decay_max: float = 0.5
    # L_pre, the paper's regulariser: one step on beta * noise-prediction MSE after the RL steps,
    # on an image-caption Parquet set (columns `image`: encoded bytes, `caption`: text), or `shapes`:
    # ShapesWorld's own set of colour-naming captions, written to ~/.cache/rlds on first use.
    # The step shares AdamW's moment estimates with the RL steps (the first task's, with per-task
    # moments), so beta also sets how much of each update is RL's: where L_pre's gradients are larger
    # than the policy gradient, a large beta slows RL.
    pretrain_beta: float = 0.0
    pretrain_data: Optional[str] = None
    pretrain_batch_size: int = 16
    # L_pre's noise levels: uniform over [start, end), fractions of the schedule from its clean end
    pretrain_noise_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # L_pre's share of empty captions: RL trains the conditional branch only, and the unconditional
    # one, which guidance at evaluation subtracts, drifts with it unanchored; the base's pretraining
    # dropped 10% of captions
    pretrain_caption_dropout: float = 0.0
    # Hold the guidance direction (conditional minus unconditional output) to the base's at the
    # quietest `guidance_anchor_fraction` of noise levels by moving the unconditional branch, on L_pre's
    # batch and in its step, with this weight (rlds.algo.regularizers.GuidanceAnchor): guidance at
    # evaluation then amplifies what RL changes about layout and colour but not its fine detail. 0: off.
    guidance_anchor_beta: float = 0.0
    guidance_anchor_fraction: float = 0.5


@dataclass
class ReplayConfig:
    max_staleness: int = 0  # 0: the paper's synchronous on-policy loop
    capacity: Optional[int] = None  # default: (max_staleness + 1) * algo.batch_size


@dataclass
class ValidationConfig:
    """Scoring the policy on each task's validation prompts while it trains: fixed prompts and seeds,
    sampled as the model is used (sampling.eval_guidance_scale), scored by the task's rewards, logged
    as val/<task>/... in metrics.jsonl and TensorBoard. The final checkpoint stays the result."""
    every: int = 0  # iterations between validations; 0: off
    images_per_task: int = 16  # per task: images_per_task / images_per_prompt prompts, a group each
    seed: int = 0
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    # Stop early when `stop_metric` (a val/ key, higher is better) has not risen by more than
    # stop_min_delta above its best for stop_patience validations in a row; None: never
    stop_metric: Optional[str] = None
    stop_patience: int = 3
    stop_min_delta: float = 0.0


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS's cluster, else a private one; auto: Ray's discovery
    num_cpus: Optional[int] = None  # only when starting a local instance
    num_gpus: Optional[int] = None
    actor_timeout_s: float = 600.0  # a wait longer than this is a hang and fails the run


@dataclass
class Config:
    name: str = "tiny"
    seed: int = 0
    iterations: int = 10
    run_dir: Optional[str] = None  # default: runs/<name>-<time>
    # a checkpoint folder to continue from, or "auto": run_dir's newest complete checkpoint (a fresh
    # start when it has none yet), so a resubmitted job continues where it was stopped
    resume: Optional[str] = None
    checkpoint_every: int = 10
    keep_checkpoints: Optional[int] = None  # the newest k are kept; None: all
    sample_grid_every: int = 5
    evaluate: bool = False  # after training, `rlds eval` the final checkpoint against the base (ShapesWorld)
    # torch threads per actor; None: the CPUs the actor owns (its section's num_cpus, at least 1), so
    # that actors which share a machine's cores by their Ray CPUs do not oversubscribe them
    torch_threads: Optional[int] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    tasks: list[TaskConfig] = field(default_factory=list)  # multi-task: these instead of prompts/rewards
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
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
        inner = [a for a in args if a is not type(None)]
        for choice in inner[:-1]:  # the first that fits
            try:
                return _convert(value, choice, where)
            except ConfigError:
                pass
        try:
            return _convert(value, inner[-1], where)
        except ConfigError:
            if len(inner) == 1:
                raise
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in inner)}, "
                          f"got {type(value).__name__} {value!r}")
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
    _set_dotted(data, key, value, f"command-line override {item!r}")


def _set_dotted(data: dict, key: str, value, what: str) -> None:
    """Set `a.b.c` (or an entry of a list that the file has: `tasks[1].lr_scale`)."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        name, index = _indexed(part, what)
        nxt = node.get(name)
        if index is not None:
            if not isinstance(nxt, list) or index >= len(nxt):
                have = f"{len(nxt)} entries" if isinstance(nxt, list) else "no list there"
                raise ConfigError(f"{what}: {'.'.join(parts[:i] + [name])} has no entry {index} ({have})")
            nxt = nxt[index]
        elif isinstance(nxt, list) and i + 1 < len(parts) and parts[i + 1].isdigit():
            raise ConfigError(f"{what}: a list entry is named {name}[N], e.g. {name}[0].{parts[-1]}")
        if nxt is None:
            nxt = node[name] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _indexed(part: str, what: str) -> tuple[str, Optional[int]]:
    """`tasks[1]` -> ("tasks", 1); `algo` -> ("algo", None)."""
    if "[" not in part:
        return part, None
    match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
    if match is None:
        raise ConfigError(f"{what}: {part!r} is not name or name[N]")
    return match.group(1), int(match.group(2))


def with_changes(config, changes: dict[str, Any], check):
    """A copy of `config` with dotted keys set in code (`{"replay.max_staleness": 1}`; a list, such as
    `rewards`, is set whole), rebuilt and checked by `check(config, where)` as a loaded config is."""
    data = dataclasses.asdict(config)
    for key, value in changes.items():
        _set_dotted(data, key, value, f"change {key}={value!r}")
    label = "a config changed in code"
    changed = _build(type(config), data, f"{label}: ")
    check(changed, label)
    return changed


def failer(where: str) -> Fail:
    """The `fail(key, message)` that every section check calls: a ConfigError naming the source."""
    def fail(key: str, message: str) -> NoReturn:
        raise ConfigError(f"{where}: {key}: {message}")
    return fail


def global_batch_size(c: Config) -> int:
    """Trajectories per iteration: algo.batch_size, or its default (see AlgoConfig.batch_size)."""
    if c.algo.batch_size is not None:
        return c.algo.batch_size
    return sum(t.batch_size for t in c.tasks) if c.tasks else DEFAULT_BATCH_SIZE


def resolve(c: Config) -> Config:
    """A copy with the derived defaults filled in (algo.batch_size), as config.yaml records it."""
    return dataclasses.replace(c, algo=dataclasses.replace(c.algo, batch_size=global_batch_size(c)))


def machine_cores() -> int:
    """The cores this process may run on (its affinity), which a container can set below os.cpu_count()."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def actor_threads(c: Config, num_cpus: float, stage: Optional[str] = None) -> int:
    """torch threads for an actor that owns `num_cpus` Ray CPUs (`torch_threads`).

    A synchronous run (`replay.max_staleness: 0`) has its samplers and learners take turns: each
    side waits while the other works. So a `stage` ('sampler' or 'learner') of such a run also gets
    its share of the other side's CPUs, up to this machine's cores. An asynchronous run's stages work
    at once, where more threads than CPUs oversubscribe the cores (README, Benchmarks)."""
    if c.torch_threads:
        return c.torch_threads
    cpus = num_cpus
    if stage is not None and c.replay.max_staleness == 0:
        side = {"sampler": c.sampler.num_cpus * c.sampler.max_workers,
                "learner": c.learner.num_cpus * c.learner.num_workers}
        cpus = min(num_cpus * sum(side.values()) / side[stage], machine_cores())
    return max(1, int(cpus))


def check_config(c: Config, fail: Fail) -> None:
    """What the config can check by itself: counts, sizes that must divide, and the rules of tasks.
    Each part checks its own choices (rlds.configure)."""
    if c.iterations < 1:
        fail("iterations", "must be at least 1")
    if c.torch_threads is not None and c.torch_threads < 1:
        fail("torch_threads", "must be at least 1 (or null: the CPUs each actor owns)")
    a = c.algo
    if c.tasks:
        if c.rewards or any(getattr(c.prompts, k) for k in ("items", "file", "shapes")):
            fail("tasks", "a multi-task config names prompts and rewards in each task, not at the top level")
        if c.sampler.images_per_prompt != 1:
            fail("sampler.images_per_prompt", "with tasks, set images_per_prompt in each task")
        names = [t.name for t in c.tasks]
        for i, t in enumerate(c.tasks):
            if not t.name or t.name in names[:i]:
                fail(f"tasks[{i}].name", f"each task needs a name of its own; got {names}")
        for i, t in enumerate(c.tasks):
            w = t.iterations
            if w is not None and (len(w) != 2 or not 1 <= w[0] <= w[1] <= c.iterations):
                fail(f"tasks[{i}].iterations", f"{w} is not [first, last] with 1 <= first <= last <= iterations "
                     f"({c.iterations})")
        idle = [it + 1 for it in range(c.iterations) if not any(t.active(it, c.iterations) for t in c.tasks)]
        if idle:
            fail("tasks", f"no task trains in iteration{'s' if len(idle) > 1 else ''} "
                 f"{', '.join(map(str, idle[:5]))}{' ...' if len(idle) > 5 else ''}: give each one a task "
                 "(tasks[].iterations)")
        total = sum(t.batch_size for t in c.tasks)
        if a.batch_size is not None and a.batch_size != total:
            fail("algo.batch_size", f"with tasks it is the sum of the tasks' batch sizes ({total}), not "
                 f"{a.batch_size}; leave it out")
    elif a.batch_size is not None and a.batch_size < 1:
        fail("algo.batch_size", "must be at least 1")
    for key, t in task_sections(c):
        _check_task_sizes(t, key, c, fail)
    if not 0 < a.noisiest_fraction <= 1:
        fail("algo.noisiest_fraction", "must be in (0, 1]")
    if c.resume == "auto" and not c.run_dir:
        fail("resume", "auto continues the run in run_dir: set run_dir=... too (the same folder every time)")
    if c.keep_checkpoints is not None and c.keep_checkpoints < 1:
        fail("keep_checkpoints", "must be 1 or more (or null: keep every checkpoint)")
    n = c.sampler.num_workers
    if (isinstance(n, int) and n < 1) or (isinstance(n, list) and (len(n) != 2 or not 1 <= n[0] <= n[1])):
        fail("sampler.num_workers", f"{n} is neither a count of at least 1 nor a range [min, max] with 1 <= min <= max")
    if c.learner.max_restarts < 0:
        fail("learner.max_restarts", "must be 0 (a failed learner rank ends the run) or more")
    if c.replay.max_staleness < 0:
        fail("replay.max_staleness", "must be 0 or more")
    batch = global_batch_size(c)
    if c.replay.capacity is not None and c.replay.capacity < batch:
        fail("replay.capacity", f"must hold at least one batch (algo.batch_size = {batch})")
    if a.pretrain_beta < 0:
        fail("algo.pretrain_beta", "must be 0 (off) or more")
    r = a.pretrain_noise_range
    if len(r) != 2 or not 0 <= r[0] < r[1] <= 1:
        fail("algo.pretrain_noise_range", f"{r} is not [start, end) with 0 <= start < end <= 1, fractions of the "
             "noise schedule from its clean end, e.g. [0.5, 1] for its noisiest half")
    if not 0 <= a.pretrain_caption_dropout < 1:
        fail("algo.pretrain_caption_dropout", "must be in [0, 1): the share of L_pre's captions replaced by \"\"")
    if a.guidance_anchor_beta < 0:
        fail("algo.guidance_anchor_beta", "must be 0 (off) or more")
    if a.guidance_anchor_beta > 0 and a.pretrain_beta == 0:
        fail("algo.guidance_anchor_beta", "the anchor is taken in L_pre's step, on its batch: set algo.pretrain_beta "
             "(and algo.pretrain_data) too")
    if not 0 < a.guidance_anchor_fraction <= 1:
        fail("algo.guidance_anchor_fraction", "must be in (0, 1]: the quietest share of noise levels the anchor holds")
    if a.guided_noisiest_fraction is not None and not 0 < a.guided_noisiest_fraction <= 1:
        fail("algo.guided_noisiest_fraction",
             "must be in (0, 1]: the noisiest share of noise levels that the guided chains train on")
    if not 0 <= a.caption_dropout < 1:
        fail("algo.caption_dropout", "must be in [0, 1): the share of nft and awm terms trained with the empty prompt")
    if a.task_moments not in TASK_MOMENTS:
        fail("algo.task_moments", f"{a.task_moments!r} is not one of {', '.join(TASK_MOMENTS)}")
    if c.sampling.eta < 0:
        fail("sampling.eta", "must be 0 (deterministic DDIM) or more")
    w = c.sampling.stochastic_window
    if w is not None and (len(w) != 2 or not 0 <= w[0] < w[1] <= 1):
        fail("sampling.stochastic_window", f"{w} is not [start, end) with 0 <= start < end <= 1, "
             "fractions of the chain, e.g. [0, 0.5] for its first half")
    if c.sampling.eval_guidance_scale is not None and c.sampling.eval_guidance_scale < 1:
        fail("sampling.eval_guidance_scale", "must be 1 (no guidance) or more")
    _check_validation(c, fail)


def _check_validation(c: Config, fail: Fail) -> None:
    v = c.validation
    if v.every < 0:
        fail("validation.every", "must be 0 (off) or a number of iterations")
    if v.every == 0:
        if v.stop_metric is not None:
            fail("validation.stop_metric", "stopping early needs validation: set validation.every")
        return
    for key, t in task_sections(c):
        if v.images_per_task < t.images_per_prompt or v.images_per_task % t.images_per_prompt:
            group_key = f"{key}images_per_prompt" if key else "sampler.images_per_prompt"
            fail("validation.images_per_task", f"{v.images_per_task} is not a multiple of {group_key} "
                 f"({t.images_per_prompt}): each validation prompt gets a whole group")
    if v.stop_patience < 1:
        fail("validation.stop_patience", "must be at least 1 (validations without improvement)")
    keys = validation_keys(c)
    if v.stop_metric is not None and v.stop_metric not in keys:
        fail("validation.stop_metric", f"{v.stop_metric!r} is not a validation figure of this run; one of "
             f"{', '.join(keys)}")


def validation_keys(c: Config) -> list[str]:
    """The figures a validation logs: each task's mean reward and each of its rewards' means, under
    val/<task>/ (val/ alone for a single-task config, as reward/ is)."""
    tasks = task_list(c)
    keys = []
    for t in tasks:
        prefix = validation_prefix(t.name, len(tasks))
        keys += [f"{prefix}mean"] + [f"{prefix}{r.name}/mean" for r in t.rewards]
    return keys


def validation_prefix(task: str, task_count: int) -> str:
    """Where a task's validation figures go: val/<task>/, or val/ alone in a single-task run."""
    return f"val/{task}/" if task_count > 1 else "val/"


def _check_task_sizes(t: TaskConfig, key: str, c: Config, fail: Fail) -> None:
    """One task's sizes; `key` is its dotted prefix ("" for a single-task config)."""
    s = c.sampler
    group_key = f"{key}images_per_prompt" if key else "sampler.images_per_prompt"
    size_key = f"{key}batch_size" if key else "algo.batch_size"
    if t.images_per_prompt < 1:
        fail(group_key, "must be at least 1")
    if t.lr_scale <= 0:
        fail(f"{key}lr_scale", "must be above 0 (1: the task steps at algo.learning_rate)")
    if s.batch_size % t.images_per_prompt:
        fail("sampler.batch_size", f"{s.batch_size} is not a multiple of {group_key} ({t.images_per_prompt})")
    if t.batch_size < s.batch_size or t.batch_size % s.batch_size:
        fail(size_key, f"{t.batch_size} is not a positive multiple of sampler.batch_size ({s.batch_size})")
    chunks = t.batch_size // s.batch_size
    if chunks % c.learner.num_workers:
        fail("learner.num_workers", f"the {chunks} sampler batches of {size_key} ({size_key} / "
             f"sampler.batch_size) must split evenly over {c.learner.num_workers} learners")


def task_sections(c: Config) -> list[tuple[str, TaskConfig]]:
    """(dotted prefix, task) of each task, the prefix "" for a single-task config's one task."""
    if c.tasks:
        return [(f"tasks[{i}].", t) for i, t in enumerate(task_list(c))]
    return [("", task_list(c)[0])]


def task_list(c: Config) -> list[TaskConfig]:
    """The run's tasks: `tasks`, or the one task the top-level prompts and rewards make; each with its
    advantage mode resolved (a task without one uses algo.advantage)."""
    if c.tasks:
        return [dataclasses.replace(t, advantage=t.advantage or c.algo.advantage) for t in c.tasks]
    return [TaskConfig(name=c.name, prompts=c.prompts, rewards=c.rewards, batch_size=global_batch_size(c),
                       images_per_prompt=c.sampler.images_per_prompt, advantage=c.algo.advantage)]


def to_dict(c: Config) -> dict:
    return dataclasses.asdict(c)


def dump_config(c: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
