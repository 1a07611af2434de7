"""The forward-process objectives (nft, awm) in one process: gradients, directions, old policy."""
import numpy as np
import pytest
import torch

from rlds.algo.matching import draw_timesteps, noised, snapshot
from rlds.algo.objectives import OBJECTIVES, objective_class
from rlds.algo.ppo import make_optimizer
from rlds.config import AlgoConfig, LoraConfig, ModelConfig, SamplingConfig
from rlds.policy import load_policy, sample_trajectories
from rlds.policy.pipeline import trainable_parameters
from rlds.policy.sampling import guided_noise

PROMPTS = ["a red circle", "a blue square", "a cat", "a dog"]


def setup(objective: str, lora: bool = False, guidance_scale=None, **algo):
    torch.manual_seed(0)
    policy = load_policy(ModelConfig(lora=LoraConfig(enabled=lora, rank=4)))
    traj = sample_trajectories(policy, PROMPTS, SamplingConfig(num_steps=4), seeds=[0, 1, 2, 3], keep_chain=False,
                               guidance_scale=guidance_scale)
    cfg = AlgoConfig(objective=objective, timesteps_per_iteration=2, optimizer_steps=1, learning_rate=1e-3,
                     **algo)
    opt = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], cfg)
    return policy, traj, cfg, opt, objective_class(objective)(policy.unet, cfg)


