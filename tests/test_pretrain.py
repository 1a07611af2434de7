"""`rlds pretrain`: a tiny run writes a model folder that the trainer's loader and sampler use."""
import dataclasses
import json
import math

import numpy as np
import pytest
import yaml

from rlds.config import ConfigError, ModelConfig, SamplingConfig
from rlds.pretrain import SHAPES_VOCAB, load_pretrain_config, pretrain

TINY = ("steps=8", "batch_size=8", "data_rows=200", "block_out_channels=[16, 32]", "norm_num_groups=8",
        "attention_head_dim=4", "text_hidden=32", "text_layers=1", "torch_threads=1", "log_every=2",
        "ema_decay=0.9", "warmup_steps=2", "lr_schedule=cosine")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = load_pretrain_config("configs/pretrain_shapes.yaml",
                               TINY + (f"data_path={tmp / 'shapes.parquet'}", "max_minutes=null"))
    return pretrain(cfg, tmp / "model", progress=False), cfg


def test_tiny_pretraining_writes_a_loadable_model(tiny_run):
    from rlds.policy import load_policy, sample_trajectories

    out, cfg = tiny_run
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    policy = load_policy(ModelConfig(source=str(out)))
    assert policy.scheduler.config.clip_sample is False
    assert policy.unet.config.block_out_channels == (16, 32) or list(policy.unet.config.block_out_channels) == [16, 32]
    # every grammar word is a token of its own
    ids = policy.tokenizer("a blue square to the right of a yellow triangle").input_ids
    assert policy.tokenizer.unk_token_id not in ids and len(ids) == 12
    assert set(SHAPES_VOCAB) >= {"left", "right", "of", "above", "below", "to", "the", "a"}
    traj = sample_trajectories(policy, ["a red circle", "a square above a triangle"],
                               SamplingConfig(num_steps=3, guidance_scale=2.0), seeds=[0, 1])
    assert traj.images.shape == (2, 32, 32, 3) and traj.images.dtype == np.uint8
    assert np.isfinite(traj.log_probs).all()

    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 8 and summary["stopped_by"] == "steps (8)"
    assert math.isfinite(summary["final_loss"])
    curve = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [2, 4, 6, 8] and all(math.isfinite(r["loss"]) for r in curve)
    saved = yaml.safe_load((out / "pretrain_config.yaml").read_text())
    assert saved["steps"] == 8 and saved["block_out_channels"] == [16, 32] and saved["out"] == str(out)
    card = (out / "README.md").read_text()
    for needle in ("## Reproduce", "rlds pretrain", "## Evaluation", "Colour bias", "85%", "200 rendered"):
        assert needle in card
    assert not list(out.parent.glob(".*partial")) and not list(out.parent.glob(".*old"))


def test_pretraining_is_deterministic(tiny_run, tmp_path):
    from safetensors.numpy import load_file

    out, cfg = tiny_run
    cfg = dataclasses.replace(cfg, steps=3)
    again = [pretrain(cfg, tmp_path / f"m{i}", progress=False) for i in range(2)]
    a, b = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_time_budget_and_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain_shapes.yaml \+ command-line overrides: ema: unknown key"):
        load_pretrain_config("configs/pretrain_shapes.yaml", ("ema.decay=0.9",))
    with pytest.raises(ConfigError, match=r"block_out_channels\[1\]: expected int"):
        load_pretrain_config(None, ("block_out_channels=[32, x]",))
    with pytest.raises(ConfigError, match=r"block_out_channels\[0\]: 24 is not a positive multiple"):
        load_pretrain_config(None, ("block_out_channels=[24, 64]",))
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_pretrain_config(None, ("steps=many",))
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: batchsize: unknown key"):
        load_pretrain_config(str(bad))
    # an out folder that is not a model folder is never replaced
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a model folder"):
        pretrain(load_pretrain_config(None, TINY), tmp_path / "keep", progress=False)


def test_cli_pretrain_stops_at_the_time_budget(tmp_path, capsys):
    from rlds.cli import main

    rc = main(["pretrain", "configs/pretrain_shapes.yaml", *TINY, "steps=100000", "max_minutes=0.02",
               f"data_path={tmp_path / 'd.parquet'}", "--out", str(tmp_path / "m"), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "m" / "pretrain_summary.json").read_text())
    assert summary["stopped_by"] == "max_minutes (0.02)" and 0 < summary["steps"] < 100000
    assert "rlds pretrain configs/pretrain_shapes.yaml steps=8" in (tmp_path / "m" / "README.md").read_text()
    assert main(["pretrain", "bogus_key=1", "--out", str(tmp_path / "x")]) == 2
    assert "bogus_key: unknown key" in capsys.readouterr().err


def test_pretraining_can_start_from_an_earlier_model_folder(tiny_run, tmp_path):
    from safetensors.numpy import load_file

    out, cfg = tiny_run
    # lr so small that one step leaves the weights where they started: the earlier folder's, not random ones
    stage = dataclasses.replace(cfg, init_from=str(out), steps=1, learning_rate=1e-12, warmup_steps=0,
                                ema_decay=0.0, seed=5)
    second = pretrain(stage, tmp_path / "stage2", progress=False)
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        before, after = load_file(out / part / name), load_file(second / part / name)
        assert before.keys() == after.keys()
        assert all(np.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert f"started from the weights of `{out}`" in (second / "README.md").read_text()
    with pytest.raises(ConfigError, match="init_from"):  # another architecture
        pretrain(dataclasses.replace(stage, text_hidden=16), tmp_path / "stage3", progress=False)
    with pytest.raises(ConfigError, match="init_from: .* is not a model folder"):
        load_pretrain_config("configs/pretrain_shapes.yaml", (f"init_from={tmp_path}",))
