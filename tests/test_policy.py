import numpy as np
import torch

from rlds.config import LoraConfig, ModelConfig, SamplingConfig
from rlds.policy import (build_tiny_policy, flatten_trainable, load_flat_trainable, load_policy,
                         sample_trajectories, save_policy, trainable_parameters)
from rlds.config import TinyModelConfig


def test_tiny_model_is_the_same_in_every_process():
    a, b = build_tiny_policy(TinyModelConfig()), build_tiny_policy(TinyModelConfig())
    for (_, x), (_, y) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert torch.equal(x, y)
    c = build_tiny_policy(TinyModelConfig(seed=1))
    assert not torch.equal(next(a.unet.parameters()), next(c.unet.parameters()))


def test_trajectory_holds_every_step(tmp_path):
    policy = load_policy(ModelConfig())
    traj = sample_trajectories(policy, ["a red circle", "a dog"], SamplingConfig(num_steps=5), seeds=[0, 1],
                               policy_version=3, prompt_ids=[4, 5], sample_ids=[10, 11])
    assert traj.latents.shape == (2, 6, 3, 16, 16) and traj.log_probs.shape == (2, 5)
    assert traj.images.dtype == np.uint8 and traj.images.shape == (2, 16, 16, 3)
    assert traj.timesteps.shape == (5,) and traj.policy_version == 3
    assert list(traj.prompt_ids) == [4, 5] and np.isfinite(traj.log_probs).all()


def test_a_saved_pixel_model_loads_through_from_pretrained(tmp_path):
    policy = build_tiny_policy(TinyModelConfig())
    save_policy(policy, tmp_path / "model")
    loaded = load_policy(ModelConfig(source=str(tmp_path / "model")))
    cfg = SamplingConfig(num_steps=3)
    a = sample_trajectories(load_policy(ModelConfig()), ["a cat"], cfg, seeds=[0])
    b = sample_trajectories(loaded, ["a cat"], cfg, seeds=[0])
    np.testing.assert_array_equal(a.latents, b.latents)  # the same weights and computation: to the bit


def test_a_latent_model_with_a_vae_samples_through_the_same_path(tmp_path):
    """The Stable Diffusion layout: VAE, latents of 4 channels, images at 8x the latent size."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    policy = build_tiny_policy(TinyModelConfig(sample_size=8, in_channels=4))
    policy.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                               down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4,
                               block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64)
    save_policy(policy, tmp_path / "sd")
    assert (tmp_path / "sd" / "vae" / "config.json").is_file()
    loaded = load_policy(ModelConfig(source=str(tmp_path / "sd")))
    assert loaded.vae is not None
    traj = sample_trajectories(loaded, ["a cat"], SamplingConfig(num_steps=2), seeds=[0])
    assert traj.latents.shape[2:] == (4, 8, 8) and traj.images.shape == (1, 64, 64, 3)


def test_lora_trains_only_adapters_and_starts_as_the_base_model():
    base = load_policy(ModelConfig())
    lora = load_policy(ModelConfig(lora=LoraConfig(enabled=True, rank=2)))
    names = [n for n, _ in trainable_parameters(lora.unet)]
    assert names and all("lora_" in n for n in names)
    total = sum(p.numel() for p in lora.unet.parameters())
    assert sum(p.numel() for _, p in trainable_parameters(lora.unet)) < total / 10
    cfg = SamplingConfig(num_steps=3)
    a = sample_trajectories(base, ["a cat"], cfg, seeds=[0])
    b = sample_trajectories(lora, ["a cat"], cfg, seeds=[0])
    np.testing.assert_array_equal(a.latents, b.latents)  # B = 0 adds exact zeros


def test_flat_weights_round_trip():
    a = load_policy(ModelConfig())
    with torch.no_grad():
        for _, p in trainable_parameters(a.unet):
            p.add_(0.01)
    b = load_policy(ModelConfig())
    load_flat_trainable(b.unet, flatten_trainable(a.unet))
    for (_, x), (_, y) in zip(trainable_parameters(a.unet), trainable_parameters(b.unet)):
        assert torch.equal(x, y)
