"""`rlds pretrain`'s config: the ShapesWorld base model's data, model, optimisation and machine keys."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rlds.algo.schedules import check_schedule
from rlds.config import failer, load_yaml
from rlds.data.shapes import COLOURS, RELATIONS, SHAPES, all_prompts

# Every word of the ShapesWorld grammar ("a [colour] shape RELATION a [colour] shape").
SHAPES_VOCAB = sorted({"a", *COLOURS, *SHAPES, *(w for phrase in RELATIONS.values() for w in phrase.split())})

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
    lr_schedule: str = "constant"  # rlds.algo.schedules.LR_SCHEDULES: constant | linear | cosine (to 0 at `steps`)
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


def load_pretrain_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> PretrainConfig:
    """Load a pretraining YAML (or the defaults), apply `key=value` overrides, validate; errors name
    the dotted key and where it came from, as for training configs."""
    return load_yaml(PretrainConfig, validate_pretrain, path, overrides)


def longest_caption_tokens() -> int:
    """Tokens of the longest ShapesWorld caption, with [BOS] and [EOS]."""
    return max(len(p.text.split()) for p in all_prompts(with_colour=True)) + 2


def validate_pretrain(c: PretrainConfig, where: str = "config") -> None:
    fail = failer(where)

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
    check_schedule(c.lr_schedule, "lr_schedule", fail)
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
