import json

import numpy as np
import pytest
import torch

from rlds.algo import PerPromptStatTracker, clipped_policy_loss, compute_advantages, lr_factor


def test_batch_advantages_are_normalised_and_clamped():
    r = np.array([0.0, 1.0, 2.0, 3.0, 1000.0])
    a = compute_advantages(r, "batch", clip=1.5, prompt_ids=np.zeros(5))
    assert a.max() == pytest.approx(1.5)
    a = compute_advantages(r[:4], "batch", clip=10, prompt_ids=np.zeros(4))
    assert a.mean() == pytest.approx(0, abs=1e-6) and a.std() == pytest.approx(1, abs=1e-4)


def test_group_advantages_centre_each_group_on_one_scale():
    r = np.array([1.0, 2.0, 10.0, 20.0, 5.0, 5.001])
    a = compute_advantages(r, "group", 10, np.zeros(6), group_ids=np.array([0, 0, 1, 1, 2, 2]))
    centred = np.array([-0.5, 0.5, -5, 5, -0.0005, 0.0005])
    np.testing.assert_allclose(a, centred / centred.std(), rtol=1e-5)
    assert abs(a[5]) < 1e-3  # a near-tie stays near 0, not +-1


def test_tasks_are_normalised_separately():
    r = np.array([1.0, 2.0, 100.0, 300.0])
    a = compute_advantages(r, "batch", 10, np.zeros(4), task_ids=np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(a, [-1, 1, -1, 1], atol=1e-5)


def test_per_prompt_tracker_uses_history_once_it_has_enough():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=4)
    first = tracker.update(np.array([0, 0]), np.array([1.0, 3.0]))
    np.testing.assert_allclose(first, [-1, 1], atol=1e-5)  # too little history: batch statistics
    tracker.update(np.array([0, 0]), np.array([1.0, 3.0]))
    out = tracker.update(np.array([0]), np.array([5.0]))
    buf = np.array([3.0, 1.0, 3.0, 5.0])  # the last four rewards of prompt 0
    assert out[0] == pytest.approx((5 - buf.mean()) / (buf.std() + 1e-7))
    state = tracker.state_dict()
    fresh = PerPromptStatTracker(4, 4)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_clipped_loss_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # ratios of 1.5 (above 1 + eps) and 0.5 (below 1 - eps)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_()
    loss, stats = clipped_policy_loss(new, old, adv, clip_range=0.2)
    loss.backward()
    # A>0 and ratio past 1+eps: clipped, no gradient; A>0 and ratio below: the gradient pushes up.
    assert new.grad[0] == 0 and new.grad[1] != 0
    assert new.grad[2] != 0 and new.grad[3] == 0
    assert stats["clipfrac"] == 1.0
    assert loss.item() == pytest.approx(np.mean([-1.2, -0.5, 1.5, 0.8]))


def test_learning_rate_schedules():
    assert lr_factor("linear", 0, 10, warmup=2) == 0.5 and lr_factor("linear", 1, 10, warmup=2) == 1.0
    assert lr_factor("linear", 10, 10, warmup=2) == 0.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("constant", 7, 10) == 1.0


def test_metrics_reduce_by_one_rule_and_lost_updates_have_no_statistics():
    from rlds.distributed.protocol import UpdateResult
    from rlds.stats import reduce_metrics

    rows = [{"loss": 1.0, "ratio/min": 0.9, "ratio/max": 1.1}, {"loss": 3.0, "ratio/min": 0.8, "ratio/max": 1.3,
                                                               "time/publish_s": 0.5}]
    assert reduce_metrics(rows) == {"loss": 2.0, "ratio/max": 1.3, "ratio/min": 0.8, "time/publish_s": 0.5}
    ranks = [UpdateResult(rows[0]), UpdateResult(rows[1])]
    assert UpdateResult.reduce(ranks) == UpdateResult(reduce_metrics(rows))
    lost = UpdateResult.reduce(ranks + [UpdateResult(lost=True)])
    assert lost.lost and lost.stats == {}


