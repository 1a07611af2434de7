"""The rewards for real images, on random-weight models saved as users' model folders: an OWLv2
detector (compositionality) and a CLIP classifier (fairness), and the generated prompt sets."""
import json

import numpy as np
import pytest

from rlds.config import ConfigError
from rlds.data.generated import LISTS, generated_prompts, read_list
from rlds.rewards import build_reward
from rlds.rewards.detector import parse_objects
from rlds.rewards.parity import NONE, parity_reward
from rlds.rewards.vision import pixel_values


def _images(n, size=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_pixel_values_match_the_models_own_image_processor():
    """One batched torch call gives what CLIP's processor gives image by image (PIL, uint8 between
    resize and normalise: about 1/255 apart at most pixels)."""
    import torch
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (300, 200)]:
        images = rng.integers(0, 256, (2, *shape, 3)).astype(np.uint8)
        images[:, : shape[0] // 2] = 40
        ref = processor(images=list(images), return_tensors="pt")["pixel_values"]
        ours = pixel_values(images, processor, torch.device("cpu"))
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        assert (ours - ref).abs().mean() < 0.02
    with pytest.raises(ValueError, match=r"uint8 \[batch, height, width, 3\]"):
        pixel_values(images[..., :2], processor, torch.device("cpu"))


def test_prompts_name_their_objects_and_relation():
    assert parse_objects("a cat to the left of a dog") == parse_objects("A cat to the left of a dog.")
    p = parse_objects("a cat to the left of a dog")
    assert p.objects == ("cat", "dog") and p.relation == "to the left of"
    assert parse_objects("an apple on side of a teddy bear").objects == ("apple", "teddy bear")
    assert parse_objects("a photo of a red car").objects == ("red car",) and parse_objects("").objects == ()


@pytest.fixture(scope="module")
def detector(tiny_owlv2):
    return build_reward("detector_composition", {"model": tiny_owlv2, "device": "cpu", "batch_size": 3})


def test_detector_scores_batched_as_one_at_a_time_and_drops_what_it_cannot_read(detector):
    images = _images(5)
    prompts = ["a cat next to a dog", "a red car", "a bird beside a boat", "", "a " + "very " * 20 + "long cat"]
    scores = detector(images, prompts, np.arange(5))
    alone = [detector(images[i:i + 1], prompts[i:i + 1], np.zeros(1))[0] for i in range(5)]
    np.testing.assert_allclose(scores[:3], alone[:3], rtol=1e-4, atol=1e-6)
    assert np.all((scores[:3] >= 0) & (scores[:3] <= 1))
    # no object named, or one the text encoder cannot take: NaN, which the replay store drops and counts
    assert np.isnan(scores[3]) and np.isnan(scores[4]) and np.isnan(alone[3])
    with pytest.raises(ValueError, match="uint8"):
        detector(images.astype(np.float32), prompts, np.arange(5))


def test_detector_score_is_the_mean_confidence_over_named_objects(detector):
    images = _images(2, seed=1)
    conf, centres = detector.confidences(images, [parse_objects("a cat and a dog")] * 2)
    scores = detector(images, ["a cat and a dog"] * 2, np.arange(2))
    np.testing.assert_allclose(scores, conf.mean(axis=1), rtol=1e-5)
    assert centres.shape == (2, 2, 2) and np.all((centres >= 0) & (centres <= 1))


def test_the_relation_term_follows_the_direction_the_prompt_asks_for(tiny_owlv2):
    reward = build_reward("detector_composition", {"model": tiny_owlv2, "device": "cpu", "relation_weight": 1.0})
    left_then_right = np.array([[0.2, 0.5], [0.8, 0.5]])
    assert reward._relation_term("to the left of", left_then_right) > 0.99
    assert reward._relation_term("to the right of", left_then_right) < 0.01
    assert reward._relation_term("next to", left_then_right) == 1.0
    with pytest.raises(ValueError, match="relation_weight must be in"):
        build_reward("detector_composition", {"model": tiny_owlv2, "relation_weight": 2.0})


def test_a_model_folder_without_its_weights_or_an_unknown_hub_id_says_how_to_fix_it(tiny_owlv2, tmp_path):
    import shutil

    folder = tmp_path / "owl"
    shutil.copytree(tiny_owlv2, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors.*save_pretrained"):
        build_reward("detector_composition", {"model": str(folder)})
    with pytest.raises(OSError, match=r"(?s)cannot load 'no-such-org/no-such-detector'.*hf download"):
        build_reward("detector_composition", {"model": "no-such-org/no-such-detector"})


@pytest.fixture(scope="module")
def clip_parity(tiny_clip):
    return build_reward("clip_parity", {"model": tiny_clip, "device": "cpu", "batch_size": 3,
                                        "subject_threshold": 0.0})


def test_clip_parity_classifies_batched_as_one_at_a_time(clip_parity):
    images = _images(7, size=48)
    subject, classes = clip_parity.clip_probabilities(images)
    alone = [clip_parity.clip_probabilities(images[i:i + 1]) for i in range(7)]
    np.testing.assert_allclose(subject, [a[0][0] for a in alone], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(classes, np.concatenate([a[1] for a in alone]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(classes.sum(axis=1), 1.0, rtol=1e-5)
    labels = clip_parity.labels(images, ["a photo of a doctor"] * 7)
    assert labels == [clip_parity.classes[i] for i in classes.argmax(axis=1)]


def test_clip_parity_rewards_each_group_by_its_labels_and_counts_no_subject_as_the_worst(clip_parity, tiny_clip):
    images = _images(8, size=48, seed=3)
    prompts = ["a photo of a doctor"] * 4 + ["a photo of a nurse"] * 4
    groups = np.repeat([0, 1], 4)
    values = clip_parity(images, prompts, groups)
    labels = clip_parity.labels(images, prompts)
    for g in (0, 1):
        group_labels = labels[4 * g:4 * g + 4]
        assert values[groups == g].mean() == pytest.approx(parity_reward(group_labels, clip_parity.classes), abs=1e-6)
    nobody = build_reward("clip_parity", {"model": tiny_clip, "device": "cpu", "subject_threshold": 1.01,
                                          "classes": {"warm": "a warm photo", "cool": "a cool photo"}})
    assert nobody.labels(images, prompts) == [NONE] * 8
    np.testing.assert_allclose(nobody(images, prompts, groups), -0.5)  # 1 - 1/|A| with two classes
    with pytest.raises(ValueError, match="at least two labels"):
        build_reward("clip_parity", {"model": tiny_clip, "classes": {"only": "a photo"}})


def test_generated_sets_hold_unseen_classes_out_and_never_move():
    objects = read_list(LISTS / "objects.txt")
    train, val, held = (generated_prompts("relations", p) for p in ("train", "validation", "heldout"))
    assert len(train) > 20000 and len(val) > 100 and len(held) > 5000
    assert not (set(train) & set(val) or set(train) & set(held) or set(val) & set(held))
    unseen = {o for o in objects if not any(f" {o} " in f" {p} " for p in train)}
    assert 0.1 < len(unseen) / len(objects) < 0.3
    assert all(any(f" {o}" in p for o in unseen) for p in held[:200])
    assert generated_prompts("relations", "train")[:50] == train[:50]
    jobs = {p: generated_prompts("occupations", p) for p in ("train", "validation", "heldout")}
    assert all(jobs.values()) and "a photo of an accountant" in sum(jobs.values(), [])
    assert not set(jobs["train"]) & set(jobs["heldout"])


def test_generated_prompt_config_errors_name_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"prompts\.generated: 'animals' is not one of relations, occupations"):
        tiny_config("prompts.items=[]", "prompts.generated=animals")
    with pytest.raises(ConfigError, match=r"prompts\.generated_args\.unseen: unknown key"):
        tiny_config("prompts.items=[]", "prompts.generated=relations", "prompts.generated_args={unseen: 0.5}")
    with pytest.raises(ConfigError, match=r"prompts\.generated_args\.unseen_share: must be in \[0, 1\)"):
        tiny_config("prompts.items=[]", "prompts.generated=relations", "prompts.generated_args={unseen_share: 1.5}")
    config = tiny_config("prompts.items=[]", "prompts.generated=occupations",
                         'prompts.generated_args={template: "a portrait of {}"}')
    from rlds.data.prompts import prompt_list
    assert all(p.startswith("a portrait of a") for p in prompt_list(config))


@pytest.mark.timeout(300)
def test_a_tiny_sd_model_trains_on_the_detector_and_clip_rewards(ray_local, tiny_config, tiny_sd_model, tiny_owlv2,
                                                                 tiny_clip, tmp_path):
    """Two tasks through their reward pools: composition on generated relation prompts (detector),
    fairness on generated occupations (CLIP parity, groups of 4), on a model with a VAE."""
    import yaml

    from rlds.metrics import read_metrics
    from rlds.trainer import Trainer

    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": tiny_sd_model}, "sampling": {"num_steps": 4},
        "tasks": [{"name": "composition", "prompts": {"generated": "relations"}, "batch_size": 4,
                   "rewards": [{"name": "detector_composition", "num_cpus": 0.25,
                                "args": {"model": tiny_owlv2, "device": "cpu"}}]},
                  {"name": "fairness", "prompts": {"generated": "occupations"}, "batch_size": 4,
                   "images_per_prompt": 4, "advantage": "batch",
                   "rewards": [{"name": "clip_parity", "num_cpus": 0.25,
                                "args": {"model": tiny_clip, "device": "cpu", "subject_threshold": 0.0}}]}],
        "sampler": {"num_cpus": 0.5, "batch_size": 4}, "ray": {"num_cpus": 4}}))
    config = tiny_config(f"run_dir={tmp_path / 'run'}", "iterations=2", path=str(path))
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["samples"] for r in rows] == [8, 16]
    for key in ("reward/composition/detector_composition/mean", "reward/fairness/clip_parity/mean", "loss"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(-0.75 <= r["reward/fairness/clip_parity/mean"] <= 0 for r in rows)
    assert all(r["drops/nan_reward"] == 0 and r["drops/reward_failed"] == 0 for r in rows)
    assert json.loads((tmp_path / "run" / "checkpoints" / "iter_000002" / "state.json").read_text())
