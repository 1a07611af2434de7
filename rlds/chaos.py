"""`rlds chaos`: a training run whose actors are killed at random while it runs, and what it survived.

A killer thread in the driver waits for the first iteration, then every `every_s` seconds kills one
actor without warning (`ray.kill`): a sampler, a reward actor or a learner rank, taking the kinds in
a shuffled round so that a short run meets each. A watcher polls the WeightStore's version. The run
must finish, its books must balance (`accounting.json`) and the served policy version must only grow.
The figures go to `chaos.json` in the run folder.

Kills stay within what the run is set to survive: sampler kills within the trainer's restart budget,
learner kills within `learner.max_restarts` and only of a group that has trained an iteration since
it was built (a kill while a group is being rebuilt costs a second restart), and at most 3 kills of
one reward actor (Ray restarts a reward actor itself, up to 3 times, and retries the batch it died
scoring).
"""
from __future__ import annotations

import json
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from rlds.config import Config
from rlds.trainer import MAX_SAMPLER_RESTARTS, Trainer

KINDS = ("sampler", "reward", "learner")
REWARD_ACTOR_KILLS = 3  # RewardPool's max_restarts


@dataclass
class ChaosReport:
    kills: dict = field(default_factory=dict)  # kind -> actors killed
    completed: bool = False
    error: str = ""
    traceback: str = ""
    iterations: int = 0
    restarts: dict = field(default_factory=dict)  # from the last metrics row
    sampled: int = 0
    trained: int = 0
    dropped: dict = field(default_factory=dict)
    unaccounted: int = -1  # trajectories neither trained, dropped nor in flight: must be 0
    versions_seen: int = 0
    versions_only_grow: bool = False
    minutes: float = 0.0

    @property
    def survived(self) -> bool:
        return self.completed and self.unaccounted == 0 and self.versions_only_grow


class Chaos:
    """The killer and the version watcher, on one trainer."""

    def __init__(self, trainer: Trainer, run_dir: Path, kinds=KINDS, every_s: float = 10.0, seed: int = 0):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"chaos kinds {sorted(unknown)}: not one of {', '.join(KINDS)}")
        self.trainer, self.metrics, self.kinds, self.every_s = trainer, run_dir / "metrics.jsonl", list(kinds), every_s
        self.rng = np.random.default_rng(seed)
        self.kills: Counter = Counter()
        self.reward_kills: Counter = Counter()  # actor id -> kills
        self.killed: set[str] = set()  # samplers and learner ranks, dead until the trainer replaces them
        self.group, self.group_rows = None, 0  # the learner group last seen, and the metrics rows then
        self.versions: list[int] = []
        self.stop = threading.Event()

    def _rows(self) -> int:
        return len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0

    def _started(self) -> bool:
        return self._rows() > 0

    def _budget_left(self, kind: str) -> bool:
        c = self.trainer.config
        if kind == "sampler":
            return self.kills[kind] < MAX_SAMPLER_RESTARTS * c.sampler.max_workers
        if kind == "learner":
            return self.kills[kind] < c.learner.max_restarts
        return True

    def _victim(self, kind: str):
        t = self.trainer
        if kind == "sampler":
            actors = [a for a in t.samplers if a is not None and a._actor_id.hex() not in self.killed]
        elif kind == "learner":  # one rank of a group that has trained since it was built
            group = t.learners.actors if t.learners is not None else []
            if t.learners is not self.group:
                self.group, self.group_rows = t.learners, self._rows()
            # Not in the last iterations: a rank killed after the group's last update is never
            # replaced (nothing is left to train), so the kill could not be checked against a restart.
            rows = self._rows()
            trained = self.group_rows < rows < t.config.iterations - 2
            actors = [] if not trained or any(a._actor_id.hex() in self.killed for a in group) else list(group)
        else:
            actors = [a for pools in t.pools for pool in pools for a in pool.actors
                      if self.reward_kills[a._actor_id.hex()] < REWARD_ACTOR_KILLS]
        return actors[self.rng.integers(len(actors))] if actors else None

    def _kill_loop(self) -> None:
        while not self.stop.is_set() and not self._started():
            time.sleep(0.1)
        order: list[str] = []
        while not self.stop.wait(self.every_s):
            if not order:
                order = list(self.rng.permutation(self.kinds))
            kind = order.pop()
            victim = self._victim(kind) if self._budget_left(kind) else None
            if victim is None:
                continue
            if kind == "reward":
                self.reward_kills[victim._actor_id.hex()] += 1
            else:
                self.killed.add(victim._actor_id.hex())
            ray.kill(victim, no_restart=kind != "reward")
            self.kills[kind] += 1

    def _watch_versions(self) -> None:
        while not self.stop.wait(0.2):
            store = getattr(self.trainer, "weights", None)
            if store is None:
                continue
            try:
                version = ray.get(store.latest_version.remote(), timeout=5)
            except Exception:  # noqa: BLE001 (the store is gone: the run is ending)
                continue
            if not self.versions or version != self.versions[-1]:
                self.versions.append(version)

    def run(self) -> ChaosReport:
        report = ChaosReport()
        threads = [threading.Thread(target=f, daemon=True) for f in (self._kill_loop, self._watch_versions)]
        for th in threads:
            th.start()
        start = time.perf_counter()
        try:
            self.trainer.run()
            report.completed = True
        except Exception as e:  # noqa: BLE001 (a run that did not survive is the finding)
            report.error = f"{type(e).__name__}: {e}"
            report.traceback = traceback.format_exc()
        finally:
            self.stop.set()
            for th in threads:
                th.join(timeout=10)
        report.minutes = (time.perf_counter() - start) / 60
        report.kills = {k: self.kills[k] for k in self.kinds}
        report.versions_seen = len(self.versions)
        report.versions_only_grow = all(a < b for a, b in zip(self.versions, self.versions[1:]))
        return report


def run_chaos(config: Config, kinds=KINDS, every_s: float = 10.0, seed: int = 0,
              progress: bool = False) -> tuple[ChaosReport, Path]:
    """Train `config` under chaos; returns the report (also in RUN/chaos.json) and the run folder."""
    from rlds.metrics import read_metrics
    from rlds.trainer import make_run_dir

    run_dir = make_run_dir(config)
    if not config.run_dir:  # the trainer must write where the chaos watches
        from dataclasses import replace

        config = replace(config, run_dir=str(run_dir))
    trainer = Trainer(config, progress=progress)
    report = Chaos(trainer, run_dir, kinds, every_s, seed).run()
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    report.iterations = rows[-1]["iteration"] if rows else 0
    report.restarts = {k.split("/", 1)[1]: v for k, v in (rows[-1] if rows else {}).items()
                       if k.startswith("restarts/")}
    books_path = run_dir / "accounting.json"
    if books_path.exists():
        books = json.loads(books_path.read_text())
        report.sampled, report.trained, report.dropped = books["sampled"], books["trained"], books["dropped"]
        report.unaccounted = books["unaccounted"]
    (run_dir / "chaos.json").write_text(json.dumps({**asdict(report), "survived": report.survived}, indent=2) + "\n")
    return report, run_dir
