"""Prompt sources: an inline list, a text file (one prompt a line), or a ShapesWorld task's set; and
each task's validation split (its own list or file, or ShapesWorld's)."""
from __future__ import annotations

from pathlib import Path

from rlds.config import ConfigError, PromptConfig
from rlds.data.shapes import TASKS, prompts_of, training_prompts

SOURCES = ("items", "file", "shapes")


def check_prompts(p: PromptConfig, key: str, fail, validation: bool = False) -> None:
    """A task's `prompts` section; `key` is its dotted prefix ("" for a single-task config);
    `validation`: the run scores the validation split, so the task must have one."""
    given = [k for k in SOURCES if getattr(p, k)]
    if len(given) != 1:
        fail(f"{key}prompts", f"give one of {key}prompts.items (a list), {key}prompts.file (one prompt a "
             f"line) or {key}prompts.shapes (composition, fairness or quality); got {given or 'none'}")
    if p.shapes and p.shapes not in TASKS:
        fail(f"{key}prompts.shapes", f"{p.shapes!r} is not one of {', '.join(TASKS)}")
    for name in ("file", "validation_file"):
        if getattr(p, name) and not Path(getattr(p, name)).is_file():
            fail(f"{key}prompts.{name}", f"file not found: {getattr(p, name)}")
    if p.shapes and (p.validation_items or p.validation_file):
        fail(f"{key}prompts", "a ShapesWorld task has its own validation split; leave out validation_items "
             "and validation_file")
    if p.validation_items and p.validation_file:
        fail(f"{key}prompts", "give validation_items or validation_file, not both")
    if validation and not (p.shapes or p.validation_items or p.validation_file):
        fail(f"{key}prompts", f"validation.every is on, and this task has no validation prompts: give "
             f"{key}prompts.validation_items (a list) or {key}prompts.validation_file, or set validation.every: 0")


def _read(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def prompt_list(task) -> list[str]:
    """The training prompts of a task (or of a single-task Config): anything with `prompts`."""
    p = task.prompts
    if p.shapes:
        return training_prompts(p.shapes)
    prompts = _read(p.file) if p.file else list(p.items)
    if not prompts:
        raise ConfigError(f"prompts: no prompts found in {p.file or 'prompts.items'}")
    return prompts


def validation_prompts(task) -> list[str]:
    """A task's validation split: never trained on, never the held-out evaluation's."""
    p = task.prompts
    if p.shapes:
        return prompts_of(p.shapes, "validation")
    prompts = _read(p.validation_file) if p.validation_file else list(p.validation_items)
    if not prompts:
        raise ConfigError(f"prompts: no validation prompts in {p.validation_file or 'prompts.validation_items'}")
    return prompts