def denoising_loss(policy, traj, guided=False, seed=5) -> np.ndarray:
    """Each sample's epsilon MSE at fixed noise levels and noise: [B]; of the output it trains (the
    guided one at the chain's own scale with guided training, else the conditional one)."""
    x0 = torch.tensor(traj.latents[:, -1])
    t = torch.tensor(draw_timesteps(1000, 1.0, 1, len(x0), np.random.default_rng(seed))[:, 0])
    x_t, noise = noised(policy.scheduler, x0, t, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = guided_noise(policy, x_t, t, torch.tensor(traj.prompt_embeds), torch.tensor(traj.negative_embeds),
                           traj.guidance_scale if guided else 1.0)
    return ((out - noise) ** 2).mean(dim=(1, 2, 3)).numpy()


def test_forward_objectives_are_registered_and_need_only_x0():
    assert {"ppo", "nft", "awm"} <= set(OBJECTIVES)
    assert objective_class("ppo").needs_chain
    assert not objective_class("nft").needs_chain and not objective_class("awm").needs_chain
    traj = sample_trajectories(load_policy(ModelConfig()), PROMPTS[:2], SamplingConfig(num_steps=4), seeds=[0, 1],
                               keep_chain=False)
    assert traj.latents.shape == (2, 1, 3, 16, 16) and traj.log_probs.shape == (2, 0)


# guided training at each chain's own scale (prompts.guidance_scale_by_set): the first and third
# chains guided, the others not
PER_CHAIN = [4.0, 1.0, 4.0, 1.0]


@pytest.mark.parametrize("objective", ["nft", "awm"])
@pytest.mark.parametrize("guided,scales", [(False, None), (True, None), (True, PER_CHAIN)])
def test_zero_advantages_give_zero_policy_gradient(objective, guided, scales):
    policy, traj, cfg, opt, obj = setup(objective, guided_training=guided, guidance_scale=scales)
    grads = []
    opt.step = lambda: grads.append([p.grad.abs().max().item() for p in policy.unet.parameters()
                                     if p.grad is not None])  # what the step would have applied
    stats = obj.update(policy, [traj], [np.zeros(4, np.float32)], opt, np.random.default_rng(0))
    assert stats["grad_norm"] == 0 and len(grads[0]) > 10 and max(grads[0]) == 0


@pytest.mark.parametrize("objective", ["nft", "awm"])
@pytest.mark.parametrize("guided,scales", [(False, None), (True, None), (True, PER_CHAIN)])
def test_a_positive_advantage_lowers_that_samples_denoising_loss(objective, guided, scales):
    policy, traj, cfg, opt, obj = setup(objective, clip_range=1.0, guided_training=guided, guidance_scale=scales)
    before = denoising_loss(policy, traj, guided)
    advantages = np.array([2.0, -2.0, 0.0, 0.0], np.float32)
    for it in range(3):
        obj.update(policy, [traj], [advantages], opt, np.random.default_rng(it))
        obj.end_iteration(policy.unet)
    change = denoising_loss(policy, traj, guided) - before
    assert change[0] < 0 and change[0] < change[1], change


def test_nft_old_policy_follows_its_soft_update_schedule():
    policy, traj, cfg, opt, nft = setup("nft", old_policy_decay_rate=0.25, old_policy_decay_max=0.4)
    params = dict(trainable_parameters(policy.unet))
    name = next(iter(params))
    expected = params[name].detach().clone()
    decays = []
    for i in range(4):
        with torch.no_grad():
            params[name].add_(1.0)
        decays.append(nft.end_iteration(policy.unet)["old_policy_decay"])
        eta = min(0.25 * i, 0.4)
        expected = eta * expected + (1 - eta) * params[name].detach()
        torch.testing.assert_close(nft.old[name], expected)
    assert decays == [0.0, 0.25, 0.4, 0.4]  # eta_i = min(rate * i, max)


def test_nft_skips_the_old_forward_only_while_the_old_policy_is_the_current_one():
    """old_policy_decay_max 0 keeps old == current after every iteration: the update is the same
    with and without the old policy's forward pass, which then runs only in later tasks' updates."""
    advantages = [np.array([1.0, -1.0, 0.5, -0.5], np.float32)]
    results = []
    for skip in (True, False):
        policy, traj, cfg, opt, nft = setup("nft", old_policy_decay_max=0.0)
        calls = []
        with_old = nft._term

        def term(policy, output, predict_with, *rest, skip=skip, with_old=with_old):
            def counted(params):
                calls.append(1)
                return predict_with(params)
            if not skip:
                nft.old_is_current = False
            return with_old(policy, output, counted, *rest)

        nft._term = term
        for it in range(2):
            nft.update(policy, [traj], advantages, opt, np.random.default_rng(it))
            assert not nft.old_is_current  # a second task's update would need the old forward
            nft.end_iteration(policy.unet)
            assert nft.old_is_current
        results.append((len(calls), snapshot(policy.unet)))
    (skipped, after_skip), (full, after_full) = results
    assert skipped == 0 and full == 4  # 2 iterations x 2 noise levels, one batch
    for name in after_full:
        torch.testing.assert_close(after_skip[name], after_full[name], rtol=0, atol=1e-6)


def test_awm_ratio_is_exactly_one_in_the_first_step_and_clipped_after():
    policy, traj, cfg, opt, awm = setup("awm", clip_range=1e-3)
    stats = awm.update(policy, [traj], [np.array([1.0, -1.0, 1.0, -1.0], np.float32)], opt, np.random.default_rng(0))
    assert stats["ratio/min"] == 1.0 and stats["ratio/max"] == 1.0
    cfg.optimizer_steps = 2  # the second step's ratios are against the update's start
    stats = awm.update(policy, [traj], [np.array([1.0, -1.0, 1.0, -1.0], np.float32)], opt, np.random.default_rng(1))
    assert stats["ratio/max"] > 1.0 or stats["ratio/min"] < 1.0


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_forward_objectives_train_lora_adapters_only(objective):
    policy, traj, cfg, opt, obj = setup(objective, lora=True, kl_beta=0.1)
    frozen = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if not p.requires_grad}
    adapters = snapshot(policy.unet)
    assert adapters and all("lora_" in n for n in adapters)
    stats = obj.update(policy, [traj], [np.array([1.0, -1.0, 0.5, -0.5], np.float32)], opt, np.random.default_rng(0))
    assert np.isfinite(stats["loss"]) and stats["kl"] == 0  # the first step starts at the reference
    assert all(torch.equal(frozen[n], p) for n, p in policy.unet.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(adapters[n], p) for n, p in trainable_parameters(policy.unet))
    stats = obj.update(policy, [traj], [np.array([1.0, -1.0, 0.5, -0.5], np.float32)], opt, np.random.default_rng(1))
    assert stats["kl"] > 0


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_caption_dropout_trains_the_empty_prompt_on_the_same_samples(objective):
    """A dropped term is the same term with the empty prompt's embedding: dropping every caption
    updates the weights as training on copies whose prompt is "" does, and keeping every caption
    updates them otherwise."""
    from dataclasses import replace

    advantages = [np.array([1.0, -1.0, 0.5, -0.5], np.float32)]
    after = {}
    for name, dropout, empty in [("dropped", 1 - 1e-9, False), ("empty", 0.0, True), ("kept", 0.0, False)]:
        policy, traj, _, opt, obj = setup(objective, caption_dropout=dropout)
        if empty:
            traj = replace(traj, prompt_embeds=np.repeat(traj.negative_embeds, len(traj), axis=0))
        obj.update(policy, [traj], advantages, opt, np.random.default_rng(0))
        after[name] = snapshot(policy.unet)
    for key, value in after["dropped"].items():
        torch.testing.assert_close(value, after["empty"][key])
    assert any(not torch.allclose(v, after["kept"][k]) for k, v in after["dropped"].items())


