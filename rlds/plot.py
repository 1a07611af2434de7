"""`rlds plot`: the curves of one or more runs, side by side against samples and against minutes.

One row per figure (each task's training reward and its gain over each prompt's first draw, each
validation score that some run logged), one line per run, coloured by the run's config name, so
seeds of a recipe read as one band.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from rlds.metrics import read_metrics


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples, minutes, value) of every row that has `key`."""
    minutes = np.cumsum([r.get("time/iteration_s", 0.0) for r in rows]) / 60
    keep = [i for i, r in enumerate(rows) if key in r]
    return (np.array([rows[i]["samples"] for i in keep]), minutes[keep], np.array([rows[i][key] for i in keep]))


def curve_keys(runs: list[tuple[list[dict], dict]]) -> list[str]:
    """The figures to draw, from each (rows, config): the training reward's mean (each task's, when
    the config has tasks), its gain over each prompt's first draw, then the validation scores."""
    keys: dict[str, None] = {}
    for prefix, figure in (("reward/", "mean"), ("reward/", "gain"), ("val/", "mean")):
        for rows, config in runs:
            tasks = [t["name"] for t in config.get("tasks") or []]
            for key in [f"{prefix}{t}/{figure}" for t in tasks] if tasks else [f"{prefix}{figure}"]:
                if any(key in r for r in rows):
                    keys[key] = None
    return list(keys)


def plot_runs(run_dirs: list[Path], out: Path, smooth: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, names = [], []
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{d}: no metrics.jsonl (is it a run folder?)")
        config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
        runs.append((read_metrics(d / "metrics.jsonl"), config or {}))
        names.append(str(runs[-1][1].get("name", d.name)))
    keys = curve_keys(runs)
    if not keys:
        raise ValueError("no reward or validation figures in these runs' metrics.jsonl")
    colours = {n: f"C{i}" for i, n in enumerate(dict.fromkeys(names))}
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 2.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        for (rows, _), name in zip(runs, names):
            samples, minutes, value = _series(rows, key)
            if not len(value):
                continue
            if not key.startswith("val/") and smooth > 1 and len(value) >= smooth:  # training rewards are noisy
                value = np.convolve(value, np.ones(smooth) / smooth, mode="valid")
                samples, minutes = samples[smooth - 1:], minutes[smooth - 1:]
            for ax, x in zip(row, (samples, minutes)):
                ax.plot(x, value, color=colours[name], alpha=0.8, lw=1.2, ms=3, label=name,
                        marker="o" if key.startswith("val/") else None)
        row[0].set_ylabel(key, fontsize=8)
        row[0].set_xlabel("samples")
        row[1].set_xlabel("minutes of training")
    handles = {h.get_label(): h for ax in axes.ravel() for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(4, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
