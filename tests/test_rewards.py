import numpy as np
import pytest

from rlds.rewards import build_reward


def images():
    rng = np.random.default_rng(0)
    flat = np.full((16, 16, 3), 120, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    return np.stack([flat, noise])


def test_jpeg_rewards_order_simple_and_detailed_images():
    comp = build_reward("jpeg_compressibility", {})(images(), ["a", "b"], np.arange(2))
    incomp = build_reward("jpeg_incompressibility", {})(images(), ["a", "b"], np.arange(2))
    assert comp[0] > comp[1]
    np.testing.assert_allclose(comp, -incomp)


def test_brightness():
    imgs = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
    np.testing.assert_allclose(build_reward("brightness", {})(imgs, ["", ""], np.arange(2)), [0, 1])


def test_group_reward_is_the_mean_of_its_group_and_shared_by_equal_images():
    rng = np.random.default_rng(1)
    same = np.repeat(rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8), 2, axis=0)
    varied = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    scores = build_reward("diversity", {})(np.concatenate([same, varied]), ["p"] * 4, np.array([0, 0, 1, 1]))
    assert scores[0] == scores[1] == 0
    assert scores[2] == scores[3] > 0


def test_group_reward_credits_each_image_its_leave_one_out_contribution():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    group = np.concatenate([base, base, rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)])
    diversity = build_reward("diversity", {})
    values = diversity(group, ["p"] * 3, np.zeros(3))
    assert values.mean() == pytest.approx(diversity.score_group(group, "p"), rel=1e-5)
    assert values[0] == pytest.approx(values[1]) and values[2] > values[0]  # the odd one out adds diversity


def test_unknown_reward_and_bad_args_say_what_is_wrong():
    with pytest.raises(KeyError, match="unknown reward 'sharpness'"):
        build_reward("sharpness", {})
    with pytest.raises(TypeError, match="jpeg_compressibility.*bad args"):
        build_reward("jpeg_compressibility", {"qualty": 5})
