"""The pretraining loop: DDPM loss on the rendered set, text encoder and UNet jointly, AdamW, EMA,
a model folder rewritten every `save_every_minutes` and at the end."""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rlds.algo.regularizers import pretraining_loss
from rlds.algo.schedules import lr_factor
from rlds.config import ConfigError
from rlds.data.pretrain_set import PretrainSet
from rlds.policy.builder import Policy
from rlds.pretrain.card import check_out, write_model_folder
from rlds.pretrain.config import PretrainConfig, validate_pretrain
from rlds.pretrain.data import ensure_data
from rlds.pretrain.model import EMA, build_shapes_policy, count_params, load_start_weights

log = logging.getLogger("rlds.pretrain")


def pretrain(cfg: PretrainConfig, out: Optional[Path] = None, progress: bool = True,
             command: Optional[str] = None) -> Path:
    """Pretrain the ShapesWorld base model into the model folder `out` (default `cfg.out`)."""
    from tqdm import tqdm

    validate_pretrain(cfg)
    out = Path(out if out is not None else cfg.out)
    check_out(out)
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lr_factor(cfg.lr_schedule, k, cfg.steps, cfg.warmup_steps))
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
            write_model_folder(out, saved, cfg, summary, log_rows, command)

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
