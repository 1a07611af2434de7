"""Prompt sources: an inline list, a text file (one prompt a line), a ShapesWorld task's set or a
generated set for real images, or several ShapesWorld sets mixed by shares (`prompts.mix`); and each
task's validation split (its own list or file, or the set's)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from rlds.config import ConfigError, PromptConfig
from rlds.data.generated import KINDS, generated_args
from rlds.data.shapes import TASKS, prompts_of, training_prompts
from rlds.data.sources import FORMATS, FileSource, GeneratedSource, first_prompts, read_prompts

SOURCES = ("items", "file", "shapes", "generated")
ORDERS = ("random", "passes")


def check_prompts(p: PromptConfig, key: str, fail, validation: bool = False, group_size: int = 1,
                  batch_size: int = 1) -> None:
    """A task's `prompts` section; `key` is its dotted prefix ("" for a single-task config);
    `validation`: the run scores the validation split, so the task must have one; `group_size` and
    `batch_size`: the task's images_per_prompt and sampler.batch_size."""
    given = [k for k in SOURCES if getattr(p, k)]
    if len(given) != 1:
        fail(f"{key}prompts", f"give one of {key}prompts.items (a list), {key}prompts.file (one prompt a "
             f"line), {key}prompts.shapes (composition, fairness or quality) or {key}prompts.generated "
             f"({' or '.join(KINDS)}); got {given or 'none'}")
    if p.shapes and p.shapes not in TASKS:
        fail(f"{key}prompts.shapes", f"{p.shapes!r} is not one of {', '.join(TASKS)}")
    if p.mix:
        if not p.shapes:
            fail(f"{key}prompts.mix", f"mixes ShapesWorld sets into {key}prompts.shapes; give that too")
        for name, share in p.mix.items():
            if name not in TASKS or name == p.shapes:
                fail(f"{key}prompts.mix.{name}", f"not a ShapesWorld set other than {p.shapes!r} "
                     f"(one of {', '.join(t for t in TASKS if t != p.shapes)})")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
                fail(f"{key}prompts.mix.{name}", f"a share of the groups drawn, in (0, 1); got {share!r}")
        if sum(p.mix.values()) >= 1:
            fail(f"{key}prompts.mix", f"the shares add up to {sum(p.mix.values())}, leaving "
                 f"{key}prompts.shapes ({p.shapes}) none; keep their sum below 1")
    drawn = [name for name, _ in _shapes_sets(p)] if p.shapes else []
    for name, scale in p.guidance_scale_by_set.items():
        if name not in drawn:
            fail(f"{key}prompts.guidance_scale_by_set.{name}", "not a ShapesWorld set this task draws "
                 f"({key}prompts.shapes or one of {key}prompts.mix)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 1:
            fail(f"{key}prompts.guidance_scale_by_set.{name}", f"a guidance scale, 1 (none) or more; got {scale!r}")
    for name, size in p.images_per_prompt_by_set.items():
        where = f"{key}prompts.images_per_prompt_by_set.{name}"
        if name not in drawn:
            fail(where, f"not a ShapesWorld set this task draws ({key}prompts.shapes or one of {key}prompts.mix)")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            fail(where, f"a group size, a whole number of images, 1 or more; got {size!r}")
    if p.images_per_prompt_by_set:
        # a batch fills exactly when what is left of it is always a multiple of the smallest group
        sizes = [p.images_per_prompt_by_set.get(name, group_size) for name in drawn]
        for name, size in zip(drawn, sizes):
            if size % min(sizes) or batch_size % size:
                fail(f"{key}prompts.images_per_prompt_by_set", f"{name}: groups of {size} must divide "
                     f"sampler.batch_size ({batch_size}) and be a multiple of the smallest group ({min(sizes)})")
    if p.order not in ORDERS:
        fail(f"{key}prompts.order", f"{p.order!r} is not one of {', '.join(ORDERS)}")
    if p.order == "passes" and not (p.items or p.shapes):
        fail(f"{key}prompts.order", "passes is for a list (prompts.items or prompts.shapes); a file or a "
             "generated set is always read in shuffled passes")
    if p.generated and p.generated not in KINDS:
        fail(f"{key}prompts.generated", f"{p.generated!r} is not one of {', '.join(KINDS)}")
    if p.generated_args and not p.generated:
        fail(f"{key}prompts.generated_args", f"only with {key}prompts.generated")
    if p.generated:
        generated_args(p.generated_args, f"{key}prompts.generated_args", fail)
    for name in ("file", "validation_file"):
        if getattr(p, name) and not Path(getattr(p, name)).is_file():
            fail(f"{key}prompts.{name}", f"file not found: {getattr(p, name)}")
    if p.file and Path(p.file).suffix.lower() not in FORMATS and Path(p.file).suffix:
        fail(f"{key}prompts.file", f"{p.file}: read as text, tsv or parquet by its suffix ({', '.join(FORMATS)})")
    if (p.column or p.heldout_share or p.validation_share) and not p.file:
        fail(f"{key}prompts", "column, heldout_share and validation_share are for prompts.file")
    for name in ("heldout_share", "validation_share"):
        if not 0.0 <= getattr(p, name) < 1.0:
            fail(f"{key}prompts.{name}", f"must be in [0, 1); got {getattr(p, name)}")
    if p.heldout_share + p.validation_share >= 1.0:
        fail(f"{key}prompts", "heldout_share + validation_share leave no training prompts")
    if p.validation_share and (p.validation_items or p.validation_file):
        fail(f"{key}prompts", "give validation_share (a split of prompts.file) or validation_items/_file, not both")
    if (p.shapes or p.generated) and (p.validation_items or p.validation_file):
        fail(f"{key}prompts", "a ShapesWorld or generated set has its own validation split; leave out "
             "validation_items and validation_file")
    if p.validation_items and p.validation_file:
        fail(f"{key}prompts", "give validation_items or validation_file, not both")
    if validation and not (p.shapes or p.generated or p.validation_share or p.validation_items or p.validation_file):
        fail(f"{key}prompts", f"validation.every is on, and this task has no validation prompts: give "
             f"{key}prompts.validation_items (a list) or {key}prompts.validation_file, or set validation.every: 0")


def prompt_source(task) -> FileSource | GeneratedSource | None:
    """A task's streamed source (`prompts.file` or `prompts.generated`), which its samplers read
    shard by shard; None for an inline list or a ShapesWorld set, which every sampler holds."""
    p = task.prompts
    if p.file:
        return FileSource(p.file, p.column, p.heldout_share, p.validation_share)
    return GeneratedSource(p.generated, _args(p)) if p.generated else None


def prompt_list(task, limit: int = 4096) -> list[str]:
    """The training prompts of a task (or of a single-task Config): anything with `prompts`. Of a
    streamed source, its first `limit` training prompts (what a benchmark or a check needs)."""
    p = task.prompts
    if p.shapes:
        return [prompt for name, _ in _shapes_sets(p) for prompt in training_prompts(name)]
    source = prompt_source(task)
    prompts = first_prompts(source, "train", limit) if source else list(p.items)
    if not prompts:
        raise ConfigError(f"prompts: no training prompts in {p.file or 'prompts.items'}")
    return prompts


def prompt_weights(task) -> Optional[np.ndarray]:
    """The probability of drawing each of `prompt_list(task)`'s prompts for a group: None (uniform)
    unless `prompts.mix` gives sets their shares, each spread evenly over its own prompts."""
    if not task.prompts.mix:
        return None
    weights = [np.full(len(training_prompts(name)), share / len(training_prompts(name)))
               for name, share in _shapes_sets(task.prompts)]
    return np.concatenate(weights)


def prompt_group_sizes(task) -> Optional[np.ndarray]:
    """The size of the training group each of `prompt_list(task)`'s prompts is drawn in: None (all
    task.images_per_prompt) unless `prompts.images_per_prompt_by_set` names a set."""
    by_set = task.prompts.images_per_prompt_by_set
    if not by_set:
        return None
    return np.array([by_set.get(name, task.images_per_prompt) for name, _ in _shapes_sets(task.prompts)
                     for _ in training_prompts(name)], np.int64)


def draw_groups(rng: np.random.Generator, count: int, images: int, group_size: int,
                weights: Optional[np.ndarray] = None, sizes: Optional[np.ndarray] = None) -> np.ndarray:
    """The prompts (indices of `count`) of a batch's groups, in order, filling `images` images:
    drawn with probabilities `weights` (None: uniform), each group `sizes[i]` images (None: all
    `group_size`). With sizes that differ, a prompt whose group does not fit in what is left of the
    batch is not drawn there, so the last groups of a batch come from the smaller ones."""
    if sizes is None:
        return (rng.integers(count, size=images // group_size) if weights is None else
                rng.choice(count, size=images // group_size, p=weights))
    p = np.full(count, 1.0 / count) if weights is None else np.asarray(weights, np.float64)
    drawn, left = [], images
    while left:
        fits = np.where(sizes <= left, p, 0.0)
        if not fits.sum():
            raise ValueError(f"draw_groups: no group fits the {left} images left of the batch "
                             f"(sizes {sorted(set(sizes.tolist()))})")
        drawn.append(int(rng.choice(count, p=fits / fits.sum())))
        left -= int(sizes[drawn[-1]])
    return np.array(drawn, np.int64)


class PromptPasses:
    """A list task's groups drawn in shuffled passes (`prompts.order: passes`): each set of prompts
    (`prompts.shapes` and each `prompts.mix` set; an inline list is one set) is gone through in a
    shuffled order before any of its prompts comes again, the samplers taking turns in one order per
    pass (sampler i draws places i, i + count, ... of it). So a run spreads over as many prompts as it
    draws groups, where i.i.d. draws leave about 1/e of them unseen after one pass's worth.
    Which set a group comes from keeps the sets' shares (the set furthest behind its share goes next,
    among those whose groups fit in what is left of the batch). The state is the number of batches
    drawn (`position`): a resumed or restarted sampler replays the choice of sets, not the prompts."""

    def __init__(self, sets: list[tuple[int, float, int]], images: int, index: int, count: int, seed: int,
                 batches: int = 0):
        """`sets`: (prompts, share of the groups, group size) of each set, in `prompt_list` order;
        `images` a batch; `index` of `count` samplers; `batches` already drawn (resuming)."""
        self.sizes = np.array([n for n, _, _ in sets], np.int64)
        self.shares = np.array([share for _, share, _ in sets], np.float64)
        self.group_sizes = np.array([g for _, _, g in sets], np.int64)
        self.starts = np.cumsum([0, *self.sizes[:-1]])
        self.images, self.index, self.count, self.seed = images, index, count, seed
        self.credit = np.zeros(len(sets))
        self.taken = np.zeros(len(sets), np.int64)  # this sampler's groups from each set so far
        self.batches = 0
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # set -> (pass, its shuffled order)
        for _ in range(batches):
            np.add.at(self.taken, self._choose_sets(), 1)

    @property
    def position(self) -> tuple[int, int]:
        return 0, self.batches

    def _choose_sets(self) -> list[int]:
        chosen, left = [], self.images
        while left > 0:
            self.credit += self.shares
            fits = np.where(self.group_sizes <= left, self.credit, -np.inf)
            s = int(np.argmax(fits))
            if not np.isfinite(fits[s]):
                raise ValueError(f"PromptPasses: no group fits the {left} images left of the batch "
                                 f"(sizes {sorted(set(self.group_sizes.tolist()))})")
            self.credit[s] -= self.shares.sum()
            chosen.append(s)
            left -= int(self.group_sizes[s])
        self.batches += 1
        return chosen

    def _place(self, s: int) -> int:
        epoch, at = divmod(int(self.taken[s]) * self.count + self.index, int(self.sizes[s]))
        self.taken[s] += 1
        if self._orders.get(s, (None,))[0] != epoch:
            self._orders[s] = epoch, np.random.default_rng([self.seed, s, epoch]).permutation(int(self.sizes[s]))
        return int(self.starts[s] + self._orders[s][1][at])

    def draw(self) -> np.ndarray:
        """The prompts (indices into the task's list) of the next batch's groups."""
        return np.array([self._place(s) for s in self._choose_sets()], np.int64)


def prompt_passes(task) -> Optional[list[tuple[int, float, int]]]:
    """What `PromptPasses` needs of a task with `prompts.order: passes`, (prompts, share, group size)
    a set; None for i.i.d. draws."""
    p = task.prompts
    if p.order != "passes":
        return None
    if not p.shapes:
        return [(len(p.items), 1.0, task.images_per_prompt)]
    return [(len(training_prompts(name)), share, p.images_per_prompt_by_set.get(name, task.images_per_prompt))
            for name, share in _shapes_sets(p)]


def prompt_sets(task) -> Optional[list[str]]:
    """The ShapesWorld set each of `prompt_list(task)`'s prompts comes from (`prompts.mix`), else None:
    a mixed task's figures per set, since a reward that scores one set only is 0 on the others."""
    if not task.prompts.mix:
        return None
    return [name for name, _ in _shapes_sets(task.prompts) for _ in training_prompts(name)]


def prompt_guidance_scales(task, default: float) -> Optional[np.ndarray]:
    """The guidance scale each of `prompt_list(task)`'s prompts is sampled at in training: None (all
    at `default`, sampling.guidance_scale) unless `prompts.guidance_scale_by_set` names a set."""
    by_set = task.prompts.guidance_scale_by_set
    if not by_set:
        return None
    return np.array([float(by_set.get(name, default)) for name, _ in _shapes_sets(task.prompts)
                     for _ in training_prompts(name)], np.float32)


def validation_prompt_sets(task) -> list[tuple[list[str], float]]:
    """A task's validation prompts as (prompts, share of the validation images) pairs: one pair,
    or one for each set `prompts.mix` draws from, so that each is validated in its share."""
    p = task.prompts
    if p.mix:
        return [(prompts_of(name, "validation"), share) for name, share in _shapes_sets(p)]
    return [(validation_prompts(task), 1.0)]


def validation_prompts(task) -> list[str]:
    """A task's validation split: never trained on, never the held-out evaluation's."""
    p = task.prompts
    if p.shapes:
        return [prompt for name, _ in _shapes_sets(p) for prompt in prompts_of(name, "validation")]
    if p.generated or p.validation_share:
        return first_prompts(prompt_source(task), "validation", 1024)
    prompts = list(read_prompts(FileSource(p.validation_file))) if p.validation_file else list(p.validation_items)
    if not prompts:
        raise ConfigError(f"prompts: no validation prompts in {p.validation_file or 'prompts.validation_items'}")
    return prompts


def _shapes_sets(p: PromptConfig) -> list[tuple[str, float]]:
    """(ShapesWorld set, its share of the groups drawn): `shapes` takes what `mix` leaves."""
    return [(p.shapes, 1.0 - sum(p.mix.values())), *p.mix.items()]


def _args(p: PromptConfig):
    def fail(key, why):
        raise ConfigError(f"{key}: {why}")
    return generated_args(p.generated_args, "prompts.generated_args", fail)
