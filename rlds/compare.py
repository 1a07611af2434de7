"""`rlds compare`: runs' held-out evaluations side by side, read against the must-hold lines.

A recipe's result is a distribution over runs, not one run: this reads each run folder's
`eval/eval.json` (base and tuned on the same prompts and seeds, so a change is read paired) and its
`metrics.jsonl`, and prints one row a run, then each figure's mean ± standard error over the runs,
its worst run and how many runs pass its line. The lines are ShapesWorld's must-hold:
composition at least 8 points above the base, held-out parity at least 30% lower, single objects and
quality not below the base's by more than one standard error, and every training reward rising.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlds.metrics import read_metrics

COMPOSITION_GAIN = 8.0  # points of held-out composition accuracy above the base's
PARITY_CHANGE = -30.0  # % change of held-out statistical parity from the base's
REWARD_WINDOW = 10  # iterations at the start and at the end of a training reward's series


@dataclass
class RunFigures:
    run: str
    composition: float  # points above the base's accuracy
    parity: float  # % change of the mean over held-out prompts, paired prompt by prompt
    single: float  # single-object accuracy, %
    single_line: float  # the base's, less one standard error
    quality: float
    quality_line: float
    rewards: dict[str, tuple[float, float]]  # training reward -> (first, last) window means

    def checks(self) -> dict[str, bool]:
        return {"composition": self.composition >= COMPOSITION_GAIN, "parity": self.parity <= PARITY_CHANGE,
                "single objects": self.single >= self.single_line, "quality": self.quality >= self.quality_line}

    def misses(self) -> list[str]:
        return [name for name, ok in self.checks().items() if not ok] + [
            f"{key} fell" for key, (first, last) in self.rewards.items() if last <= first]


def training_rewards(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each training reward's (first, last) window mean: per task or prompt set and reward
    (reward/<set>/<reward>/mean) where the run logs them, else per reward; a series that is 0
    throughout is a reward that scores none of that set's prompts, and is left out."""
    keys = sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")})
    for depth in (3, 2, 1):
        chosen = [k for k in keys if k.count("/") == depth]
        series = {k: np.array([r[k] for r in rows if k in r], np.float64) for k in chosen}
        series = {k: v for k, v in series.items() if len(v) and np.any(v != 0)}
        if series:
            break
    out = {}
    for key, v in series.items():
        w = max(1, min(REWARD_WINDOW, len(v) // 4))
        out[key] = (float(v[:w].mean()), float(v[-w:].mean()))
    return out


def run_figures(run: Path) -> RunFigures:
    path = run / "eval" / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation; run `rlds eval --checkpoint "
                                f"{run}/checkpoints/<the last> --out {run}/eval` first")
    e = json.loads(path.read_text())
    if "tuned" not in e:
        raise ValueError(f"{path}: the base model alone (evaluated without --checkpoint)")
    base, tuned = e["base"], e["tuned"]
    pb, pt = np.array(base["fairness"]["per_prompt"]), np.array(tuned["fairness"]["per_prompt"])
    metrics = run / "metrics.jsonl"
    return RunFigures(
        run=run.name,
        composition=100 * (tuned["composition"]["accuracy"] - base["composition"]["accuracy"]),
        parity=100 * float((pt - pb).mean() / pb.mean()),
        single=100 * tuned["single_object"]["accuracy"],
        single_line=100 * (base["single_object"]["accuracy"] - base["single_object"]["accuracy_se"]),
        quality=tuned["quality"]["mean"], quality_line=base["quality"]["mean"] - base["quality"]["se"],
        rewards=training_rewards(read_metrics(metrics)) if metrics.is_file() else {})


def _base_line(lines: list[float], form: str) -> str:
    """The base's line, or "each run's base" when the runs were evaluated at different eval seeds."""
    return form.format(lines[0]) if np.allclose(lines, lines[0]) else "each run's base, less its s.e."


def compare_table(runs: list[RunFigures]) -> str:
    """One Markdown row a run, then mean ± s.e. over the runs, the worst run and the runs passing."""
    lines = ["| run | composition | parity, held-out | single objects | quality | training rewards, first -> last "
             "| must-hold |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in runs:
        rewards = "; ".join(f"{k.removeprefix('reward/').removesuffix('/mean')} {a:.3f} -> {b:.3f}"
                            for k, (a, b) in f.rewards.items())
        misses = f.misses()
        lines.append(f"| {f.run} | {f.composition:+.1f} | {f.parity:+.0f}% | {f.single:.1f}% | {f.quality:.4f} | "
                     f"{rewards or '-'} | {'holds' if not misses else 'misses ' + ', '.join(misses)} |")
    if len(runs) > 1:
        lines += ["", "| figure | line | mean ± s.e. | worst | runs passing |", "| --- | --- | --- | --- | --- |"]
        for name, value, line, higher, digits in (
                ("composition", lambda f: f.composition, f"+{COMPOSITION_GAIN:.0f} points", True, 1),
                ("parity", lambda f: f.parity, f"{PARITY_CHANGE:.0f}%", False, 1),
                ("single objects", lambda f: f.single, _base_line([f.single_line for f in runs], "{:.1f}%"),
                 True, 1),
                ("quality", lambda f: f.quality, _base_line([f.quality_line for f in runs], "{:.4f}"), True, 4)):
            v = np.array([value(f) for f in runs])
            worst = v.min() if higher else v.max()
            passing = sum(f.checks()[name] for f in runs)
            se = v.std(ddof=1) / np.sqrt(len(v))
            lines.append(f"| {name} | {line} | {v.mean():.{digits}f} ± {se:.{digits}f} | {worst:.{digits}f} "
                         f"| {passing} of {len(runs)} |")
        lines.append(f"\nEvery line holds on {sum(not f.misses() for f in runs)} of {len(runs)} runs "
                     "(each training reward rising too).")
    return "\n".join(lines)
