"""ImageReward in its own Ray environment, built for real from rlds' shipped pins (the first test
here builds it: about 2-3 minutes on 2 cores with the package index at hand), on a random-weight
model of the real architecture (BLIP's ViT-L; a 2-layer BERT) saved as a user's model folder."""
import sys

import numpy as np
import pytest
from ray import cloudpickle

from rlds.bench.rewards import save_random_image_reward, write_image_reward_config
from rlds.config import RewardConfig
from rlds.distributed.reward import reward_runtime_env
from rlds.rewards.human_preference import FILES, weight_files

pytestmark = pytest.mark.timeout(900)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in the reward's environment
ENV = reward_runtime_env(RewardConfig(name="image_reward"))


@pytest.fixture(scope="module")
def image_reward_folder(ray_local, tmp_path_factory):
    """BLIP's ViT-L and a 2-layer BERT, random, with a re-initialised head (built in the environment)."""
    folder = write_image_reward_config(tmp_path_factory.mktemp("image_reward"), bert_layers=2)
    ray_local.get(ray_local.remote(runtime_env=ENV, num_cpus=1)(save_random_image_reward).remote(str(folder)))
    return str(folder)


def _scores(folder: str, images, prompts):
    """Inside the environment: batched scores, one-at-a-time scores, the package's own PIL scores."""
    from PIL import Image

    from rlds.rewards import build_reward

    reward = build_reward("image_reward", {"model": folder, "tokenizer": folder, "device": "cpu", "batch_size": 3})
    batched = reward(images, prompts, np.arange(len(images)))
    alone = [reward(images[i:i + 1], prompts[i:i + 1], np.zeros(1))[0] for i in range(len(images))]
    package = [reward.model.score(p, Image.fromarray(im)) for im, p in zip(images, prompts)]
    return batched, np.array(alone), np.array(package), sys.executable


def test_image_reward_runs_in_its_own_environment_batched_as_the_package_scores_one_image(ray_local,
                                                                                      image_reward_folder):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 3)).astype(np.uint8)
    images[:, :32] = 30
    prompts = ["a photo of a cat", "a red circle", "a blue square", "a dog", "a photo of a dog " * 12]
    remote = ray_local.remote(runtime_env=ENV, num_cpus=1)(_scores)
    batched, alone, package, python = ray_local.get(remote.remote(image_reward_folder, images, prompts))
    assert "runtime_resources" in python  # Ray's environment, not rlds' own interpreter
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4)
    # the package resizes a PIL image in uint8; ours resizes the batch in float: about 1/255 apart
    np.testing.assert_allclose(batched, package, atol=0.05 * np.std(package) + 1e-3)
    assert np.std(batched) > 1e-3  # the head was re-initialised: scores differ image to image


def test_missing_weights_name_the_file_and_how_to_get_it(tmp_path):
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks ImageReward\.pt; download both .*hf download THUDM"):
        weight_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cannot get ImageReward\.pt and med_config\.json from 'no-such/repo'"):
        weight_files("no-such/repo")
    assert FILES == ("ImageReward.pt", "med_config.json")
    assert any(p.startswith("image-reward==") for p in ENV["pip"]) and "torch==2.13.0" in ENV["pip"]


def test_a_tiny_sd_model_trains_on_image_reward_through_its_pool(ray_local, tiny_config, tiny_sd_model,
                                                                image_reward_folder, tmp_path):
    import yaml

    from rlds.metrics import read_metrics
    from rlds.trainer import Trainer

    path = tmp_path / "preference.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": tiny_sd_model}, "sampling": {"num_steps": 4},
        "prompts": {"items": ["a photo of a cat", "a red circle"]},
        "rewards": [{"name": "image_reward", "num_cpus": 1,
                     "args": {"model": image_reward_folder, "tokenizer": image_reward_folder, "device": "cpu"}}],
        "sampler": {"num_cpus": 0.5, "batch_size": 4}, "ray": {"num_cpus": 4}}))
    config = tiny_config(f"run_dir={tmp_path / 'run'}", "iterations=2", "algo.batch_size=4", "ray.actor_timeout_s=600",
                         path=str(path))
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["samples"] for r in rows] == [4, 8]
    assert all(np.isfinite(r["reward/image_reward/mean"]) and np.isfinite(r["loss"]) for r in rows)
    assert all(r["drops/reward_failed"] == 0 and r["drops/reward_timeout"] == 0 for r in rows)


def test_a_baked_interpreter_replaces_the_built_environment(ray_local, tiny_config):
    """`py_executable`: an interpreter already on every node (a cluster image), used as it is."""
    from rlds.config import ConfigError

    env = reward_runtime_env(RewardConfig(name="image_reward", py_executable=sys.executable))
    assert env == {"py_executable": sys.executable}
    assert ray_local.get(ray_local.remote(runtime_env=env, num_cpus=0.1)(lambda: sys.executable).remote()) == \
        sys.executable
    with pytest.raises(ConfigError, match=r"rewards\[0\]: give pip .* or py_executable .*not both"):
        tiny_config("rewards=[{name: brightness, pip: [numpy], py_executable: /usr/bin/python3}]")
