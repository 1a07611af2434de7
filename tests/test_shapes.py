"""ShapesWorld: renderer, captions and grammar, prompt splits, the pretraining set, and the rewards."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlds.data.pretrain_set import PretrainSet, examples, write_pretrain_set
from rlds.data.shapes import (COLOURS, KINDS, RELATIONS, SIZE, Prompt, caption, heldout_prompts, parse_prompt,
                              prompts_of, relation_holds, render, sample_scene, scene_for_prompt, training_prompts)
from rlds.rewards import build_reward
from rlds.rewards.parity import NONE, expected_parity_reward, parity_reward, statistical_parity, tempered
from rlds.rewards.shapes import COLOUR_NAMES, ShapesComposition, ShapesQuality, detect, segment


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, KINDS[i % len(KINDS)]) for i in range(n)]


def test_captions_parse_back_to_the_scene_objects():
    for scene in scenes(200):
        p = parse_prompt(caption(scene))
        assert p.objects == tuple((o.colour if scene.name_colours else None, o.shape) for o in scene.objects)
        assert p.relation == scene.relation
        assert p.text == caption(scene)


@pytest.mark.parametrize("text", ["a purple circle", "a red circle near a blue square", "red circle",
                                  "a red circle to the left of a square", "a circle above"])
def test_text_outside_the_grammar_is_refused_clearly(text):
    with pytest.raises(ValueError, match="outside the ShapesWorld grammar"):
        parse_prompt(text)


def test_relations_hold_geometrically_in_the_pixels():
    for scene in [s for s in scenes(200, seed=1) if s.relation]:
        a, b = scene.objects
        assert relation_holds(a, b, scene.relation)
        # Each object alone, as pixels: the two are apart along the relation's axis.
        ya, xa = np.nonzero((render(dataclasses.replace(scene, objects=(a,))) != scene.background).any(-1))
        yb, xb = np.nonzero((render(dataclasses.replace(scene, objects=(b,))) != scene.background).any(-1))
        gap = {"left of": xb.min() - xa.max(), "right of": xa.min() - xb.max(),
               "above": yb.min() - ya.max(), "below": ya.min() - yb.max()}[scene.relation]
        assert gap >= 2, (caption(scene), gap)


def test_rendering_is_deterministic_and_the_right_shape():
    scene = scenes(1)[0]
    im = render(scene)
    assert im.shape == (SIZE, SIZE, 3) and im.dtype == np.uint8
    np.testing.assert_array_equal(im, render(scene))


def test_pretrain_set_has_the_bias_and_round_trips_images(tmp_path):
    path = write_pretrain_set(tmp_path / "pre.parquet", n=300, seed=3, bias=0.85, row_group_size=64)
    table = pq.read_table(path)
    assert pq.ParquetFile(path).num_row_groups == 5
    free = [c for cs, named in zip(table["colours"].to_pylist(), table["named_colours"].to_pylist())
            if not named for c in cs]
    assert len(free) > 80 and abs(free.count("red") / len(free) - 0.85) < 0.08
    ordered = [im for _, im, _ in examples(300, seed=3, bias=0.85)]
    data = PretrainSet(path)
    assert len(data) == 300
    images = np.concatenate([im for im, _ in data.batches(64, shuffle=False)])
    np.testing.assert_array_equal(images, np.stack(ordered))  # PNG is lossless: exact pixels back
    # Shuffled by seed: the same seed gives the same order, every row appears once per epoch.
    first = [c for _, cs in data.batches(50, seed=1) for c in cs]
    again = [c for _, cs in data.batches(50, seed=1) for c in cs]
    other = [c for _, cs in data.batches(50, seed=2) for c in cs]
    assert first == again != other
    assert sorted(first) == sorted(table["caption"].to_pylist())


def test_pretrain_set_names_the_missing_column(tmp_path):
    bad = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"jpg": [b""], "text": ["a cat"]}), bad)
    with pytest.raises(ValueError, match=r"laion.parquet: missing column 'image'"):
        PretrainSet(bad)


def test_pretrain_set_images_of_any_size_and_mode_come_out_square_rgb_and_a_broken_one_is_named(tmp_path):
    from rlds.data.pretrain_set import png_bytes

    def encoded(array, mode):
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, format="PNG")
        return buf.getvalue()

    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the centre third: what a centre crop keeps
    rows = [png_bytes(wide), encoded(np.full((64, 64, 4), 200, np.uint8), "RGBA"),
            encoded(np.full((8, 8), 90, np.uint8), "L")]
    good = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"image": rows, "caption": ["wide", "rgba", "grey"]}), good)
    images, captions = next(PretrainSet(good, resolution=32).batches(3, shuffle=False))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and captions == ["wide", "rgba", "grey"]
    assert images[0].min() == 255 and images[2].max() == 90
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"image": [rows[0], b"not a png"], "caption": ["ok", "bad"]}), broken)
    with pytest.raises(ValueError, match=r"broken.parquet, row group 0, row 1: its image does not decode"):
        list(PretrainSet(broken).batches(2, shuffle=False))


def test_detector_finds_rendered_shapes():
    found = []
    for scene in scenes(400, seed=2):
        dets = [d for d in detect(render(scene)) if d.area >= 12]
        ok = len(dets) == len(scene.objects)
        for o in scene.objects:
            ok &= any(d.shape == o.shape and d.colour == o.colour and
                      abs(d.centre[0] - o.centre[0]) < 1.5 and abs(d.centre[1] - o.centre[1]) < 1.5 for d in dets)
        found.append(ok)
    assert np.mean(found) > 0.95


def test_composition_reward_separates_right_from_wrong():
    comp = build_reward("shapes_composition", {})
    rng = np.random.default_rng(4)
    prompt = "a blue square to the left of a green triangle"
    scene = scene_for_prompt(parse_prompt(prompt), rng)
    a, b = scene.objects
    wrong = {
        "wrong colour": (dataclasses.replace(a, colour="red"), b),
        "wrong shape": (a, dataclasses.replace(b, shape="circle")),
        "swapped relation": (dataclasses.replace(a, centre=b.centre), dataclasses.replace(b, centre=a.centre)),
        "blank": (),
    }
    right = comp(render(scene)[None], [prompt], np.zeros(1))[0]
    assert right > 0.85 and comp.accuracy(render(scene), prompt)
    for name, objs in wrong.items():
        im = render(dataclasses.replace(scene, objects=objs))
        r = comp(im[None], [prompt], np.zeros(1))[0]
        assert r < right - 0.4, name
        assert not comp.accuracy(im, prompt), name
    # Single objects: a wrong colour or shape is worth almost nothing.
    red_circle = scene_for_prompt(parse_prompt("a red circle"), rng)
    for p in ("a blue circle", "a red triangle"):
        assert ShapesComposition().score(render(red_circle)[None], [p])[0] < 0.1


def test_parity_is_zero_when_balanced_and_negative_for_one_colour():
    rng = np.random.default_rng(5)
    prompt = parse_prompt("a circle")

    def group(colours):
        return np.stack([render(scene_for_prompt(Prompt(((c, "circle"),)), rng)) for c in colours])

    parity = build_reward("shapes_parity", {})
    balanced = parity(group(list(COLOURS) * 2), [prompt.text] * 8, np.zeros(8))
    one = parity(group(["red"] * 8), [prompt.text] * 8, np.zeros(8))
    np.testing.assert_allclose(balanced, 0.0, atol=1e-9)
    np.testing.assert_allclose(one, -0.75)
    assert statistical_parity(["red", "green", "blue", "yellow"], COLOUR_NAMES) == 0
    assert statistical_parity(["red", "red", "none"], COLOUR_NAMES) == pytest.approx(0.75)
    # Blank images count as the worst case, so drawing nothing cannot buy balance.
    blanks = np.full((4, SIZE, SIZE, 3), 215, np.uint8)
    half = parity(np.concatenate([group(list(COLOURS)), blanks]), [prompt.text] * 8, np.zeros(8))
    assert half.mean() == pytest.approx(-0.375)
    assert half[:4].min() > half[4:].max()  # each image's credit: a shape helps the group, a blank hurts


def test_parity_credits_the_rare_colour_and_keeps_the_group_reward_as_the_mean():
    rng = np.random.default_rng(7)
    colours = ["red"] * 6 + ["blue", "green"]
    images = np.stack([render(scene_for_prompt(Prompt(((c, "circle"),)), rng)) for c in colours])
    values = build_reward("shapes_parity", {})(images, ["a circle"] * 8, np.zeros(8))
    assert values.mean() == pytest.approx(-statistical_parity(colours, COLOUR_NAMES), abs=1e-6)
    assert values[6] == pytest.approx(values[7]) and values[6] > values[0] + 0.1
    np.testing.assert_allclose(values[:6], values[0])


def test_parity_over_one_hot_rows_is_the_docstrings_formula_over_labels():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = list(rng.choice(list(COLOUR_NAMES) + [NONE], size=int(rng.integers(1, 9))))
        s_none = labels.count(NONE) / len(labels)
        formula = -((1 - s_none) * statistical_parity(labels, COLOUR_NAMES) + s_none * 0.75)
        rows = np.array([np.eye(4)[COLOUR_NAMES.index(lab)] if lab != NONE else np.zeros(4) for lab in labels])
        assert expected_parity_reward(rows) == pytest.approx(formula)
        assert parity_reward(labels, COLOUR_NAMES) == pytest.approx(formula)
    with pytest.raises(ValueError, match="purple"):
        parity_reward(["red", "purple"], COLOUR_NAMES)
    sure, unsure = np.array([[0.999, 0.001, 0, 0]]), np.array([[0.9, 0.1, 0, 0]])
    np.testing.assert_allclose(tempered(np.concatenate([sure, np.zeros((1, 4))]), 1.0)[1], 0.0)
    assert np.all(tempered(np.zeros((2, 4)), 4.0) == 0)  # NONE stays NONE
    spread = tempered(np.concatenate([sure, unsure]), 4.0)
    np.testing.assert_allclose(spread.sum(1), 1.0)
    assert spread[1, 0] - spread[0, 0] < 0.9 - 0.999  # tempering widens the gap between sure and unsure


def test_soft_parity_ranks_a_group_of_one_colour_by_how_sure_each_shape_is():
    rng = np.random.default_rng(10)
    reds = np.stack([render(scene_for_prompt(Prompt((("red", "circle"),)), rng)) for _ in range(8)])
    inner = (reds[0] == COLOURS["red"]).all(-1)
    reds[0][inner] = (222, 110, 40)  # an orange-red: still labelled red, less surely
    prompts, groups = ["a circle"] * 8, np.zeros(8)
    hard = build_reward("shapes_parity", {})
    assert hard.labels(reds, prompts) == ["red"] * 8
    np.testing.assert_allclose(hard(reds, prompts, groups), -0.75)  # all alike: nothing to learn
    soft = build_reward("shapes_parity", {"soft": 0.5, "soft_temperature": 4.0})
    values = soft(reds, prompts, groups)
    assert values[0] > values[1:].max() + 0.01
    assert values.mean() == pytest.approx(soft.score_group(reds, "a circle"), abs=1e-6)
    # the labels still decide most of the reward: a real second colour beats an unsure red
    mixed = reds.copy()
    mixed[1] = render(scene_for_prompt(Prompt((("blue", "circle"),)), rng))
    assert soft(mixed, prompts, groups)[1] > values[0] + 0.05
    with pytest.raises(ValueError, match="shapes_parity: soft 2 is not a share"):
        build_reward("shapes_parity", {"soft": 2})
    with pytest.raises(ValueError, match="shapes_parity: soft_temperature 0.5 is below 1"):
        build_reward("shapes_parity", {"soft": 0.5, "soft_temperature": 0.5})


def test_parity_with_a_quality_floor_counts_a_badly_drawn_shape_as_none():
    rng = np.random.default_rng(8)
    colours = ["red", "green", "blue", "yellow"]
    clean = np.stack([render(scene_for_prompt(Prompt(((c, "circle"),)), rng)) for c in colours])
    speckled = clean.copy()
    speckled[1:] = np.clip(clean[1:] + rng.normal(0, 40, clean[1:].shape), 0, 255).astype(np.uint8)
    plain, floored = build_reward("shapes_parity", {}), build_reward("shapes_parity", {"min_quality": 0.5})
    assert plain.labels(speckled, ["a circle"] * 4) == colours  # the colours still read through the speckle
    assert floored.labels(speckled, ["a circle"] * 4) == ["red", "none", "none", "none"]
    assert floored.labels(clean, ["a circle"] * 4) == colours
    prompts, groups = ["a circle"] * 4, np.zeros(4)
    assert floored(speckled, prompts, groups).mean() < plain(speckled, prompts, groups).mean()
    with pytest.raises(ValueError, match="min_quality 2 is not a ShapesQuality score"):
        build_reward("shapes_parity", {"min_quality": 2})


def test_parity_colour_free_only_leaves_colour_named_groups_to_other_rewards():
    rng = np.random.default_rng(9)
    reds = np.stack([render(scene_for_prompt(Prompt((("red", "circle"),)), rng)) for _ in range(8)])
    prompts = ["a circle"] * 4 + ["a red circle"] * 4
    groups = np.array([0] * 4 + [1] * 4)
    plain = build_reward("shapes_parity", {})(reds, prompts, groups)
    only_free = build_reward("shapes_parity", {"colour_free_only": True})(reds, prompts, groups)
    np.testing.assert_allclose(plain, -0.75)
    np.testing.assert_allclose(only_free[:4], -0.75)  # the colour-free group is scored as before
    np.testing.assert_allclose(only_free[4:], 0.0)    # "a red circle" drawn red is not unfair


def test_composition_colour_named_only_leaves_colour_free_groups_to_the_parity_reward():
    rng = np.random.default_rng(9)
    reds = np.stack([render(scene_for_prompt(Prompt((("red", "circle"),)), rng)) for _ in range(4)])
    prompts = ["a circle", "a circle", "a red circle", "a red circle"]
    plain = build_reward("shapes_composition", {})(reds, prompts, np.array([0, 0, 1, 1]))
    named = build_reward("shapes_composition", {"colour_named_only": True})(reds, prompts, np.array([0, 0, 1, 1]))
    assert (plain > 0.5).all()
    np.testing.assert_allclose(named[:2], 0.0)       # "a circle" is left to fairness
    np.testing.assert_allclose(named[2:], plain[2:])  # a named colour is scored as before


def test_quality_colour_named_only_scores_colour_named_prompts_alone():
    rng = np.random.default_rng(9)
    reds = np.stack([render(scene_for_prompt(Prompt((("red", "circle"),)), rng)) for _ in range(4)])
    reds[1] = np.clip(reds[1] + rng.normal(0, 30, reds[1].shape), 0, 255).astype(np.uint8)
    prompts = ["a circle", "a circle", "a red circle", "a red circle"]
    plain = build_reward("shapes_quality", {})(reds, prompts, np.array([0, 0, 1, 1]))
    named = build_reward("shapes_quality", {"colour_named_only": True})(reds, prompts, np.array([0, 0, 1, 1]))
    assert plain[0] > plain[1] + 0.3  # the noisy red would rank below the clean one
    np.testing.assert_allclose(named[:2], 0.0)       # "a circle": colour-free, left to the parity reward
    np.testing.assert_allclose(named[2:], plain[2:])  # a named colour is scored as before


def test_quality_ranks_render_above_noisy_render_above_noise():
    rng = np.random.default_rng(6)
    quality = ShapesQuality()
    im = render(scenes(1, seed=6)[0])
    noisy = np.clip(im + rng.normal(0, 15, im.shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, im.shape, dtype=np.uint8)
    r = build_reward("shapes_quality", {})(np.stack([im, noisy, noise]), [""] * 3, np.arange(3))
    assert r[0] > 0.95 and r[0] > r[1] > r[2] and r[2] < 0.1
    assert quality.score_one(np.full_like(im, 215)) == 0  # blank canvas


def test_quality_background_term_alone_sees_speckle_off_the_shapes_only():
    rng = np.random.default_rng(6)
    im = render(scenes(1, seed=6)[0])
    near = segment(im)[1] > 0
    for _ in range(3):  # the shapes and three pixels around them
        padded = np.pad(near, 1)
        near = near | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    far = ~near
    speckled_background = im.copy()
    speckled_background[far] = np.clip(im[far] + rng.normal(0, 20, im[far].shape), 0, 255)
    background = build_reward("shapes_quality", {"terms": ["background"]})
    whole = build_reward("shapes_quality", {})
    clean, speckled = background(np.stack([im, speckled_background]), [""] * 2, np.arange(2))
    assert clean > 0.95 and speckled < clean - 0.3
    # the shapes' own terms are untouched by background speckle, so the whole score falls less
    both = whole(np.stack([im, speckled_background]), [""] * 2, np.arange(2))
    assert clean - speckled > both[0] - both[1] > 0
    with pytest.raises(ValueError, match=r"terms \['shine'\]: choose one or more of background, solid, edges"):
        build_reward("shapes_quality", {"terms": ["shine"]})


def test_the_three_splits_are_disjoint_by_combination():
    def combination(text):  # a prompt and its mirror phrasing describe the same combination
        p = parse_prompt(text)
        if p.relation is None:
            return p.objects
        axis = "h" if p.relation in ("left of", "right of") else "v"
        return frozenset(p.objects), axis

    for task in ("composition", "fairness", "quality"):
        parts = [prompts_of(task, part) for part in ("train", "validation", "heldout")]
        assert parts[0] == training_prompts(task) and parts[2] == heldout_prompts(task)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert parts[i] and parts[j] and not set(parts[i]) & set(parts[j])
            assert not {combination(t) for t in parts[i]} & {combination(t) for t in parts[j]}
        for text in sum(parts, []):
            parse_prompt(text)
    # every coloured object and every relation is still trained on
    train = [parse_prompt(t) for t in training_prompts("composition")]
    assert {o for p in train for o in p.objects} == {(c, s) for c in COLOURS for s in ("circle", "square", "triangle")}
    assert {p.relation for p in train} == set(RELATIONS) | {None}
    assert len(heldout_prompts("composition")) == 132 and len(prompts_of("composition", "validation")) == 32
    assert prompts_of("fairness", "validation") == ["a circle above a square", "a circle below a square",
                                                    "a square above a circle", "a square below a circle"]
    assert {"a circle", "a square"} <= set(training_prompts("fairness"))
