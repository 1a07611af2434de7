"""SamplerActor: turns prompts into trajectories in its own loop, with the newest weights it can get.

Each pass: pull newer weights when the store says there are some (between batches only, so one
version makes a whole trajectory), reserve room in the ReplayStore (wait while it says so; it names
the task to sample), sample that task's prompts, put the trajectory and its images in the object
store, send the images to the task's reward pools, and hand the store a SampledBatch. This actor
owns what it put: if it dies, the store drops its entries (counted) and the other samplers refill them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import ray

from rlds.config import Config, actor_threads
from rlds.data.prompts import PromptPasses, draw_groups
from rlds.data.sources import FileSource, GeneratedSource, PromptShard, prompt_id
from rlds.distributed.protocol import SampledBatch
from rlds.stats import image_stats, timer


@dataclass
class SamplerTask:
    """What a sampler needs of one task: its prompts (a list drawn from at random, or a file or a
    generated set that each sampler streams its own shard of), group size and reward pools."""
    name: str
    prompts: list[str]
    images_per_prompt: int = 1
    pools: list = field(default_factory=list)
    first_prompt_id: int = 0  # prompt ids run over all tasks' prompts (per-prompt statistics)
    source: Optional[FileSource | GeneratedSource] = None  # instead of `prompts`; ids: hashes of the text
    weights: Optional[np.ndarray] = None  # each prompt's probability of being drawn (prompts.mix); None: uniform
    # each prompt's training guidance scale (prompts.guidance_scale_by_set); None: sampling.guidance_scale
    guidance_scales: Optional[np.ndarray] = None
    # each prompt's group size (prompts.images_per_prompt_by_set); None: images_per_prompt
    group_sizes: Optional[np.ndarray] = None
    # (prompts, share, group size) of each set drawn in shuffled passes (prompts.order); None: i.i.d.
    passes: Optional[list[tuple[int, float, int]]] = None


class SamplerLoop:
    """The loop, apart from how a batch is made (`make_trajectory`) and weights are loaded."""

    wait_s = 0.5  # the longest one reserve call waits in the store for room

    def __init__(self, index: int, config: Config, tasks: list[SamplerTask], store, weight_store,
                 start_iteration: int = 0, incarnation: int = 0, positions: Optional[dict] = None):
        from ray.util import metrics

        # incarnation: a restarted sampler must not redraw its predecessor's prompts and seeds
        self.index, self.config, self.incarnation = index, config, incarnation
        self.attach(store, weight_store, tasks, start_iteration, positions)
        self.actor_id = ray.get_runtime_context().get_actor_id()
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

    def attach(self, store, weight_store, tasks: list[SamplerTask], start_iteration: int = 0,
               positions: Optional[dict] = None) -> None:
        """Point the loop at a (new) store: a fresh run (or one resumed at `start_iteration`, which
        seeds what it draws, and at each streamed task's `positions[t]` in this sampler's shard),
        counters from zero, weights pulled anew."""
        from rlds.distributed.weights import WeightLoader

        self.store, self.weight_store, self.tasks = store, weight_store, tasks
        self.weight_loader = WeightLoader(weight_store)
        self.start_iteration = start_iteration
        positions = positions or {}
        self.shards = {t: PromptShard(task.source, "train", self.index, self.config.sampler.max_workers,
                                      self.config.seed, tuple(positions.get(t, (0, 0))))
                       for t, task in enumerate(tasks) if task.source is not None}
        self.passes = {t: PromptPasses(task.passes, self.config.sampler.batch_size, self.index,
                                       self.config.sampler.max_workers, self.config.seed, positions.get(t, (0, 0))[1])
                       for t, task in enumerate(tasks) if task.passes is not None}
        self.version, self.batches = -1, 0
        self.batches_on_version = 0  # batches sampled with the weights held now
        self.times = {"idle": 0.0, "busy": 0.0, "sync": 0.0}  # seconds, by rlds.stats.timer

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def make_trajectory(self, prompts: list[str], prompt_ids, seeds, sample_ids, start_seeds=None,
                        guidance_scales=None):
        """`guidance_scales`: each chain's [B], or None for sampling.guidance_scale."""
        raise NotImplementedError

    def load_weights(self, flat: np.ndarray) -> bool:
        """Returns whether the model now reads `flat` itself (rlds.policy.load_flat_trainable)."""
        raise NotImplementedError

    def pull_weights(self) -> bool:
        took: dict = {}
        with timer("sync", took):
            newer = self.weight_loader.newer_than(self.version)
            if newer is None:
                return False
            if not self.load_weights(newer[1]):
                self.weight_loader.release()
            self.version, self.batches_on_version = newer[0], 0
        self.times["sync"] += took["sync"]
        self.sync_hist.observe(took["sync"])
        return True

    def run(self, max_batches: int | None = None) -> dict:
        """Sample until the store says stop (or `max_batches` in all); returns this sampler's counts."""
        cfg = self.config
        n = cfg.sampler.batch_size
        newest = 0  # the newest weights version the store has told us about
        while max_batches is None or self.batches < max_batches:
            with timer("idle", self.times):
                if newest > self.version or self.version < 0:
                    self.pull_weights()
                status, t, newest = ray.get(self.store.reserve.remote(self.actor_id, n, self.version, self.wait_s))
                if status == "wait" and self.version < 0:  # no weights published yet
                    time.sleep(0.01)
            if status == "stop":
                break
            if status == "wait":
                continue
            took: dict = {}
            with timer("busy", took):
                self.store.add.remote(self.sample(self.tasks[t], t, n))
            self.times["busy"] += took["busy"]
            self.batches += 1
            self.sample_hist.observe(took["busy"])
            self.samples_counter.inc(n)
            self.idle_gauge.set(self.times["idle"] / max(1e-9, self.times["idle"] + self.times["busy"]))
        return {"sampler": self.index, "batches": self.batches, "time_idle_s": self.times["idle"],
                "time_busy_s": self.times["busy"], "time_sync_s": self.times["sync"]}

    def sample(self, task: SamplerTask, t: int, n: int) -> SampledBatch:
        """One batch of task `t`: draw prompts and seeds, sample, put it in the object store, send the
        images to the task's reward pools."""
        g = task.images_per_prompt
        # keyed by the weights' version, not by how long this actor has run: a run resumed at a
        # checkpoint draws what the uninterrupted run drew there
        rng = np.random.default_rng([self.config.seed, self.incarnation, self.index, self.version,
                                     self.batches_on_version])
        self.batches_on_version += 1
        if task.source is None:
            drawn = (self.passes[t].draw() if t in self.passes else
                     draw_groups(rng, len(task.prompts), n, g, task.weights, task.group_sizes))
            sizes = np.full(len(drawn), g) if task.group_sizes is None else task.group_sizes[drawn]
            local_ids = np.repeat(drawn, sizes)
        else:
            sizes = np.full(n // g, g)
        stream = (self.start_iteration * 64 + self.incarnation % 64) * 4096 + self.index % 4096
        group_base = (stream << 24) + (self.batches * n) % (1 << 24)  # unique ids in a run
        group_ids = group_base + np.repeat(np.arange(len(sizes)), sizes)
        seeds = rng.integers(2**62, size=n)  # one per chain: any sample can be redrawn alone
        # a group shares its x_T (and a deterministic prefix) when the config says so
        start_seeds = (np.repeat(rng.integers(2**62, size=len(sizes)), sizes) if self.config.sampling.shared_prefix
                       else None)
        if task.source is not None:
            prompts = [text for text in self.shards[t].draw(n // g) for _ in range(g)]
            prompt_ids = np.array([prompt_id(text) for text in prompts], np.int64)
        else:
            prompts, prompt_ids = [task.prompts[i] for i in local_ids], task.first_prompt_id + local_ids
        scales = None if task.guidance_scales is None else task.guidance_scales[local_ids]
        traj = self.make_trajectory(prompts, prompt_ids, seeds, group_base + np.arange(n), start_seeds, scales)
        images = ray.put(traj.images)  # a top-level argument: each reward actor receives the array
        scores = {pool.name: pool.score(images, traj.prompts, group_ids, self.batches + self.index)
                  for pool in task.pools}
        order = self.shards.get(t) or self.passes.get(t)  # what resumes at a place: a shard or a pass
        position = order.position if order is not None else None
        return SampledBatch(self.actor_id, t, ray.put(traj), scores, self.version, prompt_ids, group_ids,
                            image_stats(traj.images), prompt_position=position)


@ray.remote
class SamplerActor(SamplerLoop):
    """A sampler holding the policy: text encoder, UNet, scheduler, VAE where there is one."""

    def __init__(self, index: int, config: Config, tasks: list[SamplerTask], store, weight_store,
                 start_iteration: int = 0, incarnation: int = 0, positions: Optional[dict] = None,
                 device: str = "cpu"):
        import torch

        from rlds.algo.objectives import objective_class
        from rlds.policy import load_policy
        from rlds.policy.pipeline import DTYPES

        torch.set_num_threads(actor_threads(config, config.sampler.num_cpus, "sampler"))
        super().__init__(index, config, tasks, store, weight_store, start_iteration, incarnation, positions)
        if device == "cpu" and ray.get_gpu_ids():
            device = "cuda"
        self.policy = load_policy(config.model, device)
        self.dtype = DTYPES[config.model.dtype]
        # only what the objective trains on goes into the object store
        self.keep_chain = objective_class(config.algo.objective).needs_chain

    def load_weights(self, flat: np.ndarray) -> bool:
        from rlds.policy import load_flat_trainable

        # On CPU the weights stay in shared memory (a slot or the object store): no copy per sampler.
        return load_flat_trainable(self.policy.unet, flat, share=True)

    def make_trajectory(self, prompts, prompt_ids, seeds, sample_ids, start_seeds=None, guidance_scales=None):
        from rlds.policy import sample_trajectories

        return sample_trajectories(self.policy, prompts, self.config.sampling, seeds=seeds,
                                   policy_version=self.version, prompt_ids=prompt_ids,
                                   sample_ids=sample_ids, dtype=self.dtype, keep_chain=self.keep_chain,
                                   start_seeds=start_seeds, guidance_scale=guidance_scales)