def test_caption_dropout_out_of_range_names_its_key():
    from rlds.configure import load_config

    with pytest.raises(ValueError, match="algo.caption_dropout"):
        load_config("configs/shapes_mix_nft.yaml", ("algo.caption_dropout=1.0",))
    with pytest.raises(ValueError, match="algo.caption_dropout.*nft and awm"):
        load_config("configs/shapes_mix_nft.yaml", ("algo.objective=ppo", "algo.caption_dropout=0.1"))


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_guided_chains_train_on_their_own_noisiest_window(objective):
    """With algo.guided_noisiest_fraction, the chains sampled with guidance are trained only at the
    noisiest noise levels it names, the others over algo.noisiest_fraction as before."""
    policy, traj, _, opt, obj = setup(objective, guidance_scale=PER_CHAIN, noisiest_fraction=1.0,
                                      guided_noisiest_fraction=0.1)
    seen = []
    policy.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    for seed in range(4):  # 2 noise levels a sample each time
        obj.update(policy, [traj], [np.array([1.0, -1.0, 0.5, -0.5], np.float32)], opt, np.random.default_rng(seed))
    t = torch.stack([s for s in seen if s.shape == (4,)])  # [calls, chains]: the trained output's timesteps
    guided = torch.tensor(PER_CHAIN) != 1.0
    assert t[:, guided].min() >= 900
    assert t[:, ~guided].min() < 900  # 16 draws over the whole schedule: all in its noisiest tenth by chance 1e-16


def test_guided_noisiest_fraction_is_for_the_forward_objectives():
    from rlds.configure import load_config

    with pytest.raises(ValueError, match=r"algo.guided_noisiest_fraction: must be in \(0, 1\]"):
        load_config("configs/shapes_mix_nft.yaml", ("algo.guided_noisiest_fraction=0",))
    with pytest.raises(ValueError, match="algo.guided_noisiest_fraction.*nft and awm"):
        load_config("configs/shapes_mix_nft.yaml", ("algo.objective=ppo", "algo.guided_noisiest_fraction=0.5"))


def _grad_norm(obj, policy, traj, opt, advantages, groups):
    grads = []
    opt.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in policy.unet.parameters()
                                               if p.grad is not None]).norm().item())
    obj.update(policy, [traj], [advantages], opt, np.random.default_rng(0), groups=groups)
    return grads[0]


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_group_shared_noise_cancels_what_a_group_has_in_common(objective):
    """Two groups, each of two copies of one image with advantages +1 and -1: with the group's noise
    shared the two terms are the same but for their sign, so the policy gradient vanishes; drawn
    independently, each copy sees other noise and the gradient is the noise draw's."""
    policy, traj, _, opt, obj = setup(objective, group_shared_noise=True, clip_range=1.0)
    for a, b in ((1, 0), (3, 2)):  # rows 1 and 3 copy rows 0 and 2: image and prompt
        traj.latents[a] = traj.latents[b]
        traj.prompt_embeds[a] = traj.prompt_embeds[b]
    advantages = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    independent = _grad_norm(obj, policy, traj, opt, advantages, None)
    shared = _grad_norm(obj, policy, traj, opt, advantages, [np.array([7, 7, 3, 3])])
    assert independent > 0 and shared < 1e-4 * independent, (shared, independent)


def test_group_shared_noise_with_groups_of_one_is_the_independent_update():
    """Each image its own group draws the same noise levels and noise as no groups at all."""
    after = []
    for groups in (None, [np.array([5, 2, 9, 4])]):
        policy, traj, _, opt, obj = setup("nft", group_shared_noise=True)
        obj.update(policy, [traj], [np.array([1.0, -1.0, 0.5, -0.5], np.float32)], opt, np.random.default_rng(0),
                   groups=groups)
        after.append(torch.cat([p.detach().flatten() for p in policy.unet.parameters() if p.requires_grad]))
    assert torch.allclose(after[0], after[1], rtol=0, atol=1e-7)


def test_noise_draws_number_groups_in_order_of_appearance():
    from rlds.algo.matching import noise_draws

    assert noise_draws(None, 3) is None
    assert noise_draws(np.array([42, 42, 7, 7, 42]), 5).tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="3 group ids for a batch of 4"):
        noise_draws(np.array([1, 1, 2]), 4)


def test_group_shared_noise_is_for_the_forward_objectives():
    from rlds.configure import load_config

    assert load_config("configs/shapes_mix_nft.yaml", ("algo.group_shared_noise=true",)).algo.group_shared_noise
    with pytest.raises(ValueError, match="algo.group_shared_noise.*nft and awm"):
        load_config("configs/shapes_mix_nft.yaml", ("algo.objective=ppo", "algo.guided_noisiest_fraction=null",
                                                    "algo.group_shared_noise=true"))
