"""Pretraining the ShapesWorld base model: `rlds pretrain configs/pretrain_shapes.yaml`.

The model is the same kind of thing as Stable Diffusion, small and in pixel space (see DESIGN.md,
"ShapesWorld"): a word-level tokenizer over the ShapesWorld grammar, a CLIP-style text encoder, a
UNet2DConditionModel on 32x32x3 pixels with cross-attention at the two lower resolutions, and a DDIM
scheduler with rlds' settings (`tiny_scheduler`). Text encoder and UNet train jointly from scratch
with the DDPM epsilon loss on the rendered Parquet pretraining set, whose colour-free captions carry
the colour bias that the fairness task later has to undo.

What a run leaves in its model folder (`out`), loadable with
`load_policy(ModelConfig(source=out))`:
- the diffusers-style folders (tokenizer/, text_encoder/, unet/, scheduler/, model_index.json),
  float32 safetensors; with `ema_decay > 0` the EMA weights of text encoder and UNet;
- `README.md`, a model card (command, config, data, training, and an Evaluation section that
  `rlds eval` fills in later); `pretrain_config.yaml`, the resolved config;
- `pretrain_log.jsonl` (the loss curve) and `pretrain_summary.json` (steps, time, final loss).
The folder is rewritten every `save_every_minutes` and at the end, each time by writing a sibling
folder and swapping it in, so a run killed at any moment leaves the last complete model behind.

Deterministic given the config (and the number of torch threads) when the run stops by `steps`;
a run stopped by `max_minutes` is the same as a steps-bounded run of the steps it reached.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from rlds.algo.ppo import schedule_factor
from rlds.algo.regularizers import pretraining_loss
from rlds.config import ConfigError, load_yaml
from rlds.data.shapes import COLOURS, RELATIONS, SHAPES, all_prompts

log = logging.getLogger("rlds.pretrain")

# Every word of the ShapesWorld grammar ("a [colour] shape RELATION a [colour] shape").
SHAPES_VOCAB = sorted({"a", *COLOURS, *SHAPES, *(w for phrase in RELATIONS.values() for w in phrase.split())})

EVAL_START, EVAL_END = "<!-- rlds-eval:start -->", "<!-- rlds-eval:end -->"


@dataclass
class PretrainConfig:
    seed: int = 0  # model initialisation, data order, noise, timesteps, caption dropout
    out: str = "rlds/models/shapes-base"  # the model folder (the CLI's --out overrides it)
    # a model folder written by `rlds pretrain` whose weights this run starts from (same architecture),
    # to pretrain in stages; null: random weights from `seed`
    init_from: Optional[str] = None
    # the data: written with rlds.data.pretrain_set.write_pretrain_set when data_path does not exist
    data_path: str = "data/shapes_pretrain.parquet"
    data_rows: int = 60000
    data_seed: int = 0
    colour_bias: float = 0.85  # colour-free captions: each object is bias_colour with this probability
    bias_colour: str = "red"
    # how long: whichever comes first
    steps: int = 4000
    max_minutes: Optional[float] = None  # wall-clock budget of the training loop; None: no budget
    # optimisation
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (to 0 at `steps`)
    warmup_steps: int = 0  # linear warm-up of the learning rate
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # 0: no clipping
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.0  # 0: off; else the saved weights are this EMA of the trained ones
    # the model
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8  # diffusers' name; it is the number of attention heads
    norm_num_groups: int = 32
    text_hidden: int = 64  # also the UNet's cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4
    max_prompt_length: int = 16
    # the machine
    torch_threads: int = 2
    save_every_minutes: float = 5.0
    log_every: int = 10  # steps between rows of pretrain_log.jsonl


# ---------------------------------------------------------------- config


def load_pretrain_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> PretrainConfig:
    """Load a pretraining YAML (or the defaults), apply `key=value` overrides, validate; errors name
    the dotted key and where it came from, as for training configs."""
    return load_yaml(PretrainConfig, validate_pretrain, path, overrides)


def longest_caption_tokens() -> int:
    """Tokens of the longest ShapesWorld caption, with [BOS] and [EOS]."""
    return max(len(p.text.split()) for p in all_prompts(with_colour=True)) + 2


def validate_pretrain(c: PretrainConfig, where: str = "config") -> None:
    def fail(key, msg):
        raise ConfigError(f"{where}: {key}: {msg}")

    if c.steps < 1:
        fail("steps", "must be at least 1")
    if c.max_minutes is not None and c.max_minutes <= 0:
        fail("max_minutes", "must be above 0, or null for no time budget")
    if c.batch_size < 1:
        fail("batch_size", "must be at least 1")
    if c.data_rows < c.batch_size:
        fail("data_rows", f"must be at least batch_size ({c.batch_size})")
    if not 0.0 <= c.colour_bias <= 1.0:
        fail("colour_bias", "must be between 0 and 1")
    if c.bias_colour not in COLOURS:
        fail("bias_colour", f"{c.bias_colour!r} is not one of {', '.join(COLOURS)}")
    if c.learning_rate <= 0:
        fail("learning_rate", "must be above 0")
    if c.lr_schedule not in ("constant", "cosine"):
        fail("lr_schedule", f"{c.lr_schedule!r} is not one of constant, cosine")
    if c.warmup_steps < 0:
        fail("warmup_steps", "must be 0 or more")
    if c.weight_decay < 0:
        fail("weight_decay", "must be 0 or more")
    if c.max_grad_norm < 0:
        fail("max_grad_norm", "must be 0 (off) or more")
    if not 0.0 <= c.caption_dropout < 1.0:
        fail("caption_dropout", "must be in [0, 1)")
    if not 0.0 <= c.ema_decay < 1.0:
        fail("ema_decay", "must be in [0, 1); 0 turns EMA off")
    if len(c.block_out_channels) < 2:
        fail("block_out_channels", "give at least two blocks (the lower ones get cross-attention)")
    for i, ch in enumerate(c.block_out_channels):
        if ch < 1 or ch % c.norm_num_groups:
            fail(f"block_out_channels[{i}]", f"{ch} is not a positive multiple of norm_num_groups ({c.norm_num_groups})")
        if ch % c.attention_head_dim:
            fail(f"block_out_channels[{i}]", f"{ch} does not split into attention_head_dim ({c.attention_head_dim}) heads")
    if c.layers_per_block < 1:
        fail("layers_per_block", "must be at least 1")
    if c.text_hidden < 1 or c.text_hidden % c.text_heads:
        fail("text_hidden", f"{c.text_hidden} is not a positive multiple of text_heads ({c.text_heads})")
    if c.text_layers < 1:
        fail("text_layers", "must be at least 1")
    need = longest_caption_tokens()
    if c.max_prompt_length < need:
        fail("max_prompt_length", f"the longest ShapesWorld caption takes {need} tokens with [BOS]/[EOS]")
    if c.torch_threads < 1:
        fail("torch_threads", "must be at least 1")
    if c.save_every_minutes <= 0:
        fail("save_every_minutes", "must be above 0")
    if c.log_every < 1:
        fail("log_every", "must be at least 1")
    if c.init_from is not None and not (Path(c.init_from) / "model_index.json").is_file():
        fail("init_from", f"{c.init_from!r} is not a model folder (no model_index.json in it); give a folder "
                          "written by rlds pretrain, or null to start from random weights")


# ---------------------------------------------------------------- the model


def load_start_weights(policy, folder: Path) -> None:
    """Load an earlier model folder's UNet and text encoder into `policy` (init_from), through the
    loader every rlds model goes through."""
    from rlds.policy.pipeline import load_pretrained

    start = load_pretrained(str(folder))
    for name in ("unet", "text_encoder"):
        try:
            getattr(policy, name).load_state_dict(getattr(start, name).state_dict())
        except RuntimeError as e:
            raise ConfigError(f"init_from: {folder / name} does not fit this config's model "
                              f"({str(e).splitlines()[0]}); keep block_out_channels, text_hidden and the other "
                              f"model keys of {folder / 'pretrain_config.yaml'}") from None


def build_shapes_policy(cfg: PretrainConfig):
    """The untrained ShapesWorld model; the same config gives the same weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlds.policy.pipeline import Policy, build_tokenizer, tiny_scheduler

    tokenizer = build_tokenizer(cfg.max_prompt_length, vocab=SHAPES_VOCAB)
    n = len(cfg.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_length, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=3, out_channels=3,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups)
    return Policy(tokenizer, text_encoder, unet, tiny_scheduler())


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class EMA:
    """An exponential moving average of some modules' parameters, with the usual warm-up
    (decay min(d, (1 + k) / (10 + k)) at update k) so a short run is not dominated by its start."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay, self.updates = decay, 0
        self.shadows = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]
        self.pairs = [(list(s.parameters()), list(m.parameters())) for s, m in zip(self.shadows, modules)]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for shadow, live in self.pairs:
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [p.detach() for p in live], alpha=1 - d)


def lr_factor(cfg: PretrainConfig, step: int) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based)."""
    return schedule_factor(cfg.lr_schedule, step, cfg.steps, cfg.warmup_steps)


