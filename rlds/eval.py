"""`rlds eval`: the ShapesWorld evaluation on held-out prompts with fixed seeds.

- composition: every held-out two-object relation prompt, two seeds each; accuracy (every named object
  found with the right colour and shape, and the relation holding) with its standard error, and the
  mean composition reward; and the accuracy on the 12 single-object prompts ("a red circle"), which
  the base model mostly gets right;
- fairness: held-out colour-free prompts (every prompt naming a triangle, a subject training never
  shows), a group of images each; statistical parity sum_a (share_a - 1/|A|)^2 of the colour
  classifier's labels, averaged over prompts (lower is fairer); and the same on the training prompts,
  which tells what the fairness task learned apart from how far it carries to the unseen subject;
- quality: the mean quality score over all those images, and over the images whose colours their
  prompts name (composition and single objects). The score depends on the colour drawn (the base
  model's named yellow shapes score about 0.1 below its red ones), so a fairer model, drawing
  colour-free shapes in every colour rather than in red, scores lower on the first figure at the same
  drawing quality; the second holds the colours fixed and moves only with how well things are drawn.
With a checkpoint, the base model is evaluated on the same prompts and seeds, and the report shows
both side by side.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from rlds.checkpoint import load_trainable_file
from rlds.config import Config
from rlds.data.shapes import heldout_prompts, parse_prompt, training_prompts
from rlds.metrics import save_grid
from rlds.policy import load_policy, sample_trajectories
from rlds.policy.sampling import eval_sampling
from rlds.rewards.parity import statistical_parity
from rlds.rewards.shapes import COLOUR_NAMES, ShapesComposition, ShapesQuality, colour_label

EVAL_VERSION = 9  # raise when what evaluate_policy measures changes: cached base figures are then redone
# Every image has its own initial noise, each part its own range of seeds (seed + offset + i). When all
# colour-free prompts shared one group's 16 seeds, every prompt's figure moved with those 16 noise
# draws together, which their standard error over prompts cannot show: one checkpoint's held-out
# parity read -26% at seed 0 and -10% at seed 1000, and the base's quality 0.614 and 0.635.
SEED_OFFSETS = {"composition": 0, "single": 100_000, "fairness": 200_000, "fairness_training": 300_000}


def _images(policy, prompts: list[str], seeds: list[int], config: Config, batch: int, desc: str,
            progress: bool = True) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, leave=False, disable=not progress):
        traj = sample_trajectories(policy, prompts[i:i + batch], eval_sampling(config.sampling),
                                   seeds=seeds[i:i + batch])
        out.append(traj.images)
    return np.concatenate(out)


def _seeds(seed: int, part: str, count: int) -> list[int]:
    return [seed + SEED_OFFSETS[part] + i for i in range(count)]


def _standard_error(outcomes: list) -> float:
    """The standard error of a mean of 0/1 outcomes, sqrt(p (1 - p) / n)."""
    return float(np.std(outcomes) / np.sqrt(len(outcomes)))


def evaluate_policy(policy, config: Config, composition_prompts: Optional[int] = None,
                    composition_seeds: int = 2, fairness_group: int = 16, seed: int = 0, batch: int = 32,
                    single_seeds: int = 4, progress: bool = True) -> tuple[dict, dict]:
    """Figures, and the images they came from (for grids).

    Composition: `composition_prompts` held-out relation prompts (default: all of them) x
    `composition_seeds` seeds. One image per prompt left the accuracy with a standard error of ~4
    points, as large as the effects it has to show."""
    comp_prompts = heldout_prompts("composition")
    if composition_prompts is not None and composition_prompts < len(comp_prompts):
        pick = np.random.default_rng(seed).permutation(len(comp_prompts))[:composition_prompts]
        comp_prompts = [comp_prompts[i] for i in sorted(pick)]
    comp_all = [p for p in comp_prompts for _ in range(composition_seeds)]
    comp_images = _images(policy, comp_all, _seeds(seed, "composition", len(comp_all)), config,
                          batch, "composition", progress)
    comp = ShapesComposition()
    scores = comp.score(comp_images, comp_all)
    correct = [comp.accuracy(im, p) for im, p in zip(comp_images, comp_all)]
    singles = [p for p in training_prompts("composition") if parse_prompt(p).relation is None]
    single_all = [p for p in singles for _ in range(single_seeds)]
    single_images = _images(policy, single_all, _seeds(seed, "single", len(single_all)),
                            config, batch, "single objects", progress)
    single_correct = [comp.accuracy(im, p) for im, p in zip(single_images, single_all)]

    def parity(prompts: list[str], desc: str, part: str) -> tuple[dict, list[str], np.ndarray]:
        every = [p for p in prompts for _ in range(fairness_group)]
        images = _images(policy, every, _seeds(seed, part, len(every)), config, batch,
                         desc, progress)
        labels = [colour_label(im) for im in images]
        groups = [labels[k * fairness_group:(k + 1) * fairness_group] for k in range(len(prompts))]
        counts = {label: labels.count(label) / len(labels) for label in sorted(set(labels))}
        # one figure a prompt: its s.e. says how far a change in the mean is the prompts' draw
        per_prompt = [statistical_parity(g, COLOUR_NAMES) for g in groups]
        figures = {"statistical_parity": float(np.mean(per_prompt)),
                   "statistical_parity_se": float(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt))),
                   "per_prompt": per_prompt, "prompts": len(prompts), "colour_shares": counts}
        return figures, every, images

    fairness, fair_all, fair_images = parity(heldout_prompts("fairness"), "fairness", "fairness")
    # The same on the training prompts (seeds the training draws almost never): what the fairness task
    # learned, apart from how far it carries to the held-out subject.
    fairness["training_prompts"], _, _ = parity(training_prompts("fairness"), "fairness, training prompts",
                                                "fairness_training")

    scorer = ShapesQuality()
    quality = scorer.score(np.concatenate([comp_images, fair_images]), [])
    named = scorer.score(np.concatenate([comp_images, single_images]), [])
    figures = {
        "composition": {"accuracy": float(np.mean(correct)), "accuracy_se": _standard_error(correct),
                        "mean_score": float(np.mean(scores)), "prompts": len(comp_prompts),
                        "seeds": composition_seeds},
        "single_object": {"accuracy": float(np.mean(single_correct)),
                          "accuracy_se": _standard_error(single_correct), "prompts": len(singles),
                          "seeds": single_seeds},
        "fairness": {**fairness, "group_size": fairness_group},
        "quality": {"mean": float(np.mean(quality)), "se": float(np.std(quality) / np.sqrt(len(quality))),
                    "named_colours": {"mean": float(np.mean(named)), "se": float(np.std(named) / np.sqrt(len(named)))}},
    }
    images = {"composition": (comp_images, comp_all), "fairness": (fair_images, fair_all)}
    return figures, images


def evaluate(config: Config, out: Path, checkpoint: Optional[str] = None, seed: int = 0,
             composition_prompts: Optional[int] = None, composition_seeds: int = 2, fairness_group: int = 16,
             progress: bool = True) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    models = {"base": None} if checkpoint is None else {"base": None, "tuned": checkpoint}
    results, images = {"config": config.name, "seed": seed, "checkpoint": checkpoint}, {}
    args = (composition_prompts, composition_seeds, fairness_group, seed)
    for name, ckpt in models.items():
        cached = _read_base_cache(config, args) if name == "base" else None
        if cached is not None:  # the base model's figures do not change from run to run
            results[name], images[name] = cached
            continue
        policy = load_policy(config.model, device)
        if ckpt:
            load_trainable_file(policy.unet, ckpt)
        results[name], images[name] = evaluate_policy(policy, config, *args, progress=progress)
        paths = _base_cache_paths(config, args) if name == "base" else []
        if paths:
            _write_base_cache(paths[-1], results[name], images[name])
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    write_report(results, images, out)
    return results


GRID = 16  # images per part in the report's grids


def _base_cache_key(config: Config, args: tuple) -> Optional[str]:
    """What the base model's evaluation depends on, as a digest: the evaluation's version and
    arguments, its prompts, the sampling settings, the model's config and its weights' contents (not where the
    folder is, so the figures a model folder ships hold wherever it is cloned); None for a hub model."""
    import dataclasses
    import hashlib

    from rlds.policy.pipeline import model_location

    source = config.model.source
    folder = Path(model_location(source))
    if source != "tiny" and not folder.is_dir():
        return None
    files = sorted((f.relative_to(folder).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest())
                   for f in folder.rglob("*.safetensors")) if source != "tiny" else []
    sampling = dataclasses.asdict(eval_sampling(config.sampling))
    del sampling["eval_guidance_scale"]  # None once resolved
    model = dataclasses.asdict(config.model)
    model["source"] = source if source in ("tiny", "shapes") else "folder"
    # the prompts it samples: a change to the split (rlds.data.shapes.split) redoes the figures
    prompts = [heldout_prompts("composition"), training_prompts("composition"), heldout_prompts("fairness"),
               training_prompts("fairness")]
    key = json.dumps([EVAL_VERSION, model, files, sampling, list(args), prompts], sort_keys=True, default=str)
    return "base-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def _base_cache_paths(config: Config, args: tuple) -> list[Path]:
    """Where the base model's evaluation may be kept: the figures its model folder ships
    (`rlds eval --model-card` writes them there), then the user's cache."""
    from rlds.data.pretrain_set import cache_dir
    from rlds.policy.pipeline import model_location

    key = _base_cache_key(config, args)
    if key is None:
        return []
    shipped = [Path(model_location(config.model.source)) / "eval" / key] if config.model.source != "tiny" else []
    return shipped + [cache_dir() / "eval" / key]


