"""Sampler scaling on a simulated cluster: how close do N samplers come to N times one?

The model work is modelled (a sampler sleeps `sample_cost_s` per batch instead of running a UNet,
the reward and the learner sleep their own costs), and everything else is rlds' real system:
the ReplayStore actor (reservations with backpressure and the staleness gate, joining scores,
handing out full batches), the WeightStore (one versioned reference, samplers pull when newer),
the RewardPool dispatch, the advantages, and the trainer's get-batch/update loop. The cluster is a
`ray.cluster_utils.Cluster` on this machine: a head node (store, weights, learner, rewards) and
`nodes` worker nodes, samplers spread over them round-robin.

`ModelledSampler` runs the real sampler loop (`SamplerLoop`: pull weights, reserve, sample, put,
score, add) with `make_trajectory` replaced by the sleep: 16 processes holding a UNet each would
not fit two CPU cores.

Weak scaling, as in the paper: each sampler contributes `batch_size` trajectories to every
iteration (global batch = samplers x batch_size), with `max_staleness` 1 so that sampling the next
batch overlaps learning on this one. Efficiency(n) = throughput(n) / (n x throughput(1)).
"""
from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import ray

from rlds.config import Config, SamplerConfig
from rlds.distributed.protocol import LearnerShard, UpdateResult
from rlds.distributed.replay import ReplayStore, next_batch
from rlds.distributed.reward import RewardPool
from rlds.distributed.sampler import SamplerLoop, SamplerTask
from rlds.distributed.weights import WeightStore
from rlds.policy.sampling import Trajectory
from rlds.stats import timer

HEAD_RESOURCE = "sim_head"  # the head node: store, weights, learner, reward actors
NODE_RESOURCE = "sim_node"  # a sampler slot on any worker node; sim_node_<i> pins to node i
TARGET_EFFICIENCY_AT_16 = 0.90  # the target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- modelled actors


@ray.remote(num_cpus=0)
class ModelledRewardActor:
    """Scores a sampler batch after `cost_s` (a reward model's latency); random scores."""

    def __init__(self, name: str, cost_s: float, seed: int = 0):
        self.name, self.cost_s = name, cost_s
        self.rng = np.random.default_rng(seed)

    def score(self, images: np.ndarray, prompts: list[str], group_ids: np.ndarray) -> np.ndarray:
        time.sleep(self.cost_s)
        return self.rng.normal(size=len(prompts)).astype(np.float32)


class ModelledRewardPool(RewardPool):
    """rlds' RewardPool (its `score` dispatch is inherited) over modelled reward actors."""

    def __init__(self, name: str, num_actors: int, cost_s: float):
        self.name = name
        self.actors = [ModelledRewardActor.options(resources={HEAD_RESOURCE: 1}).remote(name, cost_s, i)
                       for i in range(num_actors)]


@ray.remote(num_cpus=1)
class ModelledSampler(SamplerLoop):
    """rlds' sampler loop (SamplerLoop, as SamplerActor runs it) with the UNet replaced by a sleep.

    The trajectory is a real `Trajectory` with small arrays; it goes through the object store, the
    reward pools and the ReplayStore exactly as a full one does.
    """

    def __init__(self, index: int, batch_size: int, sample_cost_s: float, latent_shape: Sequence[int],
                 num_steps: int):
        config = Config(sampler=SamplerConfig(batch_size=batch_size), seed=0)
        super().__init__(index, config, [], None, None)  # the trial attaches the store and the task
        self.sample_cost_s, self.latent_shape, self.num_steps = sample_cost_s, tuple(latent_shape), num_steps

    def load_weights(self, flat: np.ndarray) -> bool:
        self.weights = np.array(flat)  # stands in for load_flat_trainable (a copy, as on a GPU)
        return False

    def make_trajectory(self, prompts, prompt_ids, seeds, sample_ids, start_seeds=None, guidance_scales=None):
        time.sleep(self.sample_cost_s)  # the modelled UNet: num_steps guided DDIM steps
        n, rng = len(prompts), np.random.default_rng(int(seeds[0]))
        return Trajectory(
            latents=rng.standard_normal((n, self.num_steps + 1) + self.latent_shape, dtype=np.float32),
            timesteps=np.arange(self.num_steps, dtype=np.int64)[::-1].copy(),
            log_probs=rng.standard_normal((n, self.num_steps), dtype=np.float32),
            prompt_embeds=np.zeros((n, 4, 8), np.float32), negative_embeds=np.zeros((1, 4, 8), np.float32),
            images=rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8), prompts=prompts,
            prompt_ids=prompt_ids, sample_ids=sample_ids, policy_version=self.version,
            guidance_scale=np.ones(n, np.float32), step_etas=np.ones(self.num_steps, np.float32))


