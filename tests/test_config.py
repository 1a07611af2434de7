import pytest

from rlds.config import ConfigError
from rlds.configure import load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


BASE = "prompts: {items: [a cat]}\nrewards: [{name: brightness}]\n"


def test_a_good_file_loads_with_defaults_filled_in(tmp_path):
    c = load_config(write(tmp_path, BASE + "algo: {clip_range: 1e-4}\n"))
    assert c.algo.clip_range == 1e-4  # YAML 1.1 reads 1e-4 as a string; the config does not
    assert c.algo.timesteps_per_iteration == 5 and c.replay.max_staleness == 0


def test_unknown_key_names_its_dotted_path_and_file(tmp_path):
    path = write(tmp_path, BASE + "sampler: {bach_size: 4}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: sampler\.bach_size: unknown key.*batch_size"):
        load_config(path)


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, BASE + "algo: {learning_rate: fast}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: algo\.learning_rate: expected float, got str 'fast'"):
        load_config(path)
    path = write(tmp_path, BASE + "iterations: true\n")
    with pytest.raises(ConfigError, match=r"iterations: expected int, got bool"):
        load_config(path)


def test_error_inside_a_list_names_the_entry(tmp_path):
    path = write(tmp_path, "prompts: {items: [a]}\nrewards: [{name: brightness}, {name: jpeg, wieght: 1}]\n")
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.wieght: unknown key"):
        load_config(path)


def test_missing_file_and_missing_prompts_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    path = write(tmp_path, "prompts: {file: missing.txt}\nrewards: [{name: brightness}]\n")
    with pytest.raises(ConfigError, match="prompts.file: file not found: missing.txt"):
        load_config(path)


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, BASE)
    c = load_config(path, ("iterations=7", "replay.max_staleness=1", "model.lora.enabled=true"))
    assert (c.iterations, c.replay.max_staleness, c.model.lora.enabled) == (7, 1, True)
    with pytest.raises(ConfigError, match=r"command-line overrides: algo\.nope: unknown key"):
        load_config(path, ("algo.nope=1",))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ("iterations",))


@pytest.mark.parametrize("value, message", [
    ("[4, 1]", r"\[4, 1\] is neither a count of at least 1 nor a range \[min, max\]"),
    ("[1, 2, 3]", r"\[1, 2, 3\] is neither"), ("0", "0 is neither"),
    ("two", r"sampler.num_workers: expected int or list, got str 'two'"),
])
def test_sampler_count_is_a_count_or_a_range(tmp_path, value, message):
    path = write(tmp_path, "prompts: {items: [a]}\nrewards: [{name: brightness}]\n")
    c = load_config(path, ("sampler.num_workers=[1, 4]",))
    assert (c.sampler.min_workers, c.sampler.max_workers) == (1, 4)
    assert (load_config(path).sampler.min_workers, load_config(path).sampler.max_workers) == (2, 2)
    with pytest.raises(ConfigError, match=message):
        load_config(path, (f"sampler.num_workers={value}",))


