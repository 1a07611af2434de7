"""CPU benchmarks of rlds itself: each stage alone, the whole pipeline, sync against async, rlds
against one plain process that uses every core, and weight publication. Every figure comes from the code that
trains (the same actors, the same update), timed after a warm-up.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from rlds.config import Config, actor_threads, machine_cores, task_list
from rlds.configure import with_changes
from rlds.data.prompts import prompt_list
from rlds.distributed.protocol import ScoredBatch, TrainingBatch
from rlds.stats import timer


def _publish_initial(config: Config, weights) -> None:
    from rlds.policy import flatten_trainable, load_policy

    policy = load_policy(config.model)
    ray.get(weights.publish.remote(0, flatten_trainable(policy.unet)))


def sampler_stage(config: Config, batches: int = 4) -> dict:
    """All sampler actors of the config, sampling with nothing downstream but the store."""
    from rlds.distributed.replay import ReplayStore
    from rlds.distributed.sampler import SamplerActor, SamplerTask
    from rlds.distributed.weights import WeightStore

    n = config.sampler.max_workers
    per = config.sampler.batch_size
    weights = WeightStore.remote()
    store = ReplayStore.remote([per], per * n * (batches + 1), 10**6, 60.0)
    _publish_initial(config, weights)
    tasks = [SamplerTask(t.name, prompt_list(t), t.images_per_prompt) for t in task_list(config)[:1]]
    actors = [SamplerActor.options(num_cpus=config.sampler.num_cpus).remote(
        i, config, tasks, store, weights) for i in range(n)]
    ray.get([a.run.remote(max_batches=1) for a in actors])  # warm-up
    took: dict = {}
    with timer("s", took):
        ray.get([a.run.remote(max_batches=1 + batches) for a in actors])
    for a in actors + [store, weights]:
        ray.kill(a)
    return {"trajectories_per_s": n * per * batches / took["s"], "samplers": n, "seconds": took["s"]}


def reward_stage(config: Config, calls_per_actor: int = 8) -> dict:
    """Each reward pool alone, fed sampler-sized batches of real images from the base model."""
    import torch

    from rlds.policy import load_policy, sample_trajectories

    torch.set_num_threads(actor_threads(config, config.sampler.num_cpus))  # sampling the images to score
    policy, per, out = load_policy(config.model), config.sampler.batch_size, {}
    for task in task_list(config):
        prompts, g = prompt_list(task), task.images_per_prompt
        traj = sample_trajectories(policy, [prompts[i // g % len(prompts)] for i in range(per)],
                                   config.sampling, seeds=list(range(per)))
        out.update(_score_stage(task, traj, np.repeat(np.arange(per // g), g), calls_per_actor, config))
    return out


def _score_stage(task, traj, groups: np.ndarray, calls_per_actor: int, config: Config) -> dict:
    from rlds.distributed.reward import RewardPool

    per, out = len(traj.prompts), {}
    images = ray.put(traj.images)
    for rc in task.rewards:
        pool = RewardPool(rc, actor_threads(config, rc.num_cpus))
        ray.get([pool.score(images, traj.prompts, groups, k) for k in range(len(pool.actors))])  # warm-up
        calls, took = calls_per_actor * len(pool.actors), {}
        with timer("s", took):
            ray.get([pool.score(images, traj.prompts, groups, k) for k in range(calls)])
        out[rc.name] = {"images_per_s": calls * per / took["s"], "actors": len(pool.actors)}
        for a in pool.actors:
            ray.kill(a)
    return out


def learner_stage(config: Config, updates: int = 3) -> dict:
    """The LearnerGroup alone, updating on trajectories already in the object store."""
    import torch

    from rlds.distributed.learner import LearnerGroup
    from rlds.distributed.weights import WeightStore
    from rlds.policy import load_policy, sample_trajectories

    torch.set_num_threads(actor_threads(config, config.sampler.num_cpus))  # sampling the batches to train
    policy = load_policy(config.model)
    per, total = config.sampler.batch_size, config.algo.batch_size
    prompts = prompt_list(task_list(config)[0])
    parts = [ScoredBatch("bench", 0, ray.put(sample_trajectories(
                 policy, [prompts[(b * per + i) % len(prompts)] for i in range(per)], config.sampling,
                 seeds=list(range(b * per, (b + 1) * per)))), {}, 0, np.zeros(per, np.int64), np.arange(per),
                 time.time())
             for b in range(total // per)]
    advantages = np.random.default_rng(0).standard_normal(total).astype(np.float32)
    weights = WeightStore.remote()
    group = LearnerGroup(config, weights)
    ray.get(group.update(TrainingBatch(parts, 0), advantages, 0))  # warm-up
    took: dict = {}
    with timer("s", took):
        for it in range(1, 1 + updates):
            ray.get(group.update(TrainingBatch(parts, it), advantages, it))
    group.shutdown()
    ray.kill(weights)
    return {"trajectories_per_s": total * updates / took["s"], "learners": group.size,
            "update_s": took["s"] / updates}


def end_to_end(config: Config, iterations: int = 8, warmup: int = 2) -> dict:
    """A real training run; steady-state throughput after `warmup` iterations."""
    from rlds.metrics import read_metrics
    from rlds.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        run = with_changes(config, {"iterations": iterations + warmup, "run_dir": tmp,
                                    "checkpoint_every": 10**6, "sample_grid_every": 0, "resume": None})
        Trainer(run, progress=False).run()
        rows = read_metrics(Path(tmp) / "metrics.jsonl")[warmup:]
    seconds = sum(r["time/iteration_s"] for r in rows)
    return {"trajectories_per_s": config.algo.batch_size * len(rows) / seconds,
            "iteration_s": seconds / len(rows), "policy_lag_max": max(r["policy_lag/max"] for r in rows),
            "reward_first": rows[0]["reward/mean"], "reward_last": rows[-1]["reward/mean"]}


def plain_process(config: Config, iterations: int = 8, warmup: int = 2, threads: int | None = None,
                  policy=None) -> dict:
    """The same algorithm with no Ray, as a user's own script runs it: sample, score, normalise and
    update in one process, with every core (`threads`, default all of them) on each stage in turn,
    training `policy` in place (default: the config's model, loaded).
    Each stage's own time is kept: their sum per trajectory is the compute bound of this algorithm
    on this machine, what a loop that wasted nothing between its stages would reach."""
    import torch

    from rlds.algo import compute_advantages, make_optimizer, ppo_update
    from rlds.policy import load_policy, sample_trajectories
    from rlds.rewards import build_reward

    threads = threads or machine_cores()
    torch.set_num_threads(threads)
    policy = policy or load_policy(config.model)
    opt = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], config.algo)
    task = task_list(config)[0]
    rewards = [(build_reward(r.name, r.args), r.weight) for r in task.rewards]
    prompts = prompt_list(task)
    per, total = config.sampler.batch_size, config.algo.batch_size
    rng = np.random.default_rng(config.seed)
    times: dict = {}
    for it in range(iterations + warmup):
        stage: dict = {}
        with timer("s" if it >= warmup else "warmup_s", times):
            trajs, scores = [], []
            for _ in range(total // per):
                chosen = [prompts[i] for i in rng.integers(len(prompts), size=per)]
                with timer("sample_s", stage):
                    traj = sample_trajectories(policy, chosen, config.sampling, seeds=rng.integers(2**62, size=per))
                trajs.append(traj)
                with timer("score_s", stage):
                    scores.append(sum(w * f(traj.images, chosen, np.arange(per)) for f, w in rewards))
            with timer("update_s", stage):
                adv = compute_advantages(np.concatenate(scores), config.algo.advantage, config.algo.advantage_clip,
                                         np.zeros(total, np.int64), np.arange(total))
                policy.scheduler.set_timesteps(config.sampling.num_steps)
                ppo_update(policy, trajs, np.split(adv, len(trajs)), opt, config.algo, rng)
        if it >= warmup:
            for key, value in stage.items():
                times[key] = times.get(key, 0.0) + value
    stages = {key: times[key] / iterations for key in ("sample_s", "score_s", "update_s")}
    return {"trajectories_per_s": total * iterations / times["s"], "iteration_s": times["s"] / iterations,
            "threads": threads, "stages_per_iteration_s": stages,
            "compute_bound_trajectories_per_s": total / sum(stages.values())}


def native_bfloat16() -> bool:
    """Whether this machine computes in bfloat16 natively (a CUDA card that supports it, or a CPU with
    AVX-512 BF16 or AMX): where it does not, autocast emulates bfloat16 and costs time."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def single_process(config: Config, iterations: int = 8) -> dict:
    """rlds against one plain process on the same work and the same machine: the plain loop with
    every core (float32, as a user's script runs), then rlds as the config sets it up, synchronous
    (`replay.max_staleness: 0`) and asynchronous (1), and again with `model.dtype: bfloat16` where
    the machine computes bfloat16 natively: rlds at its best settings for the machine. `best` takes,
    for each mode, the faster dtype."""
    plain = plain_process(config, iterations)
    dtypes = [config.model.dtype] + (["bfloat16"] if config.model.dtype != "bfloat16" and native_bfloat16() else [])
    runs = {}
    for dtype in dtypes:
        run = with_changes(config, {"model.dtype": dtype})
        runs[dtype] = {mode: end_to_end(with_changes(run, {"replay.max_staleness": staleness}), iterations)
                       for mode, staleness in (("sync", 0), ("async", 1))}
    return against_plain(plain, runs)


def against_plain(plain: dict, runs: dict) -> dict:
    """`runs` ({dtype: {"sync": end_to_end, "async": end_to_end}}, the config's dtype first) as
    ratios to the plain loop, by dtype, and each mode's faster dtype as `best`; the config's dtype's
    figures also sit at the top level, where they were before rlds tried other dtypes."""
    rate = plain["trajectories_per_s"]
    by_dtype = {dtype: {**modes, **{f"{mode}_over_plain": modes[mode]["trajectories_per_s"] / rate
                                    for mode in ("sync", "async")}}
                for dtype, modes in runs.items()}
    best = {}
    for mode in ("sync", "async"):
        dtype = max(by_dtype, key=lambda d: by_dtype[d][mode]["trajectories_per_s"])
        best[mode] = {"dtype": dtype, "over_plain": by_dtype[dtype][f"{mode}_over_plain"]}
    return {"plain": plain, **next(iter(by_dtype.values())), "dtypes": by_dtype, "best": best}


@ray.remote(num_cpus=0)
class WeightSender:
    """Learner rank 0's publication without the model: a parameter of `numel` values, published
    the same way (rlds.distributed.weights.WeightPublisher)."""

    def __init__(self, weights, numel: int):
        import torch

        import rlds.policy  # noqa: F401 (imported here, so the first publication times no imports)
        from rlds.distributed.weights import WeightPublisher

        self.module = torch.nn.Module()
        self.module.flat = torch.nn.Parameter(torch.from_numpy(
            np.random.default_rng(0).standard_normal(numel, dtype=np.float32)))
        self.publisher = WeightPublisher(weights)

    def publish(self, version: int) -> None:
        import torch

        with torch.no_grad():
            self.module.flat[0] = version  # a new state each time
        self.publisher.publish(version, self.module)


@ray.remote(num_cpus=0)
class WeightReceiver:
    """A sampler's weight intake without the model: the same pull and load as SamplerLoop."""

    def __init__(self, weights, numel: int, share: bool):
        import torch

        import rlds.policy  # noqa: F401 (as in WeightSender)
        from rlds.distributed.weights import WeightLoader

        self.loader, self.share, self.version = WeightLoader(weights), share, -1
        self.module = torch.nn.Module()
        self.module.flat = torch.nn.Parameter(torch.zeros(numel))

    def pull(self) -> float:
        from rlds.policy import load_flat_trainable

        start = time.perf_counter()
        self.version, flat = self.loader.newer_than(self.version)
        if not load_flat_trainable(self.module, flat, share=self.share):
            self.loader.release()
        assert float(self.module.flat[0]) == self.version  # the version it was told
        return time.perf_counter() - start


def weight_publication(size_bytes: int, receivers: int = 4, repeats: int = 4) -> dict:
    """Publish a state of `size_bytes` from a learner-like actor and have `receivers` samplers on
    this node load it, against one memcpy: through shared-memory slots with zero-copy receivers
    (what a CPU run does), the same with receivers that copy (as onto a GPU), and through the object
    store alone (`WeightStore(shared_memory=False)`, what a learner on another node does). Each way
    reports its first publication (slots and object store pages still to fault in) and its best."""
    from rlds.distributed.weights import WeightStore

    numel = size_bytes // 4
    src = np.random.default_rng(0).standard_normal(numel, dtype=np.float32)
    dst = np.empty_like(src)
    memcpy = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        memcpy.append(time.perf_counter() - start)
    del src, dst
    out = {"bytes": int(numel * 4), "receivers": receivers, "memcpy_s": min(memcpy)}
    for key, shared_memory, share in (("shared_memory", True, True), ("shared_memory_copy", True, False),
                                      ("object_store", False, True)):
        weights = WeightStore.remote(shared_memory=shared_memory)
        sender = WeightSender.remote(weights, numel)
        actors = [WeightReceiver.remote(weights, numel, share) for _ in range(receivers)]
        ray.get([a.__ray_ready__.remote() for a in actors + [sender]])
        times = []
        for version in range(repeats):
            start = time.perf_counter()
            ray.get(sender.publish.remote(version))  # what rank 0 does
            ray.get([a.pull.remote() for a in actors])
            times.append(time.perf_counter() - start)
        out[f"{key}_s"], out[f"{key}_first_s"] = min(times), times[0]
        out[f"{key}_over_memcpy"] = min(times) / out["memcpy_s"]
        ray.get(weights.close.remote())
        for a in actors + [sender, weights]:
            ray.kill(a)
    return out