@ray.remote(num_cpus=0)
class ModelledLearner:
    """LearnerActor's update with the K-step PPO update replaced by `time.sleep(update_cost_s)`."""

    def __init__(self, weight_store, update_cost_s: float, weight_values: int):
        self.weight_store, self.update_cost_s = weight_store, update_cost_s
        self.weights = np.zeros(weight_values, dtype=np.float32)

    def publish(self, version: int) -> float:
        took: dict = {}
        with timer("publish", took):
            self.weights += 1.0  # a new version of the flat buffer
            ray.get(self.weight_store.publish.remote(version, self.weights))
        return took["publish"]

    def update(self, shard: LearnerShard) -> UpdateResult:
        times: dict = {}
        with timer("time/update_s", times):
            with timer("time/fetch_s", times):
                trajectories = shard.fetch()
            assert trajectories is not None and len(trajectories) == len(shard.advantages)
            time.sleep(self.update_cost_s)
            times["time/publish_s"] = self.publish(shard.iteration + 1)
        return UpdateResult(times)


# ---------------------------------------------------------------------- one trial


def _trial(samplers: list, tasks: list, n: int, batch_size: int, global_batch: int, warmup: int,
           iterations: int, max_staleness: int, update_cost_s: float, weight_values: int,
           timeout_s: float, trial: int) -> dict:
    import psutil

    from rlds.algo.advantages import compute_advantages

    capacity = (max_staleness + 1) * global_batch  # the trainer's default
    head = {"resources": {HEAD_RESOURCE: 1}}
    store = ReplayStore.options(**head).remote([global_batch], capacity, max_staleness, timeout_s)
    weights = WeightStore.options(**head).remote()
    learner = ModelledLearner.options(**head).remote(weights, update_cost_s, weight_values)
    loops = []
    try:
        ray.get(learner.publish.remote(0), timeout=timeout_s)
        psutil.cpu_percent(None)
        start = time.perf_counter()
        # each trial attaches as if resumed at another iteration, so that it draws new seeds
        ray.get([s.attach.remote(store, weights, tasks, trial) for s in samplers[:n]], timeout=timeout_s)
        loops = [s.run.remote() for s in samplers[:n]]
        done_at, lags, update_s, wait_s = [], [], [], []
        for it in range(warmup + iterations):
            t0 = time.perf_counter()
            batch = next_batch(store, it, timeout_s)
            wait_s.append(time.perf_counter() - t0)
            rewards = np.concatenate([sum(p.scores.values()) for p in batch.parts])
            adv = compute_advantages(rewards, "batch", 10.0, batch.prompt_ids, batch.group_ids)
            sizes = np.cumsum([0] + [len(p) for p in batch.parts])
            shard = LearnerShard(batch.trajectories, [adv[sizes[i]:sizes[i + 1]] for i in range(len(batch.parts))],
                                 batch.tasks, it)
            call = learner.update.remote(shard)
            ready, _ = ray.wait([call], timeout=timeout_s)
            if not ready:
                raise TimeoutError(f"the modelled learner did not finish iteration {it} in {timeout_s} s")
            update_s.append(ray.get(call).stats["time/update_s"])
            done_at.append(time.perf_counter())
            lags.extend(batch.lags)
        window = done_at[-1] - done_at[warmup - 1] if warmup else done_at[-1] - start
        throughput = iterations * global_batch / window
        cpu = psutil.cpu_percent(None)  # the whole machine's, over the trial
        ray.get(store.close.remote(), timeout=timeout_s)
        finished, _ = ray.wait(loops, num_returns=len(loops), timeout=timeout_s)
        per_sampler = ray.get(finished)
        stats = ray.get(store.stats.remote(), timeout=timeout_s)
    finally:
        for actor in (store, weights, learner):
            ray.kill(actor)
    busy = sum(s["time_busy_s"] for s in per_sampler)
    idle = sum(s["time_idle_s"] for s in per_sampler)
    steady_wait = wait_s[warmup:]
    batches = max(1, sum(s["batches"] for s in per_sampler))
    loop = {key: sum(s[key] for s in per_sampler) / batches
            for key in ("time_idle_s", "time_busy_s", "time_sync_s")}
    return {
        "samplers": n, "global_batch": global_batch, "iterations_timed": iterations,
        "trajectories_per_s": throughput, "seconds_timed": window,
        "iteration_s": window / iterations,
        "learner_update_s": float(np.mean(update_s[warmup:])),
        "learner_wait_s": float(np.mean(steady_wait)),
        "learner_idle_ratio": float(np.sum(steady_wait) / window),
        "sampler_idle_ratio": idle / max(1e-9, idle + busy),
        "sampler_loop_per_batch": loop,
        "cpu_percent": cpu,
        "sampler_batches": [s["batches"] for s in sorted(per_sampler, key=lambda s: s["sampler"])],
        "samplers_finished": len(per_sampler),
        "policy_lag_mean": float(np.mean(lags)), "policy_lag_max": int(np.max(lags)),
        "samples_added": stats["added"], "samples_trained": stats["consumed"],
        "drops": stats["drops"],
    }


