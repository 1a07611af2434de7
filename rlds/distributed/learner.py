"""LearnerGroup: N learner actors in one torch.distributed group, DDP over the trainable weights.

The driver computes advantages once over the global batch; each rank gets an equal share of each
task's sampler batches, runs the K-step update of each task in turn (then the L_pre step), and rank 0
publishes the new weights with a version. The WeightStore owns the published weights, so they
outlive the rank that put them: when a rank dies or hangs, the trainer kills the whole group and
builds a new one from the last checkpoint (`learner.max_restarts`) while the samplers go on with
the weights they have.
"""
from __future__ import annotations

import socket
import time
import warnings
from dataclasses import replace
from datetime import timedelta

import numpy as np
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlds.config import Config, actor_threads, task_list
from rlds.distributed.protocol import LearnerShard, TrainingBatch, UpdateResult
from rlds.stats import reduce_metrics, timer


@ray.remote
class LearnerActor:
    def __init__(self, rank: int, world_size: int, config: Config, weight_store, start_iteration: int = 0):
        import torch
        from ray.util import metrics

        torch.set_num_threads(actor_threads(config, config.learner.num_cpus, "learner"))
        self.rank, self.world_size, self.config = rank, world_size, config
        self.start_iteration = start_iteration  # where the L_pre stream continues (resumed or rebuilt)
        self.weight_store, self.publisher = weight_store, None
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.update_hist = metrics.Histogram("rlds_learner_update_s", "Seconds per policy update",
                                             boundaries=[0.1, 0.3, 1, 3, 10, 30, 100])
        self.publish_hist = metrics.Histogram("rlds_weight_publish_s", "Seconds to publish weights",
                                              boundaries=[0.001, 0.01, 0.1, 1, 10])

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master: tuple[str, int], backend: str | None) -> int:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from rlds.algo.objectives import objective_class
        from rlds.algo.ppo import make_optimizer
        from rlds.policy import load_policy
        from rlds.policy.pipeline import DTYPES

        backend = backend or ("nccl" if self.device == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}",
                                rank=self.rank, world_size=self.world_size, timeout=timedelta(minutes=10))
        self.policy = load_policy(self.config.model, self.device)
        self.dtype = DTYPES[self.config.model.dtype]
        self.policy.scheduler.set_timesteps(self.config.sampling.num_steps)
        # DDP broadcasts rank 0's weights at construction, so every rank starts identical.
        self.ddp = DistributedDataParallel(self.policy.unet)
        # The 1x1 convolutions' gradients come channels-last; DDP copies them into its buckets (correct,
        # and cheap at this size) and would say so on every rank's first backward, in the user's terminal.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.params = [p for p in self.policy.unet.parameters() if p.requires_grad]
        self.tasks = task_list(self.config)
        self.task_names = [t.name for t in self.tasks]
        moments = len(self.task_names) if self.config.algo.task_moments == "per_task" else 1
        self.optimizers = [make_optimizer(self.params, self.config.algo) for _ in range(moments)]
        self.objective = objective_class(self.config.algo.objective)(self.policy.unet, self.config.algo)
        algo = self.config.algo
        self.pretrain_batches = None
        if algo.pretrain_beta > 0:
            from rlds.data.pretrain_set import PretrainSet, regulariser_path

            factor = 2 ** (len(self.policy.vae.config.block_out_channels) - 1) if self.policy.vae else 1
            data = PretrainSet(regulariser_path(algo.pretrain_data),
                               resolution=self.policy.unet.config.sample_size * factor)
            self.pretrain_batches = data.stream(algo.pretrain_batch_size, seed=self.config.seed * 1000 + self.rank,
                                                start=self.start_iteration)
        self.anchor = None
        if algo.guidance_anchor_beta > 0:  # the reference is the weights loaded here: the base's
            from rlds.algo.matching import snapshot
            from rlds.algo.regularizers import GuidanceAnchor

            self.anchor = GuidanceAnchor(snapshot(self.policy.unet), algo.guidance_anchor_beta,
                                         algo.guidance_anchor_fraction)
        return sum(p.numel() for p in self.params)

    def load_state(self, trainable: bytes, optimizer: bytes) -> None:
        from rlds.checkpoint import load_optimizer_bytes, load_trainable_bytes

        load_trainable_bytes(self.policy.unet, trainable)
        load_optimizer_bytes(self.optimizers, optimizer)

    def load_published(self, version: int) -> None:
        """The store's weights of `version` (a copy: this rank trains them in place)."""
        from rlds.distributed.weights import WeightLoader
        from rlds.policy import load_flat_trainable

        loader = WeightLoader(self.weight_store)
        published = loader.newer_than(version - 1)
        if published is None or published[0] != version:
            raise RuntimeError(f"the WeightStore no longer holds weights version {version}")
        load_flat_trainable(self.policy.unet, published[1], share=False)
        loader.release()

    def state(self) -> tuple[bytes, bytes]:
        from rlds.checkpoint import optimizer_bytes, trainable_bytes

        return trainable_bytes(self.policy.unet), optimizer_bytes(self.optimizers)

    def publish(self, version: int) -> float:
        from rlds.distributed.weights import WeightPublisher

        took: dict = {}
        with timer("publish", took):
            if self.publisher is None:
                self.publisher = WeightPublisher(self.weight_store)
            self.publisher.publish(version, self.policy.unet)
        self.publish_hist.observe(took["publish"])
        return took["publish"]

    def update(self, shard: LearnerShard) -> UpdateResult:
        import torch
        import torch.distributed as dist

        from rlds.algo.schedules import lr_factor

        times: dict = {}
        with timer("time/update_s", times):
            with timer("time/fetch_s", times):
                trajectories = shard.fetch()
            # Every rank must skip together, or the others would wait in all-reduce for ever.
            lost = torch.tensor([trajectories is None], dtype=torch.int64, device=self.device)  # NCCL: a GPU tensor
            dist.all_reduce(lost)
            if lost.item():
                return UpdateResult(lost=True)
            cfg, iteration = self.config.algo, shard.iteration

            def task_lr(task: int) -> float:  # the schedule runs over the task's own iterations
                start, end = self.tasks[task].window(self.config.iterations)
                return (cfg.learning_rate * self.tasks[task].lr_scale
                        * lr_factor(cfg.lr_schedule, iteration - start, end - start, cfg.warmup_iterations))

            rng = np.random.default_rng([self.config.seed, iteration, self.rank])
            train_policy = replace(self.policy, unet=self.ddp)
            per_task, own = [], {}
            for task in sorted(set(shard.tasks)):  # the paper's joint training: each task's steps in turn
                mine = [i for i, t in enumerate(shard.tasks) if t == task]
                optimizer = self.optimizers[task % len(self.optimizers)]
                for param_group in optimizer.param_groups:
                    param_group["lr"] = task_lr(task)
                groups = None if shard.groups is None else [shard.groups[i] for i in mine]
                per_task.append(self.objective.update(train_policy, [trajectories[i] for i in mine],
                                                      [shard.advantages[i] for i in mine], optimizer, rng,
                                                      no_sync=self.ddp.no_sync, dtype=self.dtype, groups=groups))
                if len(self.task_names) > 1:  # which task moves the weights most
                    own.update({f"{key}/{self.task_names[task]}": per_task[-1][key] for key in ("loss", "grad_norm")})
                    own[f"lr/{self.task_names[task]}"] = task_lr(task)
            stats = {**reduce_metrics(per_task), **own}
            # L_pre steps with the first task's moments (AlgoConfig), at the iteration's first task's
            # schedule without its lr_scale
            first = min(shard.tasks)
            lr = task_lr(first) / self.tasks[first].lr_scale
            optimizer = self.optimizers[0]
            for group in optimizer.param_groups:
                group["lr"] = lr
            if self.pretrain_batches is not None:  # L_pre, its own step after the RL steps
                from rlds.algo.regularizers import pretrain_step

                images, captions = next(self.pretrain_batches)
                generator = torch.Generator(self.device).manual_seed(int(rng.integers(2**62)))  # noise, timesteps
                stats.update(pretrain_step(train_policy, optimizer, images, captions, cfg.pretrain_beta,
                                           cfg.max_grad_norm, generator, tuple(cfg.pretrain_noise_range),
                                           cfg.pretrain_caption_dropout, self.anchor))
            stats.update(self.objective.end_iteration(self.policy.unet))
            stats["lr"] = lr
            if self.rank == 0:
                stats["time/publish_s"] = self.publish(iteration + 1)
        stats.update(times)
        self.update_hist.observe(times["time/update_s"])
        return UpdateResult(stats)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """The driver's handle on the learner ranks; placement keeps them together."""

    def __init__(self, config: Config, weight_store, start_iteration: int = 0):
        lc = config.learner
        self.size = lc.num_workers
        bundle = {"CPU": lc.num_cpus}
        if lc.num_gpus:
            bundle["GPU"] = lc.num_gpus
        self.pg = placement_group([dict(bundle) for _ in range(self.size)], strategy="PACK")
        ray.get(self.pg.ready(), timeout=config.ray.actor_timeout_s)
        self.actors = [
            LearnerActor.options(
                num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
            ).remote(rank, self.size, config, weight_store, start_iteration)
            for rank in range(self.size)]
        timeout = config.ray.actor_timeout_s
        master = ray.get(self.actors[0].address.remote(), timeout=timeout)
        counts = ray.get([a.setup.remote(master, lc.backend) for a in self.actors], timeout=timeout)
        self.num_trainable = counts[0]

    def update(self, batch: TrainingBatch, advantages: np.ndarray, iteration: int) -> list[ray.ObjectRef]:
        """Split each task's sampler batches evenly over the ranks; returns the calls (-> UpdateResult).

        `advantages` is per trajectory, in the batch's order."""
        offsets = np.cumsum([0] + [len(p) for p in batch.parts])
        shares: list[list[int]] = [[] for _ in self.actors]
        for task in sorted(set(batch.tasks)):
            mine = [i for i, t in enumerate(batch.tasks) if t == task]
            per_rank = len(mine) // self.size
            for rank in range(self.size):
                shares[rank] += mine[rank * per_rank:(rank + 1) * per_rank]
        return [actor.update.remote(LearnerShard([batch.parts[i].trajectory for i in share],
                                                 [advantages[offsets[i]:offsets[i + 1]] for i in share],
                                                 [batch.parts[i].task for i in share], iteration,
                                                 [batch.parts[i].group_ids for i in share]))
                for actor, share in zip(self.actors, shares)]

    @staticmethod
    def results(calls: list[ray.ObjectRef], timeout_s: float) -> list[UpdateResult]:
        """Every rank's answer; the first rank that fails (it died, or raised) fails the call at once,
        not after the others time out waiting for it in a collective."""
        pending, deadline = list(calls), time.monotonic() + timeout_s
        while pending:
            done, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise TimeoutError(f"{len(pending)} of {len(calls)} learner ranks did not answer in {timeout_s} s "
                                   "(ray.actor_timeout_s)")
            ray.get(done)
        return ray.get(calls)

    def publish(self, version: int) -> None:
        ray.get(self.actors[0].publish.remote(version))

    def state(self):
        return self.actors[0].state.remote()

    def load_state(self, trainable: bytes, optimizer: bytes) -> None:
        ray.get([a.load_state.remote(trainable, optimizer) for a in self.actors])

    def load_published(self, version: int) -> None:
        ray.get([a.load_published.remote(version) for a in self.actors])

    def shutdown(self, timeout_s: float = 30) -> None:
        """Leave the process group where a rank can (a hung or dead one cannot), then kill every rank."""
        if timeout_s > 0:
            ray.wait([a.shutdown.remote() for a in self.actors], num_returns=self.size, timeout=timeout_s)
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)

