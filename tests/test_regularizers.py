import numpy as np
import pytest
import torch

from rlds.algo import make_optimizer
from rlds.algo.regularizers import pretrain_step, pretraining_loss
from rlds.config import AlgoConfig, ConfigError, ModelConfig
from rlds.configure import load_config
from rlds.data.pretrain_set import PretrainSet, write_pretrain_set
from rlds.policy import load_policy
from rlds.policy.sampling import encode_prompts


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


def test_pretraining_loss_keeps_to_its_noise_range(tmp_path):
    write_pretrain_set(tmp_path / "set.parquet", 16, seed=0)
    images, captions = next(PretrainSet(tmp_path / "set.parquet", resolution=16).stream(16))
    policy = load_policy(ModelConfig())
    seen = []
    policy.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    end = policy.scheduler.config.num_train_timesteps
    with torch.no_grad():
        for noise_range in ((0.0, 1.0), (0.0, 0.1), (0.9, 1.0)):
            for seed in range(4):
                pretraining_loss(policy, images, captions, torch.Generator().manual_seed(seed),
                                 noise_range=noise_range)
    whole, quietest, noisiest = torch.cat(seen[:4]), torch.cat(seen[4:8]), torch.cat(seen[8:])
    assert whole.min() < 0.1 * end <= whole.max() and whole.max() >= 0.9 * end
    assert quietest.max() < 0.1 * end and noisiest.min() >= 0.9 * end and noisiest.max() < end


def test_pretrain_noise_range_is_a_window_of_the_schedule(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompts: {items: [a]}\nrewards: [{name: brightness}]\nalgo: {pretrain_noise_range: [0.5, 0.5]}\n")
    with pytest.raises(ConfigError, match=r"algo.pretrain_noise_range: \[0.5, 0.5\] is not \[start, end\)"):
        load_config(str(path))


def test_caption_dropout_trains_the_unconditional_branch_on_the_same_noise(tmp_path):
    write_pretrain_set(tmp_path / "set.parquet", 16, seed=0)
    images, captions = next(PretrainSet(tmp_path / "set.parquet", resolution=16).stream(16))
    policy = load_policy(ModelConfig())
    empty = encode_prompts(policy, [""])[0]
    calls = []
    policy.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"])),
        with_kwargs=True)
    dropped = {}
    with torch.no_grad():
        for dropout in (0.0, 0.5, 1.0):
            pretraining_loss(policy, images, captions, torch.Generator().manual_seed(0), caption_dropout=dropout)
            dropped[dropout] = sum(torch.allclose(row, empty, atol=1e-5) for row in calls[-1][2])
    assert dropped[0.0] == 0 and 0 < dropped[0.5] < len(captions) and dropped[1.0] == len(captions)
    for x_t, t, _ in calls[1:]:  # the same noise and timesteps whatever the dropout
        assert torch.equal(x_t, calls[0][0]) and torch.equal(t, calls[0][1])


def test_pretrain_caption_dropout_is_a_share(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompts: {items: [a]}\nrewards: [{name: brightness}]\nalgo: {pretrain_caption_dropout: 1.0}\n")
    with pytest.raises(ConfigError, match=r"algo.pretrain_caption_dropout: must be in \[0, 1\)"):
        load_config(str(path))


def _perturbed(policy, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.unet.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_guidance_anchor_is_zero_at_the_reference_and_looks_only_at_quiet_rows(tmp_path):
    from rlds.algo.matching import snapshot
    from rlds.algo.regularizers import GuidanceAnchor

    write_pretrain_set(tmp_path / "set.parquet", 16, seed=0)
    images, captions = next(PretrainSet(tmp_path / "set.parquet", resolution=16).stream(16))
    policy = load_policy(ModelConfig())
    uncond = encode_prompts(policy, [""])
    x_t = torch.randn(16, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.arange(16) * 60  # 0 .. 900 of 1000
    cond = encode_prompts(policy, captions)
    anchor = GuidanceAnchor(snapshot(policy.unet), weight=1.0, fraction=0.5)
    calls = []
    policy.unet.register_forward_pre_hook(lambda module, args: calls.append(args[1].clone()))
    with torch.no_grad():
        pred, held = anchor.loss(policy, x_t, t, cond, uncond)
        assert held.item() < 1e-10  # the policy is its reference
        plain = policy.unet(x_t, t, encoder_hidden_states=cond).sample
        assert torch.allclose(pred, plain, atol=1e-5)  # the conditional output of every row
        # the extra rows (the unconditional branch) are the quiet ones, t < 500
        assert torch.equal(calls[0][16:], t[t < 500])
        _perturbed(policy)
        assert anchor.loss(policy, x_t, t, cond, uncond)[1].item() > 1e-6
        # no row quiet enough: nothing held, and no second branch computed
        assert anchor.loss(policy, x_t, t + 500, cond, uncond)[1].item() == 0


def test_anchor_steps_bring_the_guidance_direction_back_to_the_reference(tmp_path):
    from rlds.algo.matching import snapshot
    from rlds.algo.regularizers import GuidanceAnchor

    write_pretrain_set(tmp_path / "set.parquet", 16, seed=0)
    images, captions = next(PretrainSet(tmp_path / "set.parquet", resolution=16).stream(16))
    policy = load_policy(ModelConfig())
    anchor = GuidanceAnchor(snapshot(policy.unet), weight=1.0, fraction=1.0)
    _perturbed(policy, seed=1)
    opt = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], AlgoConfig(learning_rate=1e-3))
    held = [pretrain_step(policy, opt, images, captions, 0.0, 1.0, torch.Generator().manual_seed(0),
                          anchor=anchor)["guidance_anchor"] for _ in range(10)]
    assert held[0] > 0 and held[-1] < 0.5 * held[0]  # the same batch, noise and timesteps every step


def test_the_guidance_anchor_rides_l_pre(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompts: {items: [a]}\nrewards: [{name: brightness}]\nalgo: {guidance_anchor_beta: 1.0}\n")
    with pytest.raises(ConfigError, match="algo.guidance_anchor_beta: the anchor is taken in L_pre's step"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"algo.guidance_anchor_fraction: must be in \(0, 1\]"):
        load_config(str(path), ("algo.guidance_anchor_beta=0", "algo.guidance_anchor_fraction=0"))


def test_the_guidance_anchor_moves_the_unconditional_branch_only(tmp_path):
    from rlds.algo.matching import snapshot
    from rlds.algo.regularizers import GuidanceAnchor
    from rlds.policy.pipeline import WithParams

    policy = load_policy(ModelConfig())
    reference = snapshot(policy.unet)
    _perturbed(policy, seed=2)
    uncond = encode_prompts(policy, ["", ""])
    cond = encode_prompts(policy, ["a red circle", "a blue square"])
    x_t = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 300])
    params = [p for p in policy.unet.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    held = GuidanceAnchor(reference, weight=1.0, fraction=0.5).loss(policy, x_t, t, cond, uncond[:1])[1]
    with torch.no_grad():  # the target: the conditional output less the reference's direction, held fixed
        c = policy.unet(x_t, t, encoder_hidden_states=cond).sample
        policy_ref = WithParams(policy.unet, reference)
        target = c - (policy_ref(x_t, t, encoder_hidden_states=cond).sample
                      - policy_ref(x_t, t, encoder_hidden_states=uncond).sample)
    u = policy.unet(x_t, t, encoder_hidden_states=uncond).sample
    expected = (u - target).pow(2).mean()
    assert held.item() == pytest.approx(expected.item(), rel=1e-4)
    for got, want in zip(grads(held), grads(expected)):
        if want is not None:
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-7)