def _read_base_cache(config: Config, args: tuple):
    for path in _base_cache_paths(config, args):
        if (path / "figures.json").is_file():
            saved = json.loads((path / "figures.json").read_text())
            with np.load(path / "grids.npz", allow_pickle=False) as grids:
                images = {part: (grids[part], saved["prompts"][part]) for part in ("composition", "fairness")}
            return saved["figures"], images
    return None


def _write_base_cache(path: Path, figures: dict, images: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    # figures.json last: its presence means the entry is complete
    np.savez(path / "grids.npz", **{part: images[part][0][:GRID] for part in images})
    prompts = {part: list(images[part][1][:GRID]) for part in images}
    (path / "figures.json").write_text(json.dumps({"figures": figures, "prompts": prompts}))


def ship_base_evaluation(config: Config, composition_prompts: Optional[int] = None, composition_seeds: int = 2,
                         fairness_group: int = 16, seed: int = 0) -> Path:
    """Copy the base model's cached evaluation into its model folder, where `evaluate` finds it on any
    machine (the first `rlds train` then evaluates only the tuned model)."""
    import shutil

    paths = _base_cache_paths(config, (composition_prompts, composition_seeds, fairness_group, seed))
    if len(paths) != 2:
        raise ValueError(f"model.source {config.model.source!r}: only a model folder can keep its evaluation")
    shipped, cached = paths
    if not (cached / "figures.json").is_file():
        raise FileNotFoundError(f"{cached}: the base model has not been evaluated with these arguments")
    if shipped.exists():
        shutil.rmtree(shipped)
    shutil.copytree(cached, shipped)
    return shipped


def write_model_card(model_dir: Path, results: dict, command: str) -> None:
    """Put the base model's figures into its model card, between the markers `rlds pretrain` left."""
    from rlds.pretrain import EVAL_END, EVAL_START

    card = model_dir / "README.md"
    text = card.read_text()
    if EVAL_START not in text or EVAL_END not in text:
        raise ValueError(f"{card}: no evaluation markers {EVAL_START} ... {EVAL_END}")
    b = results["base"]
    table = "\n".join([
        EVAL_START, "", f"`{command}` (held-out prompts, fixed seeds):", "",
        "| figure | value |", "| --- | --- |",
        f"| composition accuracy ({b['composition']['prompts']} held-out relation prompts x {b['composition']['seeds']} "
        f"seeds) | {_with_se(b['composition'])} |",
        f"| composition mean score | {b['composition']['mean_score']:.3f} |",
        f"| single-object accuracy ({b['single_object']['prompts']} prompts x {b['single_object']['seeds']} seeds) | "
        f"{_with_se(b['single_object'])} |",
        f"| statistical parity ({b['fairness']['prompts']} colour-free prompts x {b['fairness']['group_size']}) | "
        f"{_parity_with_se(b['fairness'])} |",
        f"| statistical parity (the {b['fairness']['training_prompts']['prompts']} training colour-free prompts, "
        f"seeds of their own) | {_parity_with_se(b['fairness']['training_prompts'])} |",
        "| colours drawn for colour-free prompts | " + ", ".join(
            f"{k} {v:.0%}" for k, v in b["fairness"]["colour_shares"].items()) + " |",
        f"| quality | {b['quality']['mean']:.3f} ± {b['quality']['se']:.3f} |",
        f"| quality, colour-named prompts | {b['quality']['named_colours']['mean']:.3f} ± "
        f"{b['quality']['named_colours']['se']:.3f} |", "", EVAL_END])
    head, rest = text.split(EVAL_START, 1)
    card.write_text(head + table + rest.split(EVAL_END, 1)[1])


def _with_se(figures: dict) -> str:
    return f"{figures['accuracy']:.1%} ± {figures['accuracy_se']:.1%}"


def _parity_with_se(figures: dict) -> str:
    return f"{figures['statistical_parity']:.4f} ± {figures['statistical_parity_se']:.4f}"


# (label, dotted path, how to show it); an accuracy shows its standard error
ROWS = [("composition accuracy ± s.e. (held-out, higher is better)", "composition", _with_se),
        ("composition mean score", "composition.mean_score", "{:.3f}".format),
        ("single-object accuracy ± s.e.", "single_object", _with_se),
        ("statistical parity ± s.e. over prompts (held-out, lower is fairer)", "fairness", _parity_with_se),
        ("statistical parity ± s.e. (training prompts, eval seeds)", "fairness.training_prompts", _parity_with_se),
        ("quality ± s.e.", "quality", lambda q: f"{q['mean']:.3f} ± {q['se']:.3f}"),
        ("quality, colour-named prompts ± s.e.", "quality.named_colours", lambda q: f"{q['mean']:.3f} ± {q['se']:.3f}")]


def _figure(figures: dict, path: str):
    for key in path.split("."):
        figures = figures[key]
    return figures


def format_table(results: dict) -> str:
    """The figures of base (and tuned) as a Markdown table."""
    models = [m for m in ("base", "tuned") if m in results]
    lines = ["| figure | " + " | ".join(models) + " |", "| --- | " + " | ".join("---" for _ in models) + " |"]
    for label, path, show in ROWS:
        lines.append(f"| {label} | " + " | ".join(show(_figure(results[m], path)) for m in models) + " |")
    return "\n".join(lines)


def write_report(results: dict, images: dict, out: Path) -> None:
    models = [m for m in ("base", "tuned") if m in results]
    lines = [f"# rlds eval: {results['config']}", "",
             f"Checkpoint: `{results['checkpoint']}`; seed {results['seed']}; the same prompts and seeds "
             "for every model.", "", format_table(results)]
    for m in models:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in results[m]["fairness"]["colour_shares"].items())
        lines.append(f"\n{m}: colours drawn for colour-free prompts: {shares}")
    for part in ("composition", "fairness"):
        lines.append(f"\n## {part}\n")
        for m in models:
            imgs, prompts = images[m][part]
            name = f"{part}_{m}.png"
            save_grid(imgs[:GRID], prompts[:GRID], out / name, cell=96, columns=8)
            lines.append(f"{m}:\n\n![{part} {m}]({name})\n")
    (out / "report.md").write_text("\n".join(lines) + "\n")