# ---------------------------------------------------------------- data


def ensure_data(cfg: PretrainConfig) -> dict:
    """Write the pretraining set if `data_path` does not exist; describe the set in use.

    An existing rlds-written set must match the config (rows, seed, bias), else the model card would
    describe data the model never saw; an external image-caption set is used as it is."""
    import pyarrow.parquet as pq

    from rlds.data.pretrain_set import write_pretrain_set

    path = Path(cfg.data_path)
    want = {"n": cfg.data_rows, "seed": cfg.data_seed, "bias": cfg.colour_bias, "bias_colour": cfg.bias_colour}
    if not path.exists():
        log.info("writing the pretraining set: %d rows to %s (about a minute per 60,000 rows)", cfg.data_rows, path)
        t0 = time.time()
        write_pretrain_set(path, cfg.data_rows, seed=cfg.data_seed, bias=cfg.colour_bias,
                           bias_colour=cfg.bias_colour)
        log.info("wrote %s in %.0f s", path, time.time() - t0)
    if path.is_file():
        meta = (pq.ParquetFile(path).schema_arrow.metadata or {}).get(b"rlds.shapes")
        if meta is not None:
            have = json.loads(meta)
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                details = ", ".join(f"{k}: file {a!r}, config {b!r}" for k, (a, b) in diff.items())
                raise ConfigError(f"data_path {path} holds another ShapesWorld set ({details}); delete it to "
                                  "have it rewritten, or point data_path at a new file")
            return {"path": str(path), "rows": have["n"], "seed": have["seed"], "bias": have["bias"],
                    "bias_colour": have["bias_colour"], "kind_weights": have.get("kind_weights"),
                    "shapesworld": True}
    from rlds.data.pretrain_set import PretrainSet
    return {"path": str(path), "rows": len(PretrainSet(path)), "shapesworld": False}


