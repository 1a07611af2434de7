import numpy as np
import pytest
import torch

from rlds.algo import make_optimizer, ppo_update
from rlds.algo.ppo import choose_steps, trainable_steps
from rlds.config import AlgoConfig, ModelConfig, SamplingConfig
from rlds.policy import ddim_step_with_logprob, load_policy, sample_trajectories, step_log_prob
from rlds.policy.builder import sd_scheduler


def test_logprob_is_the_gaussian_density_of_the_stored_step():
    sched = sd_scheduler()
    sched.set_timesteps(10)
    torch.manual_seed(0)
    x_t, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = sched.timesteps[4]
    prev, logp = ddim_step_with_logprob(sched, eps, t, x_t, eta=1.0)

    # Independent reference: the DDIM posterior from the paper's formulas, in float64.
    a_t = sched.alphas_cumprod[t].double()
    a_prev = sched.alphas_cumprod[t - 100].double()
    x_t64, eps64 = x_t.double(), eps.double()
    x0 = (x_t64 - (1 - a_t).sqrt() * eps64) / a_t.sqrt()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps64
    dist = torch.distributions.Normal(mean, var.sqrt())
    expected = dist.log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-5)

    # Scoring the stored sample gives the same number as sampling it did.
    _, again = ddim_step_with_logprob(sched, eps, t, x_t, eta=1.0, prev_sample=prev)
    assert torch.equal(again, logp)


def test_eta_scales_the_noise():
    sched = sd_scheduler()
    sched.set_timesteps(10)
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    a, _ = ddim_step_with_logprob(sched, eps, sched.timesteps[2], x_t, eta=1.0, generator=g)
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    b, _ = ddim_step_with_logprob(sched, eps, sched.timesteps[2], x_t, eta=0.5, generator=g)
    assert not torch.allclose(a, b)


class Float64:
    """A module run in float64 inside a float32 pipeline: a reference free of float32 rounding."""

    def __init__(self, module):
        self.module = module.double()
        self.config = getattr(module, "config", None)

    def parameters(self):
        return self.module.parameters()

    def __call__(self, *args, **kwargs):
        args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        return self.module(*args, **kwargs)


def test_a_chain_does_not_depend_on_its_batch_beyond_float32_rounding():
    """A chain draws all its noise from its own seed, so its batch changes only how the UNet's and
    the text encoder's matmuls round (their kernels block the batch differently, by CPU and thread
    count): not to the bit. The guarantee: the chain sampled in a batch is as close to the chain
    sampled alone as float32 rounding puts the chain sampled alone from the same chain computed
    with a float64 model (x 10), and far closer than a chain of another seed."""
    cfg = SamplingConfig(num_steps=4)
    policy = load_policy(ModelConfig())
    alone = sample_trajectories(policy, ["a red circle"], cfg, seeds=[7]).latents[0]
    batch = sample_trajectories(policy, ["a blue square", "a red circle"], cfg, seeds=[3, 7]).latents[1]
    other_seed = sample_trajectories(policy, ["a red circle"], cfg, seeds=[8]).latents[0]
    exact = load_policy(ModelConfig())
    exact.unet, exact.text_encoder = Float64(exact.unet), Float64(exact.text_encoder)
    reference = sample_trajectories(exact, ["a red circle"], cfg, seeds=[7]).latents[0]

    rounding = np.abs(alone - reference).max()
    assert 0 < rounding < 1e-3  # float32 rounding, not another computation
    assert np.abs(batch - alone).max() <= 10 * rounding
    assert np.abs(other_seed - alone).max() > 1e3 * rounding


def test_under_bfloat16_autocast_on_a_cpu_the_learner_still_recomputes_the_samplers_log_probs_to_the_bit():
    """model.dtype: bfloat16 runs the samplers and learners under autocast on a CPU too; the chain
    then differs from float32's (it is another computation), and the learner's recomputation does not."""
    policy = load_policy(ModelConfig())
    prompts, sampling = ["a red circle", "a blue square", "a cat"], SamplingConfig(num_steps=3, guidance_scale=3.0)
    bf16 = sample_trajectories(policy, prompts, sampling, seeds=[0, 1, 2], dtype=torch.bfloat16)
    fp32 = sample_trajectories(policy, prompts, sampling, seeds=[0, 1, 2])
    assert not np.array_equal(bf16.latents, fp32.latents)
    for step in range(3):
        assert torch.equal(step_log_prob(policy, bf16, step, torch.bfloat16).detach(),
                           torch.from_numpy(bf16.log_probs[:, step]))


