"""A run's config, loaded and checked by every part that owns a choice in it.

`rlds.config` is the schema and the YAML loader, and knows nothing of the rest of rlds. Here each
part checks its own section against its own registry: the objective its algo keys
(`rlds.algo.objectives`), advantage modes (`rlds.algo.advantages`), learning-rate schedules
(`rlds.algo.schedules`), rewards (`rlds.rewards`), prompt sources (`rlds.data.prompts`), the L_pre
set (`rlds.data.pretrain_set`) and the model (`rlds.policy.pipeline`). Every error names the dotted
key and the file (or the override) it came from.
"""
from __future__ import annotations

from typing import Any, Optional

from rlds.algo.advantages import check_advantage
from rlds.algo.objectives import check_objective
from rlds.algo.schedules import check_schedule
from rlds.config import Config, check_config, failer, load_yaml, resolve, task_sections
from rlds.config import with_changes as _with_changes
from rlds.data.pretrain_set import check_pretrain_data
from rlds.data.prompts import check_prompts
from rlds.policy.pipeline import check_model
from rlds.rewards import check_rewards


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Load a training YAML config (or the defaults), apply `key=value` overrides, check every
    section, and fill in the derived defaults (`rlds.config.resolve`)."""
    return resolve(load_yaml(Config, validate, path, overrides))


def validate(c: Config, where: str = "config") -> None:
    fail = failer(where)
    check_config(c, fail)
    for i, (key, task) in enumerate(task_sections(c)):
        check_prompts(task.prompts, key, fail, validation=c.validation.every > 0, group_size=task.images_per_prompt,
                      batch_size=c.sampler.batch_size)
        check_rewards(task.rewards, f"{key}rewards", fail)
        group_key = f"{key}images_per_prompt" if key else "sampler.images_per_prompt"
        own_mode = bool(c.tasks) and c.tasks[i].advantage is not None  # else it is algo.advantage
        mode_key = f"{key}advantage" if own_mode else "algo.advantage"
        check_advantage(task.advantage, mode_key, task.images_per_prompt, group_key, fail)
        for name, size in task.prompts.images_per_prompt_by_set.items():
            check_advantage(task.advantage, mode_key, size, f"{key}prompts.images_per_prompt_by_set.{name}", fail)
    check_objective(c.algo, c.sampling, fail)
    check_schedule(c.algo.lr_schedule, "algo.lr_schedule", fail)
    check_pretrain_data(c.algo, fail)
    check_model(c.model, fail)


def with_changes(c: Config, changes: dict[str, Any]) -> Config:
    """A copy of `c` with dotted keys changed in code (`{"replay.max_staleness": 1}`), checked as a
    loaded config is."""
    return resolve(_with_changes(c, changes, validate))
