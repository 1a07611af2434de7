"""`rlds plot`: the curves it draws come from the runs' own figures."""
import json

import yaml

from rlds.cli import main
from rlds.metrics import read_metrics
from rlds.plot import curve_keys


def fake_run(path, name, tasks, iterations=6, every=3):
    path.mkdir(parents=True)
    config = {"name": name, "tasks": [{"name": t} for t in tasks]} if tasks else {"name": name}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for i in range(1, iterations + 1):
        row = {"iteration": i, "samples": 8 * i, "time/iteration_s": 2.0, "reward/mean": 0.1 * i}
        if i > 1 and not tasks:
            row["reward/gain"] = 0.01 * i
        for t in tasks:
            row[f"reward/{t}/mean"] = 0.1 * i
            row[f"reward/{t}/shapes_composition/mean"] = 0.1 * i  # a reward's figure, not a curve of its own
        if i % every == 0:
            row.update({f"val/{t}/mean": 0.2 * i for t in tasks} if tasks else {"val/mean": 0.2 * i})
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_draws_each_tasks_reward_and_validation_for_every_run(tmp_path):
    single = fake_run(tmp_path / "a", "composition", [])
    joint = fake_run(tmp_path / "b", "joint", ["composition", "quality"])
    runs = [(read_metrics(d / "metrics.jsonl"), yaml.safe_load((d / "config.yaml").read_text()))
            for d in (single, joint)]
    assert curve_keys(runs) == ["reward/mean", "reward/composition/mean", "reward/quality/mean", "reward/gain",
                                "val/mean", "val/composition/mean", "val/quality/mean"]
    out = tmp_path / "curves.png"
    assert main(["plot", str(single), str(joint), "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 10_000


def test_plot_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl (is it a run folder?)" in capsys.readouterr().err