def test_each_chain_is_sampled_at_its_own_guidance_scale_and_its_log_probs_recomputed_to_the_bit():
    """A mixed task's sets sampled at their own scales (prompts.guidance_scale_by_set) in one batch:
    each chain is the chain its scale gives (up to the batch's rounding, far from the other scale's),
    and the learner, calling the UNet with the same layout, recomputes every log-prob exactly."""
    policy = load_policy(ModelConfig())
    cfg, prompts, seeds = SamplingConfig(num_steps=4, guidance_scale=1.0), ["a red circle", "a cat", "a dog"], [0, 1, 2]
    mixed = sample_trajectories(policy, prompts, cfg, seeds=seeds, guidance_scale=[1.0, 3.0, 1.0])
    guided = sample_trajectories(policy, prompts, cfg, seeds=seeds, guidance_scale=3.0).latents
    plain = sample_trajectories(policy, prompts, cfg, seeds=seeds).latents
    np.testing.assert_array_equal(mixed.guidance_scale, [1.0, 3.0, 1.0])
    for i, (same, other) in enumerate([(plain, guided), (guided, plain), (plain, guided)]):
        assert np.abs(mixed.latents[i] - same[i]).max() < 1e-3 * np.abs(mixed.latents[i] - other[i]).max()
    for step in range(4):
        assert torch.equal(step_log_prob(policy, mixed, step).detach(), torch.from_numpy(mixed.log_probs[:, step]))


def test_first_ratio_is_exactly_one_and_positive_advantage_raises_logprob():
    torch.manual_seed(0)
    policy = load_policy(ModelConfig())
    sampling = SamplingConfig(num_steps=4, guidance_scale=3.0)
    traj = sample_trajectories(policy, ["a red circle", "a blue square", "a cat", "a dog"], sampling,
                               seeds=[0, 1, 2, 3])
    for step in range(4):  # the learner's recomputation equals the sampler's, to the bit
        assert torch.equal(step_log_prob(policy, traj, step).detach(), torch.from_numpy(traj.log_probs[:, step]))

    algo = AlgoConfig(timesteps_per_iteration=1, clip_range=1.0, learning_rate=1e-5, max_grad_norm=10.0)
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, algo)
    advantages = np.array([1.0, -1.0, -1.0, -1.0], dtype=np.float32)
    stats = ppo_update(policy, [traj], [advantages], opt, algo, np.random.default_rng(0))
    assert stats["loss"] != 0
    step = int(choose_steps(4, 1, 1, np.random.default_rng(0))[0, 0])  # the step ppo_update drew
    gain = step_log_prob(policy, traj, step).detach().numpy() - traj.log_probs[:, step]
    assert gain[0] > 0, gain
    assert gain[0] > gain[1:].max(), gain


def test_v_prediction_gives_the_same_step_as_the_equivalent_epsilon():
    from diffusers import DDIMScheduler

    eps_s = sd_scheduler()
    v_s = DDIMScheduler.from_config(eps_s.config, prediction_type="v_prediction")
    for s in (eps_s, v_s):
        s.set_timesteps(10)
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = eps_s.timesteps[3]
    a = eps_s.alphas_cumprod[t]
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # v = alpha_t * noise - sigma_t * x0
    prev, logp = ddim_step_with_logprob(eps_s, eps, t, x_t, eta=1.0)
    _, logp_v = ddim_step_with_logprob(v_s, v, t, x_t, eta=1.0, prev_sample=prev)
    torch.testing.assert_close(logp_v, logp, rtol=1e-4, atol=1e-4)


def test_noisiest_fraction_and_accumulated_optimizer_steps(monkeypatch):
    import rlds.algo.ppo

    trained = []
    recorded = rlds.algo.ppo.step_log_prob_and_kl

    def record(policy, traj, step, dtype, reference):
        trained.append(step)
        return recorded(policy, traj, step, dtype, reference)

    monkeypatch.setattr(rlds.algo.ppo, "step_log_prob_and_kl", record)
    policy = load_policy(ModelConfig())
    traj = sample_trajectories(policy, ["a red circle", "a cat"], SamplingConfig(num_steps=8), seeds=[0, 1])
    algo = AlgoConfig(timesteps_per_iteration=2, noisiest_fraction=0.5, optimizer_steps=1, learning_rate=1e-5)
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    opt = make_optimizer(params, algo)
    ppo_update(policy, [traj] * 3, [np.array([1.0, -1.0], np.float32)] * 3, opt, algo, np.random.default_rng(0))
    assert opt.state[params[0]]["step"] == 1  # both denoising steps in one optimizer step
    assert len(trained) == 3 * 2 and all(0 <= s < 4 for s in trained)  # the first half of 8 steps
    steps = choose_steps(trainable_steps(8, 0.5), 2, 3, np.random.default_rng(0))  # what it drew
    assert sorted(trained) == sorted(steps.reshape(-1).tolist())
    assert all(len(set(batch)) == 2 for batch in steps)  # distinct steps per trajectory batch


