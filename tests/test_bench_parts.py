"""The GPU benchmark's code path (tiny models, CPU) and the simulated-cluster scaling benchmark."""
import json
import math

import pytest

EXPECTED_GPU_KEYS = {"mode", "device", "torch", "config", "flops", "sampling", "learner", "end_to_end",
                     "vae_decode", "summary", "paper_reference", "peak_bf16_flops", "notes", "complete"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.timeout(120)
def test_gpu_bench_tiny_runs_rlds_code_path_on_cpu(tmp_path):
    from rlds.bench.gpu import run_gpu_bench

    out = tmp_path / "gpu.json"
    r = run_gpu_bench(tiny=True, batch_size=2, num_steps=5, reps=1, out=str(out))
    assert EXPECTED_GPU_KEYS <= set(r), set(r) ^ EXPECTED_GPU_KEYS
    assert r["mode"] == "tiny" and r["device"] == "cpu" and r["complete"] is True
    assert r["config"]["timesteps_per_iteration"] == 5 and r["config"]["guidance_scale"] == 7.0
    assert r["flops"]["unet_forward"] > 0 and r["flops"]["unet_forward_batch"] == 4  # guided: 2 x batch
    assert r["flops"]["learner_per_batch"] == 3 * 5 * r["flops"]["unet_forward"]
    for phase, key in (("sampling", "seconds_per_batch"), ("learner", "seconds_per_update"),
                       ("end_to_end", "seconds_per_iteration"), ("vae_decode", "seconds_per_batch")):
        assert _finite(r[phase][key]) and r[phase][key] > 0, (phase, r[phase])
    for phase in ("sampling", "learner", "end_to_end"):
        assert _finite(r[phase]["trajectories_per_s"]) and _finite(r[phase]["achieved_flops"])
        assert r[phase]["mfu"] is None  # no peak for a CPU
    assert r["summary"]["end_to_end_mfu"] is None
    assert _finite(r["summary"]["vs_paper_trajectories_per_s"])
    assert json.loads(out.read_text())["complete"] is True  # JSON-able, and written


def test_peak_table_matches_device_names():
    from rlds.bench.gpu import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA A10G") == 70e12
    assert peak_bf16_flops("NVIDIA L40S") is None
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") is None


@pytest.mark.timeout(90)
def test_scaling_small_run_on_a_simulated_cluster():
    import ray

    from rlds.bench.scaling import run_scaling

    try:
        r = run_scaling(sampler_counts=(1, 2), nodes=2, sample_cost_s=0.2, iterations=4, warmup=1,
                        update_cost_s=0.02, time_budget_s=50, timeout_s=120)
    finally:
        assert not ray.is_initialized()  # it shuts down its own cluster
    assert r["wall_s"] > 0  # its speed is the benchmark's to report; the timeout above bounds a hang
    assert r["sampler_nodes"] == 2  # spread over both worker nodes
    assert [t["samplers"] for t in r["trials"]] == [1, 2]
    for t in r["trials"]:
        assert _finite(t["trajectories_per_s"]) and t["trajectories_per_s"] > 0
        assert t["samples_trained"] >= (4 + 1) * t["global_batch"]
        assert t["policy_lag_max"] <= 1  # max_staleness 1
        assert t["samplers_finished"] == t["samplers"]
    assert r["efficiency"]["1"] == 1.0
    assert _finite(r["efficiency"]["2"]) and r["efficiency"]["2"] > 0  # how close to linear: the benchmark's figure
    json.dumps(r)
