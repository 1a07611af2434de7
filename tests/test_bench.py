"""`rlds bench` runs its parts on the real actors and writes figures that make sense."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)


def test_stage_and_weight_benchmarks(ray_local, tiny_config):
    from rlds.bench import core

    config = tiny_config("iterations=2")
    sampler = core.sampler_stage(config, batches=1)
    learner = core.learner_stage(config, updates=1)
    rewards = core.reward_stage(config, calls_per_actor=1)
    assert sampler["trajectories_per_s"] > 0 and learner["trajectories_per_s"] > 0
    assert set(rewards) == {r.name for r in config.rewards}
    weights = core.weight_publication(4_000_000, receivers=2, repeats=2)
    assert weights["bytes"] == 4_000_000
    assert all(weights[f"{way}_s"] > 0 for way in ("shared_memory", "shared_memory_copy", "object_store"))


def test_plain_process_runs_the_same_algorithm_on_every_core_and_times_its_stages(tiny_config):
    from rlds.bench import core

    out = core.plain_process(tiny_config(), iterations=1, warmup=0)
    assert np.isfinite(out["trajectories_per_s"]) and out["trajectories_per_s"] > 0
    assert out["threads"] == core.machine_cores()
    stages = out["stages_per_iteration_s"]
    assert set(stages) == {"sample_s", "score_s", "update_s"} and all(v > 0 for v in stages.values())
    # the stages are inside the iteration, so the bound is at least what the loop reached
    assert sum(stages.values()) <= out["iteration_s"]
    assert out["compute_bound_trajectories_per_s"] >= out["trajectories_per_s"]


def test_compute_options_time_each_way_of_computing_and_check_the_ratio_to_the_bit(tiny_config):
    from rlds.bench.compute import compute_options

    out = compute_options(tiny_config(), ("float32", "bfloat16", "channels_last"), repeats=1)
    assert out["objective"] == "ppo" and out["threads"] == 1  # the sampler's 0.5 CPUs: one thread
    for name, figures in out["options"].items():
        assert figures["sample_trajectories_per_s"] > 0 and figures["update_trajectories_per_s"] > 0, name
        assert figures["to_the_bit"] is True, name  # each keeps the sampler and the learner in step
        assert figures["speedup_over_float32"] > 0
    assert out["options"]["float32"]["speedup_over_float32"] == 1.0
    with pytest.raises(ValueError, match=r"unknown compute option\(s\) \['fp8'\]"):
        compute_options(tiny_config(), ("fp8",))


def test_bench_writes_json_and_plot(ray_local, tiny_config, tmp_path):
    from rlds.bench import run_bench

    results = run_bench(tiny_config(), ("stages", "end_to_end"), tmp_path, iterations=2)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["summary"]["pipeline_efficiency"] == pytest.approx(results["summary"]["pipeline_efficiency"])
    assert 0 < saved["summary"]["pipeline_efficiency"] < 2
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_single_process_headline_is_rlds_at_its_faster_dtype_per_mode(tmp_path):
    from rlds.bench import _summarise, plot
    from rlds.bench.core import against_plain

    plain = {"trajectories_per_s": 10.0, "compute_bound_trajectories_per_s": 10.5}
    runs = {"float32": {"sync": {"trajectories_per_s": 8.0}, "async": {"trajectories_per_s": 16.0}},
            "bfloat16": {"sync": {"trajectories_per_s": 9.0}, "async": {"trajectories_per_s": 12.0}}}
    results = {"single_process": against_plain(plain, runs)}
    _summarise(results)
    s = results["summary"]
    assert s["sync_over_single_process"] == pytest.approx(0.9) and s["async_over_single_process"] == pytest.approx(1.6)
    assert s["single_process_best_dtypes"] == {"sync": "bfloat16", "async": "float32"}
    assert s["sync_over_single_process_float32"] == pytest.approx(0.8)
    assert s["async_over_single_process_bfloat16"] == pytest.approx(1.2)
    assert results["single_process"]["sync_over_plain"] == pytest.approx(0.8)  # the config's dtype, as before
    plot(results, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000
