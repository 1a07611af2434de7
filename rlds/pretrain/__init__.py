"""Pretraining the ShapesWorld base model: `rlds pretrain configs/pretrain_shapes.yaml`.

One module a job: `config` (PretrainConfig and its checks), `model` (the architecture, a start from
an earlier folder, EMA), `data` (the rendered set and its provenance), `card` (the model folder and
its model card), `train` (the loop).

The model is the same kind of thing as Stable Diffusion, small and in pixel space (see DESIGN.md,
"ShapesWorld"): a word-level tokenizer over the ShapesWorld grammar, a CLIP-style text encoder, a
UNet2DConditionModel on 32x32x3 pixels with cross-attention at the two lower resolutions, and a DDIM
scheduler with Stable Diffusion's settings (`sd_scheduler`). Text encoder and UNet train jointly from scratch
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
from rlds.pretrain.card import EVAL_END, EVAL_START
from rlds.pretrain.config import SHAPES_VOCAB, PretrainConfig, load_pretrain_config, validate_pretrain
from rlds.pretrain.model import build_shapes_policy, shapes_architecture
from rlds.pretrain.train import pretrain

__all__ = ["EVAL_END", "EVAL_START", "SHAPES_VOCAB", "PretrainConfig", "build_shapes_policy", "load_pretrain_config",
           "pretrain", "shapes_architecture", "validate_pretrain"]