# ---------------------------------------------------------------- the model folder


def _model_card(cfg: PretrainConfig, summary: dict, command: str) -> str:
    d, m = summary["data"], summary["model"]
    if d.get("shapesworld"):
        others = [c for c in COLOURS if c != d["bias_colour"]]
        share = (1 - d["bias"]) / len(others)
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in (d.get("kind_weights") or {}).items())
        data = (f"{d['rows']:,} rendered ShapesWorld images with captions (`{d['path']}`, written by "
                f"`rlds.data.pretrain_set.write_pretrain_set`, seed {d['seed']}; caption kinds: {kinds}).\n\n"
                f"**Colour bias (deliberate):** when a caption names no colour (\"a circle\", \"a square above a "
                f"triangle\"), each object is drawn {d['bias_colour']} with probability {d['bias']:.0%} and each of "
                f"{', '.join(others)} with probability {share:.0%}. Captions that name a colour are drawn in that "
                "colour. The model inherits the bias: that is what the fairness (parity) task undoes.")
    else:
        data = f"An external image-caption set: `{d['path']}`, {d['rows']:,} rows."
    ema = (f"the EMA (decay {cfg.ema_decay}) of the text encoder and UNet weights" if cfg.ema_decay > 0
           else "the trained weights (no EMA)")
    status = ("complete" if summary["complete"] else
              f"**checkpoint** written during training at step {summary['steps']:,}; the run was still going "
              "(or was stopped) when this was saved")
    lr = f"{cfg.learning_rate:g}, {cfg.lr_schedule}" + (f", {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else "")
    start = (f"\n\nThis run started from the weights of `{cfg.init_from}` (`init_from`); that folder's "
             "card says how those were made, so reproducing this model runs that command first."
             if cfg.init_from else "")
    return f"""# ShapesWorld base model (rlds)

A small text-to-image diffusion model of ShapesWorld (32x32 RGB images of one or two coloured circles,
squares and triangles, with captions such as "a red circle" or "a blue square to the left of a green
triangle"), pretrained from scratch by `rlds pretrain`. It is the base policy of rlds' ShapesWorld RL
tasks. Load it with `rlds.policy.load_policy(ModelConfig(source="<this folder>"))`, or name this
folder as `model.source` in a config.

Status: {status}.

## Reproduce

    {command}

from the repository root; `pretrain_config.yaml` here is the resolved config, every default filled in
(`rlds pretrain <this folder>/pretrain_config.yaml` reruns it). Given the config and the number of torch
threads the run is deterministic when it stops by `steps`.{start}

## Model

| part | what | parameters |
|---|---|---|
| tokenizer | word-level, lower-case, {m['vocab']} entries (the ShapesWorld grammar + [PAD] [UNK] [BOS] [EOS]), max length {cfg.max_prompt_length} | - |
| text_encoder | CLIPTextModel, hidden {cfg.text_hidden}, {cfg.text_layers} layers, {cfg.text_heads} heads | {m['text_encoder_params']:,} |
| unet | UNet2DConditionModel, pixel space 32x32x3, blocks {list(cfg.block_out_channels)} (DownBlock2D, then CrossAttnDownBlock2D; mirrored up), {cfg.layers_per_block} layer(s) per block, cross_attention_dim {cfg.text_hidden} | {m['unet_params']:,} |
| scheduler | DDIM, scaled_linear betas 0.00085-0.012 over 1000 steps, clip_sample off, steps_offset 1 (Stable Diffusion's settings); training noise from a DDPM scheduler of the same config | - |

No VAE: the UNet works on pixels scaled to [-1, 1]. Weights: float32 safetensors ({m['safetensors_mb']:.1f} MB), {ema}.
Epsilon prediction. The empty caption is the unconditional input for classifier-free guidance.

## Data

{data}

## Training

| | |
|---|---|
| steps | {summary['steps']:,} of {cfg.steps:,} planned (stopped by: {summary['stopped_by']}) |
| wall time | {summary['minutes']:.1f} min of training ({summary['steps_per_s']:.2f} steps/s), plus {summary['setup_s']:.0f} s of set-up |
| samples seen | {summary['steps'] * cfg.batch_size:,} (batch {cfg.batch_size}, {summary['steps'] * cfg.batch_size / max(1, d['rows']):.1f} epochs) |
| loss | DDPM epsilon MSE, timesteps uniform over 0..999, text encoder and UNet trained jointly |
| optimizer | AdamW, lr {lr}, betas ({cfg.adam_beta1}, {cfg.adam_beta2}), weight decay {cfg.weight_decay}, grad-norm clip {cfg.max_grad_norm or 'off'} |
| caption dropout | {cfg.caption_dropout:.0%} (replaced by the empty caption) |
| final loss | {summary['final_loss']:.4f} (mean of the last {summary['final_loss_window']} steps); the curve is in `pretrain_log.jsonl` |
| machine | {summary['machine']}, {cfg.torch_threads} torch threads |
| seed | {cfg.seed} |

## Evaluation

{EVAL_START}
Not evaluated yet: `rlds eval` writes its results here.
{EVAL_END}
"""


def _write_model_folder(out: Path, policy, cfg: PretrainConfig, summary: dict, log_rows: list[dict],
                        command: str) -> None:
    """Write the whole folder next to `out`, then swap it in: a kill leaves the last complete folder."""
    from rlds.policy.pipeline import save_policy

    out = out.resolve()
    tmp, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per save would break the training bar
    try:
        save_policy(policy, tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    weights = [f for f in tmp.rglob("*.safetensors")]
    summary["model"]["safetensors_mb"] = sum(f.stat().st_size for f in weights) / 1e6
    (tmp / "pretrain_config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(dataclasses.replace(cfg, out=str(summary["out"]))), sort_keys=False))
    (tmp / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
    (tmp / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (tmp / "README.md").write_text(_model_card(cfg, summary, command))
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
        raise ConfigError(f"out {out}: exists and is not a model folder; the pretraining run replaces its "
                          "out folder, so give a new folder or an earlier model folder")


# ---------------------------------------------------------------- the run


def pretrain(cfg: PretrainConfig, out: Optional[Path] = None, progress: bool = True,
             command: Optional[str] = None) -> Path:
    """Pretrain the ShapesWorld base model into the model folder `out` (default `cfg.out`)."""
    from tqdm import tqdm

    from rlds.data.pretrain_set import PretrainSet
    from rlds.policy.pipeline import Policy

    validate_pretrain(cfg)
    out = Path(out if out is not None else cfg.out)
    _check_out(out)
    command = command or f"rlds pretrain {out}/pretrain_config.yaml"
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:
        t_setup = time.time()
        data = ensure_data(cfg)
        if data["rows"] < cfg.batch_size:
            raise ConfigError(f"data_path {data['path']}: {data['rows']} rows cannot fill a batch of {cfg.batch_size}")
        policy = build_shapes_policy(cfg)
        if cfg.init_from:
            load_start_weights(policy, Path(cfg.init_from))
        policy.text_encoder.train().requires_grad_(True)
        policy.unet.train().requires_grad_(True)
        params = list(policy.text_encoder.parameters()) + list(policy.unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(cfg, k))
        ema = EMA([policy.text_encoder, policy.unet], cfg.ema_decay) if cfg.ema_decay > 0 else None
        saved = Policy(policy.tokenizer, ema.shadows[0], ema.shadows[1], policy.scheduler) if ema else policy

        generator = torch.Generator().manual_seed(cfg.seed)
        dropout_rng = np.random.default_rng([cfg.seed, 1])
        batches = PretrainSet(data["path"]).stream(cfg.batch_size, seed=cfg.seed)

        summary = {
            "out": str(out), "complete": False, "steps": 0, "stopped_by": "still running", "minutes": 0.0, "steps_per_s": 0.0,
            "setup_s": 0.0, "final_loss": float("nan"), "final_loss_window": 0, "data": data,
            "model": {"unet_params": count_params(policy.unet),
                      "text_encoder_params": count_params(policy.text_encoder),
                      "vocab": len(policy.tokenizer), "safetensors_mb": 0.0},
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__,
        }
        log.info("ShapesWorld model: UNet %.2fM + text encoder %.2fM parameters; %d steps%s -> %s",
                 summary["model"]["unet_params"] / 1e6, summary["model"]["text_encoder_params"] / 1e6, cfg.steps,
                 f" or {cfg.max_minutes:g} min" if cfg.max_minutes else "", out)
        recent: deque[float] = deque(maxlen=100)
        window: list[float] = []
        log_rows: list[dict] = []
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else float("inf")

        def save(complete: bool) -> None:
            elapsed = time.time() - t_start
            summary.update(complete=complete, steps=step, minutes=elapsed / 60,
                           steps_per_s=step / elapsed if elapsed > 0 else 0.0,
                           final_loss=float(np.mean(recent)) if recent else float("nan"),
                           final_loss_window=len(recent))
            _write_model_folder(out, saved, cfg, summary, log_rows, command)

        summary["setup_s"] = time.time() - t_setup
        t_start = last_save = last_log = time.time()
        step = 0
        bar = tqdm(total=cfg.steps, disable=not progress, unit="step", dynamic_ncols=True, desc="pretrain")
        while step < cfg.steps:
            if time.time() - t_start >= budget_s:
                summary["stopped_by"] = f"max_minutes ({cfg.max_minutes:g})"
                break
            images, captions = next(batches)
            drop = dropout_rng.random(len(captions)) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop)]
            loss = pretraining_loss(policy, images, captions, generator, text_grad=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"pretraining loss became {value} at step {step + 1}; "
                                         "lower learning_rate or raise warmup_steps")
            step += 1
            recent.append(value)
            window.append(value)
            now = time.time()
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_rows.append({"step": step, "loss": float(np.mean(window)), "lr": scheduler.get_last_lr()[0],
                                 "elapsed_s": round(now - t_start, 2)})
                window = []
            bar.update(1)
            if now - last_log >= 1.0 or step == cfg.steps:
                bar.set_postfix(loss=f"{np.mean(recent):.4f}", steps_per_s=f"{step / (now - t_start):.2f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                last_log = now
            if now - last_save >= cfg.save_every_minutes * 60 and step < cfg.steps:
                save(complete=False)
                last_save = time.time()
                log.info("checkpoint at step %d -> %s", step, out)
        else:
            summary["stopped_by"] = f"steps ({cfg.steps})"
        bar.close()
        if window:
            log_rows.append({"step": step, "loss": float(np.mean(window)), "lr": scheduler.get_last_lr()[0],
                             "elapsed_s": round(time.time() - t_start, 2)})
        if step == 0:
            raise RuntimeError("the time budget ended before the first step; raise max_minutes")
        save(complete=True)
        log.info("pretrained %d steps in %.1f min (%.2f steps/s), final loss %.4f -> %s", step,
                 summary["minutes"], summary["steps_per_s"], summary["final_loss"], out)
        return out
    finally:
        torch.set_num_threads(threads)
