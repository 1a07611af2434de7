"""`rlds compare`: runs' evaluations read against the must-hold lines, and their spread over runs."""
import json
import subprocess
import sys

import pytest

from rlds.compare import compare_table, run_figures


def _figures(composition, parity, single, quality):
    return {"composition": {"accuracy": composition}, "single_object": {"accuracy": single, "accuracy_se": 0.05},
            "fairness": {"per_prompt": parity}, "quality": {"mean": quality, "se": 0.004}}


def _run(folder, composition, parity, quality, rewards):
    (folder / "eval").mkdir(parents=True)
    base = _figures(0.15, [0.7, 0.8], 0.80, 0.618)
    (folder / "eval" / "eval.json").write_text(json.dumps(
        {"base": base, "tuned": _figures(composition, parity, 0.81, quality)}))
    rows = [{"iteration": i, "reward/composition/shapes_composition/mean": c,
             "reward/composition/shapes_parity/mean": 0.0, "reward/fairness/shapes_parity/mean": p}
            for i, (c, p) in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_compare_reads_each_run_paired_against_the_lines_and_summarises_over_runs(tmp_path):
    rising = [(0.2 + 0.01 * i, -0.6 + 0.01 * i) for i in range(40)]
    falling = [(0.2 + 0.01 * i, -0.2 - 0.01 * i) for i in range(40)]
    good = run_figures(_run(tmp_path / "good", 0.27, [0.35, 0.45], 0.620, rising))
    weak = run_figures(_run(tmp_path / "weak", 0.20, [0.6, 0.7], 0.600, falling))
    assert good.composition == pytest.approx(12.0) and good.parity == pytest.approx(-46.667, abs=1e-3)
    assert good.quality_line == pytest.approx(0.614) and good.single_line == pytest.approx(75.0)
    assert good.misses() == []
    # the colour-named groups' parity series is 0 throughout (a reward scoring none of that set): left out
    assert set(good.rewards) == {"reward/composition/shapes_composition/mean", "reward/fairness/shapes_parity/mean"}
    assert good.rewards["reward/fairness/shapes_parity/mean"] == pytest.approx((-0.555, -0.255))
    assert weak.misses() == ["composition", "parity", "quality", "reward/fairness/shapes_parity/mean fell"]
    table = compare_table([good, weak])
    assert "| good | +12.0 | -47% |" in table and "misses composition, parity, quality" in table
    assert "| quality | 0.6140 | 0.6100 ± 0.0100 | 0.6000 | 1 of 2 |" in table
    assert "| parity | -30% | -30.0 ± 16.7 | -13.3 | 1 of 2 |" in table
    assert "Every line holds on 1 of 2 runs" in table


def test_compare_names_a_run_without_an_evaluation_and_how_to_make_one(tmp_path):
    (tmp_path / "run").mkdir()
    out = subprocess.run([sys.executable, "-m", "rlds", "compare", str(tmp_path / "run")], capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert f"{tmp_path / 'run' / 'eval' / 'eval.json'}: no evaluation; run `rlds eval --checkpoint" in out.stderr