def test_every_registry_rejects_what_it_does_not_know():
    from rlds.algo import ADVANTAGES, LR_SCHEDULES, OBJECTIVES

    assert set(ADVANTAGES) == {"batch", "per_prompt", "group"} and set(LR_SCHEDULES) == {"constant", "linear", "cosine"}
    assert "ppo" in OBJECTIVES
    with pytest.raises(ValueError, match="unknown advantage mode 'grouped'"):
        compute_advantages(np.ones(2), "grouped", 10, np.zeros(2))
    with pytest.raises(ValueError, match="need a PerPromptStatTracker"):
        compute_advantages(np.ones(2), "per_prompt", 10, np.zeros(2))


def test_first_draw_baseline_takes_the_prompt_draw_out_of_a_rising_reward():
    """An easy prompt (0.8) and a hard one (0.2) drawn in a changing mix: the raw mean follows the
    mix, the gain follows the policy (the same reward on every prompt's later draws: gain 0; 0.1
    better: gain 0.1)."""
    from rlds.stats import FirstDrawBaseline

    baseline = FirstDrawBaseline()
    ids, groups = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    assert len(baseline.gains("r", np.array([0.8, 0.8, 0.2, 0.2]), ids, groups)) == 0  # first draws
    hard_only = baseline.gains("r", np.array([0.2, 0.2, 0.2, 0.2]), np.array([1, 1, 1, 1]), groups)
    np.testing.assert_allclose(hard_only, [0.0, 0.0])  # the raw mean fell from 0.5 to 0.2
    np.testing.assert_allclose(baseline.gains("r", np.array([0.9, 0.9, 0.3, 0.3]), ids, groups), [0.1, 0.1])
    assert len(baseline.gains("other reward", np.array([0.9, 0.9]), np.array([0, 0]), np.array([0, 0]))) == 0
    restored = FirstDrawBaseline()
    restored.load_state_dict(json.loads(json.dumps(baseline.state_dict())))
    np.testing.assert_allclose(restored.gains("r", np.array([1.0]), np.array([0]), np.array([7])), [0.2])
    capped = FirstDrawBaseline(max_entries=1)
    capped.gains("r", np.array([0.5, 0.5]), np.array([0, 1]), np.array([0, 1]))
    assert list(capped.first) == ["r|0"]


def test_group_diagnostics_and_image_statistics():
    from rlds.stats import group_diagnostics, image_stats

    out = group_diagnostics(np.array([1.0, 1.0, 0.0, 2.0]), np.array([0, 0, 1, 1]))
    assert out == {"zero_std_groups": 0.5, "group_std": 0.5}
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1, ..., 0] = 255  # pure red
    stats = image_stats(images)
    np.testing.assert_allclose(stats["brightness"], [0, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(stats["saturation"], [0, 1])


def test_ppo_learns_brightness_in_one_process(tiny_config):
    """The sync run's recipe (tests/test_train.py) in the benchmark's plain one-process loop, no Ray
    actors: its sampling, rewards, batch advantages, clipped objective and optimizer. Deterministic on
    a machine, so when the distributed run's learning check fails, this says whether the algorithm or
    the moving of work is to blame."""
    from rlds.bench.core import plain_process
    from rlds.policy import load_policy, sample_trajectories

    config = tiny_config("algo.batch_size=16", "algo.timesteps_per_iteration=3")
    policy, prompts = load_policy(config.model), config.prompts.items

    def held_out() -> np.ndarray:  # 64 chains of their own seeds, drawn before and after
        with torch.no_grad():
            traj = sample_trajectories(policy, [prompts[i % len(prompts)] for i in range(64)], config.sampling,
                                       seeds=range(10**6, 10**6 + 64), keep_chain=False)
        return traj.images.reshape(64, -1).mean(1) / 255

    before = held_out()
    plain_process(config, iterations=12, warmup=0, policy=policy)
    gain = held_out() - before
    se = gain.std(ddof=1) / np.sqrt(len(gain))
    # measured: +0.110, +0.073, +0.116 (seeds 0, 1, 2), each +-0.0011-0.0014
    assert gain.mean() > 0.01 and gain.mean() > 5 * se, (gain.mean(), se)
