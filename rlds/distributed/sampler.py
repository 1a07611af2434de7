"""SamplerActor: turns prompts into trajectories in its own loop, with the newest weights it can get.

Each pass: pull newer weights (between batches only, so one version makes a whole trajectory),
reserve room in the ReplayStore (block while it says wait), sample, put the trajectory in the
object store, send the images to every reward pool, and hand the references to the store.
This actor owns what it put: if it dies, the store drops its entries (counted) and others refill.
"""
from __future__ import annotations

import time

import numpy as np
import ray

from rlds.config import Config


@ray.remote
class SamplerActor:
    def __init__(self, index: int, config: Config, prompts: list[str], store, weight_store,
                 reward_pools: list, epoch: int = 0, device: str = "cpu"):
        import torch
        from ray.util import metrics

        from rlds.policy import load_policy
        from rlds.policy.pipeline import DTYPES

        torch.set_num_threads(config.torch_threads)
        self.index, self.config, self.prompts, self.epoch = index, config, prompts, epoch
        self.store, self.weight_store, self.reward_pools = store, weight_store, reward_pools
        if device == "cpu" and ray.get_gpu_ids():
            device = "cuda"
        self.policy = load_policy(config.model, device)
        self.dtype = DTYPES[config.model.dtype] if device != "cpu" else torch.float32
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self.version = -1
        self.batches = 0
        self.time_idle = self.time_busy = 0.0
        tags = {"sampler": str(index)}
        self.samples_counter = metrics.Counter("rlds_samples", "Trajectories sampled", tag_keys=("sampler",))
        self.sample_hist = metrics.Histogram("rlds_sample_latency_s", "Seconds to sample one batch",
                                             boundaries=[0.1, 0.3, 1, 3, 10, 30, 100], tag_keys=("sampler",))
        self.sync_hist = metrics.Histogram("rlds_weight_sync_s", "Seconds to fetch and load new weights",
                                           boundaries=[0.001, 0.01, 0.1, 1, 10], tag_keys=("sampler",))
        self.idle_gauge = metrics.Gauge("rlds_sampler_idle_ratio", "Share of time waiting for room",
                                        tag_keys=("sampler",))
        for m in (self.samples_counter, self.sample_hist, self.sync_hist, self.idle_gauge):
            m.set_default_tags(tags)

    def pull_weights(self) -> bool:
        from rlds.policy import load_flat_trainable

        newer = ray.get(self.weight_store.newer_than.remote(self.version))
        if newer is None:
            return False
        start = time.perf_counter()
        version, (ref,) = newer
        # On CPU the weights stay in the object store's shared memory: no copy per sampler.
        load_flat_trainable(self.policy.unet, ray.get(ref), share=True)
        self.version = version
        self.sync_hist.observe(time.perf_counter() - start)
        return True

    def run(self, max_batches: int | None = None) -> dict:
        """Sample until the store says stop; returns this sampler's counts."""
        from rlds.policy import sample_trajectories

        cfg = self.config
        n, g = cfg.sampler.batch_size, cfg.sampler.images_per_prompt
        while max_batches is None or self.batches < max_batches:
            wait_start = time.perf_counter()
            self.pull_weights()
            status = "wait" if self.version < 0 else ray.get(
                self.store.reserve.remote(self.actor_id, n, self.version))
            if status == "stop":
                break
            if status == "wait":
                time.sleep(0.01)
                self.time_idle += time.perf_counter() - wait_start
                continue
            self.time_idle += time.perf_counter() - wait_start
            start = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, self.epoch, self.index, self.batches])
            prompt_ids = np.repeat(rng.integers(len(self.prompts), size=n // g), g)
            group_base = (self.epoch << 48) + (self.index << 32) + self.batches * n
            group_ids = group_base + np.repeat(np.arange(n // g), g)
            seeds = rng.integers(2**62, size=n)  # one per chain: any sample can be redrawn alone
            traj = sample_trajectories(
                self.policy, [self.prompts[i] for i in prompt_ids], cfg.sampling,
                seeds=seeds, policy_version=self.version, prompt_ids=prompt_ids,
                sample_ids=group_base + np.arange(n), dtype=self.dtype)
            traj_ref = ray.put(traj)
            images_ref = ray.put(traj.images)
            scores = {pool.name: [pool.score(images_ref, traj.prompts, group_ids, self.batches + self.index)]
                      for pool in self.reward_pools}
            self.store.add.remote(self.actor_id, [traj_ref], scores, self.version, prompt_ids, group_ids)
            self.batches += 1
            elapsed = time.perf_counter() - start
            self.time_busy += elapsed
            self.sample_hist.observe(elapsed)
            self.samples_counter.inc(n)
            self.idle_gauge.set(self.time_idle / max(1e-9, self.time_idle + self.time_busy))
        return {"sampler": self.index, "batches": self.batches, "time_idle_s": self.time_idle,
                "time_busy_s": self.time_busy}