# ---------------------------------------------------------------------- the benchmark


def run_scaling(sampler_counts: Sequence[int] = (1, 2, 4, 8, 16), nodes: int = 4, sample_cost_s: float = 1.0,
                batch_size: int = 4, iterations: int = 10, warmup: int = 2, max_staleness: int = 1,
                update_cost_s: float = 0.05, reward_cost_s: float = 0.005, reward_actors: int = 2,
                latent_shape: Sequence[int] = (4, 8, 8), num_steps: int = 10, weight_values: int = 1 << 16,
                time_budget_s: float = 150.0, timeout_s: float = 60.0) -> dict:
    """Throughput of 1..N modelled samplers feeding rlds' real ReplayStore/WeightStore; a JSON-able dict.

    `sample_cost_s` = 1 s per 4-trajectory batch is a fast sampler: SD2 at 512 px with 50 guided
    steps takes several seconds per such batch on an A100. Much shorter costs measure this 2-core
    host running five simulated nodes' Ray processes more than they measure rlds.

    Starts (and always stops) its own `ray.cluster_utils.Cluster`: a head node and `nodes` worker
    nodes; never touches another Ray instance. Sampler counts past `time_budget_s` are skipped
    (said in notes).
    """
    import psutil
    from ray._private.utils import get_ray_address_file

    if ray.is_initialized():
        raise RuntimeError("run_scaling starts its own simulated cluster: call it with Ray not initialised")
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    counts = sorted(set(int(c) for c in sampler_counts))
    if not counts or counts[0] < 1:
        raise ValueError(f"sampler_counts must be positive, got {sampler_counts}")
    if update_cost_s >= sample_cost_s:
        raise ValueError("update_cost_s must stay below sample_cost_s, or the learner is the bottleneck")
    wall_start = time.perf_counter()
    notes: list[str] = []
    slots = math.ceil(counts[-1] / nodes)
    mem_before = psutil.virtual_memory().available
    # Cluster() writes its address to /tmp/ray/ray_current_cluster, which `ray.init("auto")` of
    # anyone else on this machine would then follow: put back what was there.
    address_file = get_ray_address_file(None)
    previous_address = Path(address_file).read_text() if os.path.exists(address_file) else None
    from ray.cluster_utils import Cluster

    cluster = None
    result: dict = {"config": {
        "sampler_counts": counts, "nodes": nodes, "slots_per_node": slots, "sample_cost_s": sample_cost_s,
        "batch_size": batch_size, "global_batch": "samplers x batch_size", "iterations": iterations,
        "warmup": warmup, "max_staleness": max_staleness, "update_cost_s": update_cost_s,
        "reward_cost_s": reward_cost_s, "reward_actors": reward_actors,
        "trajectory_bytes": 4 * batch_size * (num_steps + 1) * int(np.prod(latent_shape)),
        "weight_bytes": 4 * weight_values, "machine_cpus": os.cpu_count(),
    }, "notes": notes}
    try:
        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {HEAD_RESOURCE: 1000}, "include_dashboard": False,
            "dashboard_port": _free_port(), "dashboard_agent_listen_port": _free_port(),
            "_system_config": {"metrics_report_interval_ms": 60000}})
        for i in range(nodes):  # worker nodes pick their own free agent ports (Cluster does that)
            cluster.add_node(num_cpus=slots, resources={NODE_RESOURCE: slots, f"{NODE_RESOURCE}_{i}": slots})
        ray.init(address=cluster.address, log_to_driver=False)
        result["cluster_start_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        tasks = [SamplerTask("modelled", [f"prompt {i}" for i in range(1000)],
                             pools=[ModelledRewardPool("modelled", reward_actors, reward_cost_s)])]
        samplers = [ModelledSampler.options(resources={NODE_RESOURCE: 1, f"{NODE_RESOURCE}_{i % nodes}": 1})
                    .remote(i, batch_size, sample_cost_s, latent_shape, num_steps)
                    for i in range(counts[-1])]
        sampler_nodes = ray.get([s.node.remote() for s in samplers], timeout=180)
        result["actors_start_s"] = round(time.perf_counter() - t0, 2)
        result["sampler_nodes"] = len(set(sampler_nodes))
        result["memory_used_gb"] = round((mem_before - psutil.virtual_memory().available) / 2**30, 2)

        trials = []
        for trial, n in enumerate(counts):
            elapsed = time.perf_counter() - wall_start
            estimate = (warmup + iterations) * sample_cost_s * 1.5 + 5
            if trials and elapsed + estimate > time_budget_s:
                notes.append(f"skipped {n}+ samplers: {elapsed:.0f} s of the {time_budget_s:.0f} s budget spent")
                break
            trials.append(_trial(samplers, tasks, n, batch_size, n * batch_size, warmup, iterations,
                                 max_staleness, update_cost_s, weight_values, timeout_s, trial))
        saturated = [t["samplers"] for t in trials if t["cpu_percent"] >= 90]
        if saturated:
            notes.append(f"this machine's {os.cpu_count()} CPUs were >= 90% busy (machine-wide, other work "
                         f"included) during the trials with {saturated} samplers: there the simulation (every "
                         "node's Ray processes share these cores), not only rlds, limits throughput; see "
                         "sampler_loop_per_batch for where a sampler's loop spends its time, and raise "
                         "sample_cost_s to model a real sampler's batch more closely")
        base = trials[0]["trajectories_per_s"] / trials[0]["samplers"]  # per sampler, at the fewest
        for t in trials:
            t["ideal_trajectories_per_s"] = t["samplers"] * batch_size / sample_cost_s
            t["efficiency_vs_ideal"] = t["trajectories_per_s"] / t["ideal_trajectories_per_s"]
            t["efficiency"] = t["trajectories_per_s"] / (t["samplers"] * base)
        result["trials"] = trials
        result["efficiency"] = {str(t["samplers"]): round(t["efficiency"], 4) for t in trials}
        at16 = next((t["efficiency"] for t in trials if t["samplers"] == 16), None)
        result["target"] = {"samplers": 16, "efficiency": TARGET_EFFICIENCY_AT_16,
                            "measured": at16, "met": (at16 >= TARGET_EFFICIENCY_AT_16) if at16 is not None else None}
        if counts[0] != 1:
            notes.append(f"efficiency is relative to {counts[0]} samplers (no 1-sampler trial)")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if previous_address is None:
            if os.path.exists(address_file):
                os.remove(address_file)
        else:
            Path(address_file).write_text(previous_address)
    result["wall_s"] = round(time.perf_counter() - wall_start, 2)
    return result

