"""Prompt sources: an inline list, a text file (one prompt a line), or a ShapesWorld task's set."""
from __future__ import annotations

from pathlib import Path

from rlds.config import ConfigError, PromptConfig
from rlds.data.shapes import TASKS, training_prompts

SOURCES = ("items", "file", "shapes")


def check_prompts(p: PromptConfig, key: str, fail) -> None:
    """A task's `prompts` section; `key` is its dotted prefix ("" for a single-task config)."""
    given = [k for k in SOURCES if getattr(p, k)]
    if len(given) != 1:
        fail(f"{key}prompts", f"give one of {key}prompts.items (a list), {key}prompts.file (one prompt a "
             f"line) or {key}prompts.shapes (composition, fairness or quality); got {given or 'none'}")
    if p.shapes and p.shapes not in TASKS:
        fail(f"{key}prompts.shapes", f"{p.shapes!r} is not one of {', '.join(TASKS)}")
    if p.file and not Path(p.file).is_file():
        fail(f"{key}prompts.file", f"file not found: {p.file}")


def prompt_list(task) -> list[str]:
    """The training prompts of a task (or of a single-task Config): anything with `prompts`."""
    p = task.prompts
    if p.shapes:
        return training_prompts(p.shapes)
    if p.file:
        lines = Path(p.file).read_text().splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    else:
        prompts = list(p.items)
    if not prompts:
        raise ConfigError(f"prompts: no prompts found in {p.file or 'prompts.items'}")
    return prompts
