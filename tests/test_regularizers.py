import numpy as np
import pytest
import torch

from rlds.algo import make_optimizer
from rlds.algo.regularizers import pretrain_step, pretraining_loss
from rlds.config import AlgoConfig, ConfigError, ModelConfig
from rlds.configure import load_config
from rlds.data.pretrain_set import PretrainSet, write_pretrain_set
from rlds.policy import load_policy


def test_pretraining_step_lowers_the_noise_prediction_loss(tmp_path):
    write_pretrain_set(tmp_path / "set.parquet", 16, seed=0)
    images, captions = next(PretrainSet(tmp_path / "set.parquet", resolution=16).stream(16))
    policy = load_policy(ModelConfig())
    opt = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad],
                         AlgoConfig(learning_rate=1e-3))

    def loss():  # the same noise and timesteps each time, so the numbers compare
        with torch.no_grad():
            return pretraining_loss(policy, images, captions, torch.Generator().manual_seed(0)).item()

    before = loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        out = pretrain_step(policy, opt, images, captions, 1.0, 1.0, g)
        assert np.isfinite(out["pretrain_loss"]) and out["pretrain_grad_norm"] > 0
    assert loss() < 0.9 * before


def test_pretrain_beta_needs_data(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompts: {items: [a]}\nrewards: [{name: brightness}]\nalgo: {pretrain_beta: 0.5}\n")
    with pytest.raises(ConfigError, match="algo.pretrain_data: algo.pretrain_beta > 0 needs"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="algo.pretrain_data: not found"):
        load_config(str(path), ("algo.pretrain_data=nowhere.parquet",))
