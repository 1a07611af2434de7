"""The `rlds` command."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "shapes_mix_nft"  # ShapesWorld composition and fairness with DiffusionNFT, then the eval table
BENCH_CONFIG = "tiny"  # a random-weight model: measures the system, not the model


def resolve_config(name: str) -> str:
    """A config file path, or the name of a config shipped in configs/ (e.g. `tiny`)."""
    if Path(name).is_file():
        return name
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) or "none found"
    raise SystemExit(f"rlds: config not found: {name} (a YAML file, or one of: {shipped})")


def split_overrides(args: list[str], default: str = DEFAULT_CONFIG) -> tuple[str, list[str]]:
    """`rlds train [CONFIG] [key=value ...]`: the config is the one argument without '='."""
    config = [a for a in args if "=" not in a]
    if len(config) > 1:
        raise SystemExit(f"rlds: give one config file, then key=value overrides; got {config}")
    return (config[0] if config else default), [a for a in args if "=" in a]


def cmd_train(args) -> int:
    from rlds.configure import load_config
    from rlds.trainer import Trainer

    name, overrides = split_overrides(args.args)
    config = load_config(resolve_config(name), tuple(overrides))
    run_dir = Trainer(config, progress=not args.no_progress).run()
    print(f"run folder: {run_dir}")
    if config.evaluate:
        from rlds.checkpoint import latest_checkpoint
        from rlds.eval import evaluate, format_table

        checkpoint = latest_checkpoint(run_dir)  # the trainer always checkpoints the last iteration
        results = evaluate(config, run_dir / "eval", str(checkpoint), progress=not args.no_progress)
        print(format_table(results))
        print(f"wrote {run_dir / 'eval'}/eval.json and report.md")
    return 0


def cmd_chaos(args) -> int:
    from rlds.chaos import run_chaos
    from rlds.configure import load_config

    name, overrides = split_overrides(args.args, default=BENCH_CONFIG)
    config = load_config(resolve_config(name), tuple(overrides))
    report, run_dir = run_chaos(config, args.kinds.split(","), args.every, args.seed, progress=not args.no_progress)
    print(json.dumps({**report.__dict__, "survived": report.survived}, indent=2))
    print(f"wrote {run_dir / 'chaos.json'}")
    return 0 if report.survived else 1


def cmd_sample(args) -> int:
    from rlds.configure import load_config
    from rlds.sample import read_prompts, sample_images

    name, overrides = split_overrides(args.args)
    config = load_config(resolve_config(name), tuple(overrides))
    out = sample_images(config, read_prompts(args.prompts), Path(args.out), args.checkpoint, args.seed,
                        args.num_per_prompt, progress=not args.no_progress)
    print(f"wrote {out}/images.jsonl")
    return 0


def cmd_eval(args) -> int:
    from rlds.configure import load_config
    from rlds.eval import evaluate, format_table

    name, overrides = split_overrides(args.args)
    config = load_config(resolve_config(name), tuple(overrides))
    out = Path(args.out or (Path(args.checkpoint).parent.parent / "eval" if args.checkpoint else "eval"))
    results = evaluate(config, out, args.checkpoint, args.seed, args.composition_prompts, args.composition_seeds,
                       args.group_size, progress=not args.no_progress)
    if args.model_card:
        from rlds.eval import ship_base_evaluation, write_model_card
        from rlds.policy.pipeline import model_location

        folder = Path(model_location(config.model.source))
        write_model_card(folder, results, "rlds eval " + " ".join(sys.argv[2:]))
        shipped = ship_base_evaluation(config, args.composition_prompts, args.composition_seeds, args.group_size,
                                       args.seed)
        print(f"wrote {shipped}")
    print(format_table(results))
    print(f"wrote {out}/eval.json and {out}/report.md")
    return 0


def cmd_bench(args) -> int:
    from rlds.bench import PARTS, run_bench
    from rlds.configure import load_config

    name, overrides = split_overrides(args.args, BENCH_CONFIG)
    config = load_config(resolve_config(name), tuple(overrides))
    balanced = load_config(resolve_config(args.balanced)) if args.balanced else None
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"rlds bench: unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    results = run_bench(config, parts, Path(args.out), balanced, int(args.weight_bytes), iterations=args.iterations)
    print(json.dumps(results.get("summary", {}), indent=2))
    print(f"wrote {args.out}/bench.json and {args.out}/bench.png")
    return 0


PRETRAIN_CONFIG = "pretrain_shapes"


def cmd_pretrain(args) -> int:
    from rlds.pretrain import load_pretrain_config, pretrain

    config = [a for a in args.args if "=" not in a]
    if len(config) > 1:
        raise SystemExit(f"rlds: give one config file, then key=value overrides; got {config}")
    name = config[0] if config else PRETRAIN_CONFIG
    path = resolve_config(name)
    overrides = [a for a in args.args if "=" in a]
    cfg = load_pretrain_config(path, tuple(overrides))
    try:  # the card's command as one would type it from here
        shown = str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = path
    command = " ".join(["rlds pretrain", shown, *overrides] + (["--out", args.out] if args.out else []))
    out = pretrain(cfg, Path(args.out) if args.out else None, progress=not args.no_progress, command=command)
    print(f"model folder: {out}")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def cmd_compare(args) -> int:
    from rlds.compare import compare_table, run_figures

    print(compare_table([run_figures(Path(r)) for r in args.runs]))
    return 0


def cmd_plot(args) -> int:
    from rlds.plot import plot_runs

    print(plot_runs([Path(r) for r in args.runs], Path(args.out), args.smooth))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlds", description="Reinforcement learning for text-to-image diffusion models, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a policy; writes a run folder",
        description="Train with RL. CONFIG is a YAML file or a shipped config name "
                    f"(default: {DEFAULT_CONFIG}); key=value pairs override any config key, e.g. "
                    "`rlds train configs/shapes_composition.yaml iterations=30 algo.learning_rate=5e-5`, "
                    "`rlds train tiny replay.max_staleness=0`, a list entry's key: `tasks[1].lr_scale=0.5`. "
                    "Joins the Ray cluster in RAY_ADDRESS (or ray.address=...; `auto` finds a `ray start` head on "
                    "this machine), else starts a private one.")
    train.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    chaos = sub.add_parser(
        "chaos", help="train while killing actors at random; report what the run survived",
        description="Train CONFIG (default: tiny) while a thread kills a random sampler, reward actor or learner "
                    "rank every --every seconds (kinds taken in shuffled rounds, within the restart budgets: "
                    "learner.max_restarts, 3 per sampler, 3 per reward actor). Writes RUN/chaos.json: kills by kind, "
                    "whether the run completed, its books (trajectories unaccounted for must be 0) and whether "
                    "the served policy version only grew. Exits 1 if the run did not survive.")
    chaos.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    chaos.add_argument("--every", type=float, default=10.0, help="seconds between kills (default: 10)")
    chaos.add_argument("--kinds", default="sampler,reward,learner", help="actors to kill (default: all three kinds)")
    chaos.add_argument("--seed", type=int, default=0, help="which actors, in which order")
    chaos.add_argument("--no-progress", action="store_true", help="no progress bar")
    chaos.set_defaults(func=cmd_chaos)

    sample = sub.add_parser(
        "sample", help="write images from the base model or a checkpoint",
        description="Sample images with the same loader as training: one PNG per image and images.jsonl "
                    "(file, prompt, seed). Image k of a prompt uses seed SEED + k.")
    sample.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    sample.add_argument("--prompts", required=True, help="a file of prompts (one a line) or one prompt's text")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--checkpoint", help="a checkpoint folder (runs/.../checkpoints/iter_N); default: base model")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num-per-prompt", type=int, default=1)
    sample.add_argument("--no-progress", action="store_true")
    sample.set_defaults(func=cmd_sample)

    ev = sub.add_parser(
        "eval", help="ShapesWorld evaluation on held-out prompts (base model, or base vs a checkpoint)",
        description="Composition accuracy and mean detection score, statistical parity and quality on "
                    "held-out prompts with fixed seeds. Writes eval.json and report.md (a table and "
                    "base-vs-tuned image grids for the same seeds).")
    ev.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    ev.add_argument("--checkpoint", help="a checkpoint folder; default: the base model alone")
    ev.add_argument("--out", help="output folder (default: RUN/eval for a checkpoint, else eval/)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--composition-prompts", type=positive_int, default=None,
                    help="held-out relation prompts to draw (default: all 132)")
    ev.add_argument("--composition-seeds", type=positive_int, default=2, help="images per held-out relation prompt")
    ev.add_argument("--group-size", type=positive_int, default=16, help="images per colour-free prompt")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--model-card", action="store_true",
                    help="also write the base model's figures into its model card (model.source/README.md) "
                         "and keep them in its folder (model.source/eval/), where every later eval finds them")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser(
        "bench", help="measure throughput: stages, pipeline, sync vs async, against one process, weights, scaling",
        description="Benchmarks on this machine (CPU) with CONFIG's actors: each stage alone, the pipeline "
                    "end to end and its efficiency, async over sync, rlds (sync and async) against one plain "
                    "process that uses every core, weight publication against a memcpy, and a simulated "
                    "cluster from 1 to 16 samplers; on request (compute) what a trajectory costs in float32, "
                    "bfloat16, channels-last and compiled, with the compile time. Writes bench.json and bench.png "
                    "to --out (CONFIG default: tiny). "
                    "The GPU benchmark is `python -m rlds.bench.gpu`.")
    bench.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    bench.add_argument("--out", default="bench", help="output folder (default: bench/)")
    bench.add_argument("--parts", default=",".join(["stages", "end_to_end", "sync_async", "single_process",
                                                     "weights", "scaling"]),
                       help="comma-separated subset of: stages,end_to_end,sync_async,single_process,compute,weights,"
                            "scaling (default: all but compute, whose compiling takes minutes)")
    bench.add_argument("--balanced", default="bench_balanced",
                       help="config for sync vs async and against one process, one where sampling and learning "
                            "cost about the same")
    bench.add_argument("--weight-bytes", type=float, default=1.73e9,
                       help="size of the published state (default: the SD2 UNet in bf16, 1.73 GB)")
    bench.add_argument("--iterations", type=int, default=8, help="timed iterations per training run")
    bench.set_defaults(func=cmd_bench)

    plot = sub.add_parser(
        "plot", help="draw runs' curves: rewards and validation against samples and minutes",
        description="One row per figure (each task's training reward, smoothed; each validation score), "
                    "one line per run, coloured by config name: pass the seeds of several recipes to "
                    "compare them, e.g. `rlds plot runs/shapes_nft-* --out curves.png`.")
    plot.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    plot.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    plot.add_argument("--smooth", type=positive_int, default=5, help="moving average of training rewards, iterations")
    plot.set_defaults(func=cmd_plot)

    compare = sub.add_parser(
        "compare", help="runs' held-out evaluations side by side, against the must-hold lines",
        description="One row a run (its eval/eval.json: the change from the base on the same prompts and "
                    "seeds; its metrics.jsonl: each training reward's first and last 10 iterations), then "
                    "each figure's mean ± s.e. over the runs, the worst run and the runs passing its line: "
                    "composition +8 points, held-out parity -30%, single objects and quality within one "
                    "standard error of the base's, every training reward rising. E.g. "
                    "`rlds compare runs/shapes_mix_nft-*`.")
    compare.add_argument("runs", nargs="+", help="run folders, each with eval/eval.json (from rlds train or "
                                                 "rlds eval --checkpoint ... --out RUN/eval)")
    compare.set_defaults(func=cmd_compare)

    pre = sub.add_parser(
        "pretrain", help="pretrain the ShapesWorld base model; writes a model folder",
        description="Pretrain the ShapesWorld text-to-image model from scratch on rendered data (written "
                    "first if data_path does not exist). CONFIG is a YAML file or a shipped config name "
                    f"(default: {PRETRAIN_CONFIG}); key=value pairs override its keys, e.g. "
                    "`rlds pretrain steps=2000 max_minutes=30`. Writes a diffusers-style model folder "
                    "(safetensors weights, README.md model card, pretrain_config.yaml), checkpointed every "
                    "save_every_minutes, that `model.source` can name.")
    pre.add_argument("args", nargs="*", metavar="CONFIG | key=value")
    pre.add_argument("--out", help="model folder (default: the config's `out`)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlds.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Positionals after an option (`rlds train tiny --no-progress iterations=5`) come back as extra.
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.args = list(getattr(args, "args", [])) + extra
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rlds: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