def test_the_step_kl_to_the_reference_is_zero_at_the_reference_and_grows_as_the_policy_moves():
    from rlds.algo.matching import snapshot
    from rlds.policy.ddim import ddim_step_mean, step_kl
    from rlds.policy.sampling import step_log_prob_and_kl

    policy = load_policy(ModelConfig())
    traj = sample_trajectories(policy, ["a red circle", "a cat"], SamplingConfig(num_steps=4, guidance_scale=3.0),
                               seeds=[0, 1])
    reference = snapshot(policy.unet)
    logp, kl = step_log_prob_and_kl(policy, traj, 1, reference=reference)
    assert torch.equal(logp.detach(), torch.from_numpy(traj.log_probs[:, 1])) and torch.all(kl == 0)
    algo = AlgoConfig(timesteps_per_iteration=2, learning_rate=1e-3, kl_beta=1.0, clip_range=1.0)
    opt = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], algo)
    stats = ppo_update(policy, [traj], [np.array([1.0, -1.0], np.float32)], opt, algo, np.random.default_rng(0),
                       reference=reference)
    assert stats["kl"] > 0  # the second optimizer step's terms are away from the reference
    _, kl = step_log_prob_and_kl(policy, traj, 1, reference=reference)
    assert torch.all(kl > 0)
    # closed form: two Gaussians of the same std
    sched = sd_scheduler()
    sched.set_timesteps(10)
    x_t, e1, e2 = torch.randn(3, 2, 3, 4, 4)
    mean1, std = ddim_step_mean(sched, e1, sched.timesteps[3], x_t, 1.0)
    mean2, _ = ddim_step_mean(sched, e2, sched.timesteps[3], x_t, 1.0)
    p1 = torch.distributions.Normal(mean1.double(), std.double())
    p2 = torch.distributions.Normal(mean2.double(), std.double())
    expected = torch.distributions.kl_divergence(p1, p2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step_kl(mean1, mean2, std).double(), expected, rtol=1e-4, atol=1e-6)


def test_a_group_shares_its_deterministic_prefix_and_branches_in_the_stochastic_window(monkeypatch):
    import rlds.algo.ppo
    from rlds.policy.sampling import step_etas

    cfg = SamplingConfig(num_steps=6, stochastic_window=[0.5, 1.0])
    assert step_etas(cfg).tolist() == [0, 0, 0, 1, 1, 1]
    policy = load_policy(ModelConfig())
    traj = sample_trajectories(policy, ["a cat", "a cat"], cfg, seeds=[1, 2], start_seeds=[9, 9])
    assert np.array_equal(traj.latents[0, :4], traj.latents[1, :4])  # x_T and three deterministic steps
    assert not np.allclose(traj.latents[0, 4:], traj.latents[1, 4:])  # then each its own noise
    trained = []
    recorded = rlds.algo.ppo.step_log_prob_and_kl
    monkeypatch.setattr(rlds.algo.ppo, "step_log_prob_and_kl",
                        lambda p, t, step, dtype, ref: trained.append(step) or recorded(p, t, step, dtype, ref))
    algo = AlgoConfig(timesteps_per_iteration=3, learning_rate=1e-5)
    opt = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], algo)
    stats = ppo_update(policy, [traj], [np.array([1.0, -1.0], np.float32)], opt, algo, np.random.default_rng(0))
    assert sorted(trained) == [3, 4, 5] and np.isfinite(stats["loss"])  # only the stochastic steps


def test_ppo_needs_enough_stochastic_steps_to_train():
    from rlds.config import ConfigError
    from rlds.configure import load_config

    base = ("prompts.items=[a cat]", "rewards=[{name: brightness}]", "sampling.num_steps=10")
    with pytest.raises(ConfigError, match=r"algo\.timesteps_per_iteration: must be between 1 and the 2 trainable"):
        load_config(None, base + ("sampling.stochastic_window=[0.3, 0.7]", "algo.noisiest_fraction=0.5",
                                  "algo.timesteps_per_iteration=3"))
    with pytest.raises(ConfigError, match=r"sampling\.stochastic_window: \[0.5, 0.2\] is not \[start, end\)"):
        load_config(None, base + ("sampling.stochastic_window=[0.5, 0.2]",))