def test_inconsistent_sizes_are_explained(tmp_path):
    path = write(tmp_path, BASE + "algo: {batch_size: 10}\nsampler: {batch_size: 4}\n")
    with pytest.raises(ConfigError, match=r"algo\.batch_size: 10 is not a positive multiple of sampler\.batch_size"):
        load_config(path)
    path = write(tmp_path, BASE + "algo: {batch_size: 12}\nsampler: {batch_size: 4}\nlearner: {num_workers: 2}\n")
    with pytest.raises(ConfigError, match="learner.num_workers"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown reward 'shiny'"):
        load_config(write(tmp_path, "prompts: {items: [a]}\nrewards: [{name: shiny}]\n"))


def test_invalid_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_shipped_configs_load():
    from rlds.cli import CONFIG_DIR
    from rlds.pretrain import load_pretrain_config

    for path in CONFIG_DIR.glob("*.yaml"):
        (load_pretrain_config if path.name.startswith("pretrain") else load_config)(str(path))


def test_prompts_come_from_exactly_one_source(tmp_path):
    from rlds.data.prompts import prompt_list

    c = load_config(write(tmp_path, "prompts: {shapes: composition}\nrewards: [{name: shapes_composition}]\n"))
    assert prompt_list(c) and all(isinstance(p, str) for p in prompt_list(c))
    with pytest.raises(ConfigError, match="give one of prompts.items"):
        load_config(write(tmp_path, "prompts: {items: [a], shapes: fairness}\nrewards: [{name: brightness}]\n"))
    with pytest.raises(ConfigError, match="prompts.shapes: 'colour' is not one of"):
        load_config(write(tmp_path, "prompts: {shapes: colour}\nrewards: [{name: brightness}]\n"))


def test_sets_drawn_in_groups_of_their_own_size_fill_each_batch_exactly():
    """prompts.images_per_prompt_by_set: colour-named groups of 4 beside colour-free groups of 8; every
    batch of 16 is whole groups, each its set's size, the big ones never cut at the batch's end."""
    import numpy as np

    from rlds.cli import CONFIG_DIR
    from rlds.config import task_list
    from rlds.data.prompts import draw_groups, prompt_group_sizes, prompt_sets, prompt_weights

    mix = str(CONFIG_DIR / "shapes_mix_nft.yaml")  # groups of 8, sampler batches of 16, mix {fairness: 0.25}
    task = task_list(load_config(mix, ("prompts.images_per_prompt_by_set={composition: 4}",)))[0]
    sizes, weights, sets = prompt_group_sizes(task), prompt_weights(task), np.array(prompt_sets(task))
    np.testing.assert_array_equal(sizes, np.where(sets == "composition", 4, 8))
    rng, free_groups, groups = np.random.default_rng(0), 0, 0
    for _ in range(500):
        drawn = draw_groups(rng, len(weights), 16, 8, weights, sizes)
        assert sizes[drawn].sum() == 16
        free_groups, groups = free_groups + (sets[drawn] == "fairness").sum(), groups + len(drawn)
    assert 0.15 < free_groups / groups < 0.25  # a little under the 0.25 share: a group of 8 must fit
    assert prompt_group_sizes(task_list(load_config(mix))[0]) is None
    # without sizes, the draw is the uniform-size one (a run without the option is unchanged)
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    np.testing.assert_array_equal(draw_groups(a, len(weights), 16, 8, weights), b.choice(len(weights), 2, p=weights))
    for bad, message in [("{composition: 3}", "composition: groups of 3 must divide sampler.batch_size"),
                         ("{quality: 4}", "images_per_prompt_by_set.quality: not a ShapesWorld set this task draws"),
                         ("{composition: 2.5}", "images_per_prompt_by_set.composition: a group size"),
                         ("{composition: 1}", "'group' needs prompts.images_per_prompt_by_set.composition of 2")]:
        with pytest.raises(ConfigError, match=message):
            load_config(mix, (f"prompts.images_per_prompt_by_set={bad}",))


def test_prompt_passes_draw_every_prompt_once_a_pass_across_samplers_and_resume_where_they_were():
    """prompts.order: passes: two samplers share one shuffled pass over each set (no prompt twice
    before all are drawn), the sets keep their shares, groups of their own size fill each batch, and
    a sampler rebuilt at its position draws what it would have drawn."""
    import numpy as np

    from rlds.cli import CONFIG_DIR
    from rlds.config import task_list
    from rlds.data.prompts import PromptPasses, prompt_list, prompt_passes, prompt_sets

    mix = str(CONFIG_DIR / "shapes_mix_nft.yaml")  # batches of 16, groups of 8, mix {fairness: 0.25}
    task = task_list(load_config(mix, ("prompts.order=passes",)))[0]
    sets, prompts = np.array(prompt_sets(task)), prompt_list(task)
    named = int((sets == "composition").sum())
    assert prompt_passes(task) == [(named, 0.75, 8), (len(sets) - named, 0.25, 8)]
    samplers = [PromptPasses(prompt_passes(task), 16, i, 2, seed=3) for i in range(2)]
    drawn = np.concatenate([s.draw() for _ in range(named // 3 + 2) for s in samplers])  # a pass of named groups
    assert abs((sets[drawn] == "fairness").mean() - 0.25) < 0.005
    first_pass = drawn[sets[drawn] == "composition"][:named]
    assert len(set(first_pass.tolist())) == named  # i.i.d. draws would leave about 1/e unseen
    assert len({prompts[i] for i in drawn[sets[drawn] == "fairness"]}) == len(sets) - named
    again = PromptPasses(prompt_passes(task), 16, 1, 2, seed=3, batches=samplers[1].position[1])
    assert [again.draw().tolist() for _ in range(5)] == [samplers[1].draw().tolist() for _ in range(5)]
    assert prompt_passes(task_list(load_config(mix))[0]) is None  # random by default
    mixed = PromptPasses([(5, 0.5, 4), (3, 0.5, 8)], 16, 0, 1, seed=0)
    for _ in range(20):
        assert sum(4 if i < 5 else 8 for i in mixed.draw()) == 16
    with pytest.raises(ConfigError, match="prompts.order: 'sorted' is not one of random, passes"):
        load_config(mix, ("prompts.order=sorted",))


def test_a_mix_draws_each_shapes_set_in_its_share_and_validates_each():
    import numpy as np

    from rlds.cli import CONFIG_DIR
    from rlds.data.prompts import prompt_guidance_scales, prompt_list, prompt_weights, validation_prompt_sets
    from rlds.data.shapes import prompts_of
    from rlds.distributed.validation import mixed_validation_set

    nft = str(CONFIG_DIR / "shapes_nft.yaml")  # prompts: {shapes: composition}
    c = load_config(nft, ("prompts.mix={fairness: 0.25}",))
    prompts, weights = prompt_list(c), prompt_weights(c)
    free = np.array([p in prompts_of("fairness", "train") for p in prompts])
    assert len(prompts) == len(weights) and 0 < free.sum() < 0.1 * len(prompts)
    np.testing.assert_allclose([weights[free].sum(), weights[~free].sum()], [0.25, 0.75])
    picked = mixed_validation_set(validation_prompt_sets(c), 16, 4)
    assert sum(p in prompts_of("fairness", "validation") for p in picked) == 4  # one group of 4
    assert sum(p in prompts_of("composition", "validation") for p in picked) == 12
    scales = prompt_guidance_scales(load_config(nft, ("prompts.mix={fairness: 0.25}",
                                                      "prompts.guidance_scale_by_set={fairness: 4}")), 1.0)
    np.testing.assert_array_equal(scales, np.where(free, 4.0, 1.0))
    assert prompt_guidance_scales(c, 1.0) is None
    for bad, message in [("{quality: 4}", "guidance_scale_by_set.quality: not a ShapesWorld set this task draws"),
                         ("{fairness: 0.5}", "guidance_scale_by_set.fairness: a guidance scale, 1")]:
        with pytest.raises(ConfigError, match=message):
            load_config(nft, ("prompts.mix={fairness: 0.25}", f"prompts.guidance_scale_by_set={bad}"))
    for bad, message in [("{fairness: 1.5}", "prompts.mix.fairness: a share"),
                         ("{composition: 0.2}", "prompts.mix.composition: not a ShapesWorld set other"),
                         ("{fairness: 0.6, quality: 0.5}", "add up to 1.1")]:
        with pytest.raises(ConfigError, match=message):
            load_config(nft, (f"prompts.mix={bad}",))


TASKS = """tasks:
  - {name: bright, prompts: {items: [a cat]}, rewards: [{name: brightness}], batch_size: 8}
  - name: varied
    prompts: {items: [a dog]}
    rewards: [{name: diversity}]
    batch_size: 8
    images_per_prompt: 4
    advantage: batch
sampler: {batch_size: 4}
"""


def test_tasks_make_the_batch_and_are_checked_one_by_one(tmp_path):
    from rlds.config import task_list

    c = load_config(write(tmp_path, TASKS))
    assert c.algo.batch_size == 16 and [t.name for t in task_list(c)] == ["bright", "varied"]
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.advantage: 'grouped' is not one of"):
        load_config(write(tmp_path, TASKS.replace("advantage: batch", "advantage: grouped")))
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.batch_size: 6 is not a positive multiple"):
        load_config(write(tmp_path, TASKS.replace("batch_size: 8\n    images", "batch_size: 6\n    images")))
    with pytest.raises(ConfigError, match=r"tasks: a multi-task config names prompts and rewards in each task"):
        load_config(write(tmp_path, TASKS + "rewards: [{name: brightness}]\n"))
    with pytest.raises(ConfigError, match=r"algo\.batch_size: with tasks it is the sum .* \(16\)"):
        load_config(write(tmp_path, TASKS + "algo: {batch_size: 12}\n"))
    c = load_config(write(tmp_path, TASKS), ("tasks[1].lr_scale=0.5", "tasks[0].batch_size=4"))
    assert [(t.lr_scale, t.batch_size) for t in c.tasks] == [(1.0, 4), (0.5, 8)]
    with pytest.raises(ConfigError, match=r"tasks has no entry 2 \(2 entries\)"):
        load_config(write(tmp_path, TASKS), ("tasks[2].lr_scale=0.5",))
    with pytest.raises(ConfigError, match=r"a list entry is named tasks\[N\]"):
        load_config(write(tmp_path, TASKS), ("tasks.1.lr_scale=0.5",))
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.lr_scale: must be above 0"):
        load_config(write(tmp_path, TASKS.replace("advantage: batch", "advantage: batch\n    lr_scale: 0")))
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.name: each task needs a name of its own"):
        load_config(write(tmp_path, TASKS.replace("name: varied", "name: bright")))
    c = load_config(write(tmp_path, BASE + "algo: {batch_size: 8}\nsampler: {batch_size: 4}\n"))
    (task,) = task_list(c)
    assert task.batch_size == 8 and task.rewards[0].name == "brightness"


def test_tasks_in_turn_take_windows_of_iterations_that_cover_the_run(tmp_path):
    ten = write(tmp_path, TASKS + "iterations: 10\n")
    c = load_config(ten, ("tasks[0].iterations=[1, 6]", "tasks[1].iterations=[7, 10]", "algo.task_moments=per_task"))
    assert [t.window(10) for t in c.tasks] == [(0, 6), (6, 10)]
    assert [t.active(5, 10) for t in c.tasks] == [True, False] and [t.active(6, 10) for t in c.tasks] == [False, True]
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.iterations: \[7, 12\] is not \[first, last\] .* \(10\)"):
        load_config(ten, ("tasks[1].iterations=[7, 12]",))
    with pytest.raises(ConfigError, match=r"tasks: no task trains in iterations 7, 8, 9, 10"):
        load_config(ten, ("tasks[0].iterations=[1, 6]", "tasks[1].iterations=[1, 6]"))
    with pytest.raises(ConfigError, match=r"algo\.task_moments: 'each' is not one of shared, per_task"):
        load_config(write(tmp_path, TASKS), ("algo.task_moments=each",))


def test_the_config_module_knows_nothing_of_the_project():
    import subprocess
    import sys

    code = "import sys, rlds.config; print(sorted(m for m in sys.modules if m.startswith('rlds.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['rlds.config']"


def test_derived_defaults_are_filled_in_and_explicit_values_are_checked_not_replaced(tmp_path):
    from rlds.config import dump_config

    c = load_config(write(tmp_path, TASKS))
    assert c.algo.batch_size == 16  # the tasks' sum, filled in
    dump_config(c, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == c  # config.yaml loads back as the same config
    with pytest.raises(ConfigError, match=r"algo\.batch_size: with tasks it is the sum .* \(16\), not 8"):
        load_config(write(tmp_path, TASKS + "algo: {batch_size: 8}\n"))
    assert load_config(write(tmp_path, BASE)).algo.batch_size == 16
    assert load_config(write(tmp_path, BASE + "algo: {batch_size: 8}\n")).algo.batch_size == 8


def test_each_part_checks_its_own_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: algo\.objective: 'dpo' is not one of ppo"):
        load_config(write(tmp_path, BASE + "algo: {objective: dpo}\n"))
    with pytest.raises(ConfigError, match=r"algo\.lr_schedule: 'step' is not one of constant, linear, cosine"):
        load_config(write(tmp_path, BASE + "algo: {lr_schedule: step}\n"))
    with pytest.raises(ConfigError, match=r"algo\.advantage: 'group' needs sampler\.images_per_prompt of 2"):
        load_config(write(tmp_path, BASE + "algo: {advantage: group}\n"))
    with pytest.raises(ConfigError, match=r"model\.dtype: 'fp8' is not one of float32, bfloat16, float16"):
        load_config(write(tmp_path, BASE + "model: {dtype: fp8}\n"))
    with pytest.raises(ConfigError, match=r"algo\.timesteps_per_iteration: must be between 1 and the 10"):
        load_config(write(tmp_path, BASE + "sampling: {num_steps: 20}\nalgo: {noisiest_fraction: 0.5, "
                                                "timesteps_per_iteration: 12}\n"))


def test_changes_made_in_code_are_checked_like_a_file():
    from rlds.configure import with_changes

    c = load_config(None, ("prompts.items=[a cat]", "rewards=[{name: brightness}]"))
    changed = with_changes(c, {"replay.max_staleness": 1, "sampler.num_workers": 3})
    assert (changed.replay.max_staleness, changed.sampler.num_workers, c.replay.max_staleness) == (1, 3, 0)
    with pytest.raises(ConfigError, match=r"a config changed in code: replay\.max_staleness: must be 0 or more"):
        with_changes(c, {"replay.max_staleness": -1})
    with pytest.raises(ConfigError, match=r"algo\.nope: unknown key"):
        with_changes(c, {"algo.nope": 1})


def test_validation_is_checked_against_the_tasks_it_scores(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: prompts: validation\.every is on, and this task has no "
                                          r"validation prompts: give prompts\.validation_items"):
        load_config(write(tmp_path, BASE + "validation: {every: 5}\n"))
    ok = BASE.replace("items: [a cat]", "items: [a cat], validation_items: [a dog]")
    c = load_config(write(tmp_path, ok + "validation: {every: 5, stop_metric: val/brightness/mean}\n"))
    assert c.validation.every == 5
    with pytest.raises(ConfigError, match=r"validation\.stop_metric: 'val/cat/mean' is not a validation figure "
                                          r"of this run; one of val/mean, val/brightness/mean"):
        load_config(write(tmp_path, ok + "validation: {every: 5, stop_metric: val/cat/mean}\n"))
    with pytest.raises(ConfigError, match=r"validation\.stop_metric: stopping early needs validation"):
        load_config(write(tmp_path, ok + "validation: {stop_metric: val/mean}\n"))
    with pytest.raises(ConfigError, match=r"validation\.images_per_task: 6 is not a multiple of "
                                          r"sampler\.images_per_prompt \(4\)"):
        load_config(write(tmp_path, ok + "sampler: {images_per_prompt: 4}\n"
                                         "validation: {every: 5, images_per_task: 6}\n"))
    with pytest.raises(ConfigError, match=r"prompts: a ShapesWorld or generated set has its own validation split"):
        load_config(write(tmp_path, "prompts: {shapes: composition, validation_items: [a dog]}\n"
                                    "rewards: [{name: shapes_composition}]\n"))


def test_an_actor_gets_a_thread_per_cpu_it_owns_unless_torch_threads_says(tmp_path):
    from rlds.config import actor_threads, machine_cores

    one = "model: {source: tiny}\nprompts: {items: [a]}\nrewards: [{name: brightness}]\n"
    config = load_config(write(tmp_path, one))
    assert [actor_threads(config, n) for n in (0.25, 1, 4)] == [1, 1, 4]
    fixed = load_config(write(tmp_path, one + "torch_threads: 2\n"))
    assert [actor_threads(fixed, n) for n in (0.25, 4)] == [2, 2]
    # asynchronous (the default here): samplers and learners work at once, a thread per CPU each
    stages = one + "sampler: {num_workers: 2, num_cpus: 0.5}\nlearner: {num_workers: 1, num_cpus: 1}\n"
    run = load_config(write(tmp_path, stages + "replay: {max_staleness: 1}\n"))
    assert [actor_threads(run, 0.5, "sampler"), actor_threads(run, 1, "learner")] == [1, 1]
    # synchronous: each side takes the other's CPUs while it waits, up to the machine's cores
    sync = load_config(write(tmp_path, stages + "replay: {max_staleness: 0}\n"))
    cores = machine_cores()
    assert actor_threads(sync, 0.5, "sampler") == max(1, min(1, cores))
    assert actor_threads(sync, 1, "learner") == max(1, min(2, cores))
    assert actor_threads(sync, 0.25) == 1  # a reward actor scores beside the samplers
    with pytest.raises(ConfigError, match="torch_threads"):
        load_config(write(tmp_path, "prompts: {items: [a]}\nrewards: [{name: brightness}]\ntorch_threads: 0\n"))
