"""The Grafana board in cluster/grafana: every series it draws is one rlds exports."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "cluster" / "grafana" / "rlds.json"


def exported_metrics() -> dict[str, str]:
    """name -> kind of every ray.util.metrics metric in rlds' source."""
    found = {}
    for path in (ROOT / "rlds").rglob("*.py"):
        for kind, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"(rlds_\w+)\"", path.read_text()):
            found[name] = kind
    return found


def test_the_board_draws_only_what_rlds_exports_and_all_the_issue_names():
    board = json.loads(BOARD.read_text())
    exported = exported_metrics()
    suffix = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
    drawn = set()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            for series in re.findall(r"ray_(rlds_\w+)", target["expr"]):
                name = next((n for n in exported if series in (n + s for s in suffix[exported[n]])), None)
                assert name is not None, f"{panel['title']}: {series} is not a series rlds exports"
                drawn.add(name)
    assert {"rlds_samples", "rlds_drops", "rlds_policy_lag", "rlds_replay_depth", "rlds_sampler_idle_ratio",
            "rlds_learner_idle_ratio", "rlds_sample_latency_s", "rlds_reward_latency_s",
            "rlds_learner_update_s", "rlds_weight_publish_s", "rlds_weight_sync_s"} <= drawn
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "session"]


def test_every_drop_reason_is_exported_at_zero_from_the_start(monkeypatch):
    from ray.util import metrics

    from rlds.distributed.replay import DROP_REASONS, ReplayStore

    recorded = []

    class Recorder:
        def __init__(self, name, *args, **kwargs):
            self.name = name

        def _record(self, value, tags=None):
            recorded.append((self.name, value, tags))

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics, kind, Recorder)
    ReplayStore.__ray_actor_class__([4], 8, 0, 30.0)  # the class itself, in this process
    assert sorted(t["reason"] for n, v, t in recorded if n == "rlds_drops" and v == 0) == sorted(DROP_REASONS)
