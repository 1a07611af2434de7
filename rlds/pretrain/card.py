"""The model folder `rlds pretrain` writes: weights, model card, config, loss curve and summary.

The folder is rewritten by writing a sibling folder and swapping it in, so a run killed at any
moment leaves the last complete model behind. The card's Evaluation section lies between two
markers that `rlds eval --model-card` fills in.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from rlds.config import ConfigError
from rlds.data.shapes import COLOURS
from rlds.pretrain.config import PretrainConfig

EVAL_START, EVAL_END = "<!-- rlds-eval:start -->", "<!-- rlds-eval:end -->"


def model_card(cfg: PretrainConfig, summary: dict, command: str) -> str:
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


def write_model_folder(out: Path, policy, cfg: PretrainConfig, summary: dict, log_rows: list[dict],
                        command: str) -> None:
    """Write the whole folder next to `out`, then swap it in: a kill leaves the last complete folder."""
    from rlds.policy.pipeline import save_policy

    out = out.resolve()
    tmp, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    from rlds.hf import no_progress_bars

    with no_progress_bars():  # a "Writing model shards" bar per save would break the training bar
        save_policy(policy, tmp)
    weights = [f for f in tmp.rglob("*.safetensors")]
    summary["model"]["safetensors_mb"] = sum(f.stat().st_size for f in weights) / 1e6
    (tmp / "pretrain_config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(dataclasses.replace(cfg, out=str(summary["out"]))), sort_keys=False))
    (tmp / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
    (tmp / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(cfg, summary, command))
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
        raise ConfigError(f"out {out}: exists and is not a model folder; the pretraining run replaces its "
                          "out folder, so give a new folder or an earlier model folder")
