"""Samplers that follow the autoscaler, on an autoscaling cluster of fake nodes (Ray's fake
multi-node provider: each node is a raylet on this machine, added and removed by the autoscaler).

`ray.cluster_utils.AutoscalingCluster` would build this cluster from the provider's example config,
which the 2.60 wheel does not ship, and its start() and shutdown() force-stop every Ray process on
the machine (Ray's own stop command), every other user's cluster with them. So the test writes that
config itself, starts the head with private ports and a temp dir of its own, and stops it (and the
nodes it started) by pid.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_ports, processes_of

pytestmark = pytest.mark.timeout(480)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fake_cluster_config(gcs_address: str, head_cpus: int, worker_cpus: int, max_nodes: int) -> dict:
    return {
        "cluster_name": "rlds-fake", "max_workers": max_nodes, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": worker_cpus}, "node_config": {}, "min_workers": 0,
                               "max_workers": max_nodes}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
        "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


def kill_all(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while processes_of(marker) and time.monotonic() < deadline:
            time.sleep(0.5)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_samplers_scale_out_with_the_autoscalers_nodes_and_go_when_a_node_leaves(tmp_path):
    gcs, dash, agent, client = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="ra-", dir="/tmp")  # short: socket paths have a length limit
    ip = "127.0.0.1"
    # the head fits the learner, the rewards and one sampler; an added node fits two samplers more
    # (the provider takes whole CPUs only)
    config_path = tmp_path / "autoscaler.json"
    config_path.write_text(json.dumps(fake_cluster_config(f"{ip}:{gcs}", head_cpus=3, worker_cpus=2,
                                                          max_nodes=1)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "2",
           "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--node-ip-address={ip}",
         f"--port={gcs}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--num-cpus=3", "--include-dashboard=false",
         f"--autoscaling-config={config_path}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "run"
    try:
        time.sleep(5)
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        train = subprocess.Popen(
            [str(BIN / "rlds"), "train", "configs/tiny.yaml", f"run_dir={run_dir}", f"ray.address={ip}:{gcs}",
             "--no-progress", "iterations=40", "checkpoint_every=40", "sample_grid_every=0",
             "sampler.num_workers=[1, 3]", "sampler.num_cpus=1", "learner.num_workers=1",
             "learner.num_cpus=0.5", "algo.batch_size=16", "algo.timesteps_per_iteration=1",
             "sampling.num_steps=20", "replay.max_staleness=1", "ray.actor_timeout_s=240"],
            cwd=ROOT, env=env, stdout=open(tmp_path / "train.log", "w"), stderr=subprocess.STDOUT)
        # once three samplers run, the added node leaves without warning: its raylet is killed
        deadline = time.monotonic() + 300
        while sum(r["samplers/running"] == 3 for r in rows(run_dir / "metrics.jsonl")) < 8:
            assert train.poll() is None, (tmp_path / "train.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the samplers did not scale out to 3 (for 8 iterations)"
            time.sleep(1)
        left_at = len(rows(run_dir / "metrics.jsonl"))
        workers = processes_of("raylet", temp_dir, "raylet.1")
        assert workers, "no raylet of an added node"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert train.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_all(temp_dir)  # the autoscaler's nodes are not children of the head's `ray start`
    metrics = rows(run_dir / "metrics.jsonl")
    assert len(metrics) == 40
    running = [r["samplers/running"] for r in metrics]
    assert running[0] >= 1 and max(running) == 3
    assert metrics[-1]["samplers/left"] >= 2 and metrics[-1]["restarts/sampler"] == 0, metrics[-1]
    # throughput is a figure to read, not to assert (the README's and the note's): -s prints it
    three = [r["throughput/samples_per_s"] for r in metrics[:left_at] if r["samplers/running"] == 3]
    one = [r["throughput/samples_per_s"] for r in metrics if r["samplers/running"] == 1 and r["samplers/left"]]
    print("samplers running by iteration:", running)
    print(f"samples/s with 3 samplers {sum(three) / len(three):.1f} ({len(three)} iterations), with 1 after "
          f"the node left {sum(one) / max(1, len(one)):.1f} ({len(one)} iterations)")
    books = json.loads((run_dir / "accounting.json").read_text())
    assert books["balanced"], books
