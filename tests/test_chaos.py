"""Chaos: samplers, reward actors and learner ranks killed at random while a run trains."""
import json

import pytest

from rlds.chaos import run_chaos
from rlds.metrics import read_metrics

pytestmark = pytest.mark.timeout(420)


def test_a_run_survives_its_actors_being_killed(ray_local, tiny_config, tmp_path):
    # long enough, on a quiet machine too, for every kind to come round a few times (a kill every 2 s)
    config = tiny_config(f"run_dir={tmp_path}", "iterations=40", "learner.num_workers=2", "checkpoint_every=2",
                         "replay.max_staleness=1", "ray.actor_timeout_s=240")
    report, run_dir = run_chaos(config, every_s=2.0, seed=0)
    assert report.completed, report.error
    assert all(report.kills[kind] >= 1 for kind in ("sampler", "reward", "learner")), report.kills
    assert report.unaccounted == 0 and report.versions_only_grow and report.versions_seen > 5
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 41))  # nothing repeated, nothing skipped
    assert rows[-1]["restarts/learner"] == report.kills["learner"]
    assert rows[-1]["restarts/sampler"] == report.kills["sampler"]
    saved = json.loads((run_dir / "chaos.json").read_text())
    assert saved["survived"] and saved["kills"] == report.kills
