"""The driver: places the actors, runs the loop, records the run. It moves references, not tensors.

    samplers ──trajectories──▶ ReplayStore ◀──scores── reward pools
    ReplayStore ──a full, fresh batch──▶ LearnerGroup ──weights v+1──▶ WeightStore ──▶ samplers
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlds.algo.advantages import PerPromptStatTracker, compute_advantages
from rlds.checkpoint import complete_checkpoints, latest_checkpoint, read_checkpoint, save_checkpoint
from rlds.config import Config, ConfigError, actor_threads, dump_config, task_list, validation_keys
from rlds.data.prompts import (prompt_group_sizes, prompt_guidance_scales, prompt_list, prompt_passes, prompt_sets,
                               prompt_source, prompt_weights, validation_prompt_sets)
from rlds.distributed.learner import LearnerGroup
from rlds.distributed.protocol import TrainingBatch, UpdateResult, ValidationResult
from rlds.distributed.replay import ReplayStore, books, next_batch
from rlds.distributed.reward import RewardPool
from rlds.distributed.sampler import SamplerActor, SamplerTask
from rlds.distributed.validation import (
    EarlyStopping,
    ValidationTask,
    Validator,
    mixed_validation_set,
)
from rlds.distributed.weights import WeightStore
from rlds.metrics import MetricsWriter, read_metrics, save_grid
from rlds.stats import FirstDrawBaseline, group_diagnostics, timer

log = logging.getLogger("rlds")
MAX_SAMPLER_RESTARTS = 3
# how long a sampler that cannot be reached waits for the cluster to say whether its node is gone
# (GCS's health checks take about 30 s to call a node dead) before it counts as failed
NODE_DEATH_GRACE_S = 90.0
# how a learner group fails: a rank died (RayActorError), raised (RayTaskError: a collective whose
# peer is gone, say) or hung past ray.actor_timeout_s (TimeoutError)
LEARNER_FAILURES = (ray.exceptions.RayError, TimeoutError)


def connect_ray(config: Config) -> bool:
    """Join the cluster `ray.address` names (null: RAY_ADDRESS's, as under `ray job submit`), else
    start a private one. Never Ray's discovery of whatever instance runs on the machine (`auto`)
    unless asked: on a shared machine or beside a test session that joins someone else's cluster.

    Returns whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus)
    else:
        ray.init(address=address)
    return True


def make_run_dir(config: Config) -> Path:
    if config.run_dir:
        path = Path(config.run_dir)
    elif config.resume:
        path = Path(config.resume).resolve().parent.parent  # continue the run the checkpoint is from
    else:
        path = Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    metrics = path / "metrics.jsonl"
    if not config.resume and metrics.is_file() and metrics.stat().st_size:
        # Appending a new run's rows to an old run's would mix two runs' curves in one folder.
        raise ConfigError(f"run_dir: {path} already holds a run's metrics ({metrics}); continue it with "
                          f"resume=auto, or give a new run_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Trainer:
    def __init__(self, config: Config, progress: bool = True):
        self.config = config
        self.progress = progress
        self.tasks = task_list(config)
        self.sources = [prompt_source(t) for t in self.tasks]  # streamed by the samplers, shard by shard
        for task, source in zip(self.tasks, self.sources):
            if source is not None:
                prompt_list(task, limit=1)  # a source without training prompts fails here, naming it
        self.prompts = [[] if src else prompt_list(t) for t, src in zip(self.tasks, self.sources)]
        self.prompt_sets = [None if sets is None else np.array(sets) for sets in map(prompt_sets, self.tasks)]
        self.restarts = {"sampler": 0, "validator": 0, "learner": 0}
        self.samplers_left = 0  # samplers that went with their node: not failures
        self.last_checkpoint: Optional[Path] = None  # what a rebuilt learner group starts from
        self.reported_errors: set[str] = set()  # drop reasons already logged
        self.incarnations: dict[int, int] = {}
        # (sampler, task) -> (epoch, drawn) in the sampler's shard, or (0, batches) of its prompt passes,
        # as of the newest batch trained
        self.prompt_positions: dict[tuple[int, int], tuple[int, int]] = {}

    # ------------------------------------------------------------------ setup

    def _start(self, run_dir: Path, start_iteration: int, state: Optional[tuple]) -> None:
        c = self.config
        capacity = c.replay.capacity or (c.replay.max_staleness + 1) * c.algo.batch_size
        # The run's state lives beside the driver, on the node that outlives the others (the head,
        # under `ray job submit`), never on a worker node that may vanish. They need no CPU, so a
        # head that takes no work (num_cpus: 0) still holds them; soft affinity was seen to spill
        # them onto a worker node while the head was starting other workers.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.weights = WeightStore.options(scheduling_strategy=here).remote()
        self.store = ReplayStore.options(scheduling_strategy=here).remote(
            [t.batch_size for t in self.tasks], capacity, c.replay.max_staleness, c.ray.actor_timeout_s,
            [t.window(c.iterations) for t in self.tasks])
        self.pools = [[RewardPool(r, actor_threads(c, r.num_cpus)) for r in t.rewards] for t in self.tasks]
        first_ids = self.first_prompt_ids = np.cumsum([0] + [len(p) for p in self.prompts])
        self.sampler_tasks = [SamplerTask(t.name, p, t.images_per_prompt, pools, int(first), src, prompt_weights(t),
                                          prompt_guidance_scales(t, c.sampling.guidance_scale), prompt_group_sizes(t),
                                          prompt_passes(t))
                              for t, p, pools, first, src in zip(self.tasks, self.prompts, self.pools, first_ids,
                                                                 self.sources)]
        self.learners = LearnerGroup(c, self.weights, start_iteration)
        if state is not None:
            self.learners.load_state(state[0], state[1])
        ray.get(self.store.restart_from.remote(start_iteration))
        self.learners.publish(start_iteration)
        self.start_iteration = start_iteration
        # one slot per sampler the range allows; a slot past sampler.num_workers' min is filled while
        # the cluster has room (`_scale_samplers`), and emptied when its node leaves
        self.samplers: list = [None] * c.sampler.max_workers
        self.sampler_ids: dict[str, int] = {}  # actor id -> sampler index, for prompt positions
        self.loops: list = [None] * c.sampler.max_workers
        self.sampler_nodes: list = [None] * c.sampler.max_workers  # -> the node id each one runs on
        self.unreachable: dict[int, float] = {}  # sampler -> since when it cannot be reached
        for i in range(c.sampler.min_workers):
            self._start_sampler(i)
        self.validating = None
        self.validator = self._start_validator() if c.validation.every else None
        self._check_rewards_started()
        if c.sampler.max_workers > c.sampler.min_workers:
            self._request_room()

    def _check_rewards_started(self) -> None:
        """Every reward actor is up (its environment built, its model loaded), or the run fails now
        with what went wrong, rather than dropping every batch as reward_failed until a timeout."""
        timeout = self.config.ray.actor_timeout_s
        for t, pools in zip(self.tasks, self.pools):
            for r, pool in zip(t.rewards, pools):
                try:
                    ray.get([a.__ray_ready__.remote() for a in pool.actors], timeout=timeout)
                except (ray.exceptions.RayError, TimeoutError) as e:
                    env = (f"py_executable {r.py_executable}" if r.py_executable else
                           f"pip {list(r.pip)}" if r.pip else "its shipped environment")
                    raise RuntimeError(f"reward {r.name!r} of task {t.name!r}: its actors did not start "
                                       f"({_last_line(e)}); check its args and {env}") from e

    def _start_validator(self):
        c, v = self.config, self.config.validation
        tasks = [ValidationTask(t.name, mixed_validation_set(validation_prompt_sets(t), v.images_per_task,
                                                             t.images_per_prompt),
                                t.images_per_prompt, pools, {r.name: r.weight for r in t.rewards})
                 for t, pools in zip(self.tasks, self.pools)]
        return Validator.options(num_cpus=v.num_cpus, num_gpus=v.num_gpus).remote(c, tasks)

    def _start_sampler(self, index: int) -> None:
        c = self.config
        incarnation = self.incarnations[index] = self.incarnations.get(index, -1) + 1
        positions = {t: pos for (i, t), pos in self.prompt_positions.items() if i == index}
        actor = SamplerActor.options(num_cpus=c.sampler.num_cpus, num_gpus=c.sampler.num_gpus).remote(
            index, c, self.sampler_tasks, self.store, self.weights, self.start_iteration, incarnation, positions)
        self.samplers[index] = actor
        self.sampler_ids[actor._actor_id.hex()] = index
        self.sampler_nodes[index] = actor.node.remote()
        self.loops[index] = actor.run.remote()

    def _check_samplers(self) -> None:
        """Restart a sampler whose loop ended while the run goes on (it died, or raised); one that
        left with its node is not a failure: its slot is refilled when there is room again."""
        running = [r for r in self.loops if r is not None]
        done, _ = ray.wait(running, num_returns=len(running), timeout=0)
        alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if done else set()
        for ref in done:
            i = self.loops.index(ref)
            try:
                ray.get(ref)
                reason = "its loop returned early"
            except ray.exceptions.ActorUnavailableError as e:
                # the connection to it broke: its node may be going, and the cluster not know it yet
                node, since = self._sampler_node(i), self.unreachable.setdefault(i, time.monotonic())
                if node in alive_nodes and time.monotonic() - since < NODE_DEATH_GRACE_S:
                    continue
                reason = _last_line(e)
            except Exception as e:  # noqa: BLE001 (any failure of the actor is handled the same way)
                reason = _last_line(e)
            self.unreachable.pop(i, None)
            ray.get(self.store.release.remote(self.samplers[i]._actor_id.hex()))
            ray.kill(self.samplers[i])
            node = self._sampler_node(i)
            if node is not None and node not in alive_nodes:
                self.samplers_left += 1
                log.warning("sampler %d left with its node %s; its work in flight is dropped and counted", i,
                            node[:12])
                self.samplers[i] = self.loops[i] = self.sampler_nodes[i] = None
                if i < self.config.sampler.min_workers:
                    self._start_sampler(i)  # one of the run's minimum: it waits for room wherever there is
                continue
            self.restarts["sampler"] += 1
            if self.restarts["sampler"] > MAX_SAMPLER_RESTARTS * len(self.loops):
                raise RuntimeError(f"sampler {i} failed again ({reason}); giving up after "
                                   f"{self.restarts['sampler'] - 1} restarts")
            log.warning("sampler %d stopped (%s); restarting it", i, reason)
            self._start_sampler(i)

    def _sampler_node(self, index: int) -> Optional[str]:
        """The node sampler `index` ran on, if it ever started."""
        ref = self.sampler_nodes[index]
        try:
            return ray.get(ref, timeout=0) if ray.wait([ref], timeout=0)[0] else None
        except ray.exceptions.RayError:
            return None

    def _samplers_running(self) -> int:
        """Samplers that have started (a slot's actor may still wait for room)."""
        refs = [r for r in self.sampler_nodes if r is not None]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0

    def _scale_samplers(self) -> None:
        """Fill empty sampler slots (a range's past its min) while the cluster has room for one more
        sampler: nodes an autoscaler added, or resources other work gave back."""
        s = self.config.sampler
        empty = [i for i, a in enumerate(self.samplers) if a is None]
        if not empty:
            return
        need = {"CPU": s.num_cpus, "GPU": s.num_gpus}
        free = ray.available_resources()
        for i in empty:
            if any(free.get(k, 0.0) + 1e-9 < v for k, v in need.items() if v > 0):
                return
            log.info("the cluster has room for sampler %d; starting it", i)
            self._start_sampler(i)
            for k, v in need.items():
                free[k] = free.get(k, 0.0) - v

    def _request_room(self) -> None:
        """Tell an autoscaler the run's shape at its most samplers, so that it adds the nodes they
        need (a cluster without one ignores this; rlds then uses what room there is)."""
        from ray.autoscaler.sdk import request_resources

        c, s = self.config, self.config.sampler
        bundles = [{"CPU": s.num_cpus, "GPU": s.num_gpus}] * s.max_workers
        bundles += [{"CPU": c.learner.num_cpus, "GPU": c.learner.num_gpus}] * c.learner.num_workers
        bundles += [{"CPU": r.num_cpus, "GPU": r.num_gpus} for t in self.tasks for r in t.rewards
                    for _ in range(r.num_actors)]
        request_resources(bundles=[b for b in ({k: v for k, v in b.items() if v > 0} for b in bundles) if b])

    # ------------------------------------------------------------------ loop

    def _rewards(self, batch: TrainingBatch) -> np.ndarray:
        """Each sampler batch's weighted sum of its task's rewards, concatenated: [len(batch)]."""
        return np.concatenate([sum(r.weight * part.scores[r.name] for r in self.tasks[part.task].rewards)
                               for part in batch.parts])

    def _update(self, batch: TrainingBatch, iteration: int) -> UpdateResult:
        """Advantages over the global batch, the learners' update, and the iteration's statistics
        (reward figures included); `lost` when the batch could not be trained."""
        c = self.config
        rewards = self._rewards(batch)
        task_ids = np.concatenate([np.full(len(p), p.task) for p in batch.parts])
        advantages = compute_advantages(rewards, [t.advantage for t in self.tasks], c.algo.advantage_clip,
                                        batch.prompt_ids, batch.group_ids, task_ids, self.tracker)
        calls = self.learners.update(batch, advantages, iteration)
        result = UpdateResult.reduce(self.learners.results(calls, c.ray.actor_timeout_s))
        if result.lost:
            return result
        for part in batch.parts:  # resuming continues each shard after what was trained
            if part.prompt_position is not None:
                key = (self.sampler_ids[part.sampler], part.task)
                self.prompt_positions[key] = max(self.prompt_positions.get(key, (0, 0)), tuple(part.prompt_position))
        stats = result.stats
        stats["reward/mean"] = float(np.mean(rewards))
        stats["reward/std"] = float(np.std(rewards))
        for t, task in enumerate(self.tasks):
            parts = [p for p in batch.parts if p.task == t]
            if not parts:  # outside the task's iterations
                continue
            prefix = "reward/" if len(self.tasks) == 1 else f"reward/{task.name}/"
            mine = task_ids == t
            prompt_ids, group_ids = batch.prompt_ids[mine], batch.group_ids[mine]
            if len(self.tasks) > 1:
                stats[f"{prefix}mean"] = float(np.mean(rewards[mine]))
            gains = self.first_draws.gains(f"task {task.name}", rewards[mine], prompt_ids, group_ids)
            if len(gains):
                stats[f"{prefix}gain"] = float(np.mean(gains))
            # what a run going wrong shows first: ties within groups, spread, washed-out or flat images
            stats[f"{prefix}std"] = float(np.std(rewards[mine]))
            if task.images_per_prompt > 1:
                for key, value in group_diagnostics(rewards[mine], group_ids).items():
                    stats[f"{prefix}{key}"] = value
            scores = {r.name: np.concatenate([p.scores[r.name] for p in parts]) for r in task.rewards}
            for r in task.rewards:
                stats[f"{prefix}{r.name}/mean"] = float(np.mean(scores[r.name]))
            # prompts.mix: each set's own figures too, not diluted by the others' (a reward that scores
            # one set is 0 on the rest; a set whose groups all tie, a colour-free prompt drawn in one
            # colour only, learns nothing)
            sets = self.prompt_sets[t]
            of = None if sets is None else sets[prompt_ids - self.first_prompt_ids[t]]
            reward_gains = {r.name: [] for r in task.rewards}
            for name in [None] if of is None else np.unique(of):
                rows = slice(None) if name is None else of == name
                for r in task.rewards:
                    # /gain: the reward's rise on prompts drawn before (stats.FirstDrawBaseline)
                    reward_gains[r.name].append(self.first_draws.gains(r.name, scores[r.name][rows],
                                                                       prompt_ids[rows], group_ids[rows]))
                    if name is not None:
                        stats[f"{prefix}{name}/{r.name}/mean"] = float(np.mean(scores[r.name][rows]))
                        if len(reward_gains[r.name][-1]):
                            stats[f"{prefix}{name}/{r.name}/gain"] = float(np.mean(reward_gains[r.name][-1]))
                if name is not None and task.images_per_prompt > 1:
                    for key, value in group_diagnostics(rewards[mine][rows], group_ids[rows]).items():
                        stats[f"{prefix}{name}/{key}"] = value
            for r in task.rewards:
                if sum(map(len, reward_gains[r.name])):
                    stats[f"{prefix}{r.name}/gain"] = float(np.mean(np.concatenate(reward_gains[r.name])))
            for key in parts[0].image_stats:
                stats[f"images/{task.name}/{key}" if len(self.tasks) > 1 else f"images/{key}"] = float(
                    np.mean(np.concatenate([p.image_stats[key] for p in parts])))
        stats["advantage/abs_mean"] = float(np.mean(np.abs(advantages)))
        return result

    def _save_grid(self, run_dir: Path, batch: TrainingBatch, iteration: int) -> None:
        """Up to 16 samples of this batch with their rewards, an equal share from each task."""
        share = max(1, 16 // len(self.tasks))
        rewards = self._rewards(batch)
        offsets = np.cumsum([0] + [len(p) for p in batch.parts])
        images, captions = [], []
        for t in sorted(set(batch.tasks)):
            i = batch.tasks.index(t)  # the task's first sampler batch
            try:
                traj = ray.get(batch.parts[i].trajectory)
            except ray.exceptions.ObjectLostError:  # its sampler died after the update: no grid this time
                log.warning("no sample grid for iteration %d: its sampler died", iteration)
                return
            images.append(traj.images[:share])
            captions += [f"{p} ({r:.3g})" for p, r in zip(traj.prompts[:share], rewards[offsets[i]:offsets[i] + share])]
        save_grid(np.concatenate(images), captions, run_dir / "samples" / f"iter_{iteration:06d}.png")

    def _checkpoint(self, run_dir: Path, iteration: int, samples: int) -> Path:
        trainable, optimizer = ray.get(self.learners.state(), timeout=self.config.ray.actor_timeout_s)
        positions = [[i, t, *pos] for (i, t), pos in sorted(self.prompt_positions.items())]
        state = {"iteration": iteration, "samples": samples, "tracker": self.tracker.state_dict(),
                 "first_draws": self.first_draws.state_dict(),
                 "prompt_positions": {"samplers": self.config.sampler.max_workers, "positions": positions}}
        self.last_checkpoint = save_checkpoint(run_dir / "checkpoints" / f"iter_{iteration:06d}", trainable,
                                               optimizer, state)
        if self.config.keep_checkpoints:
            for old in complete_checkpoints(run_dir)[:-self.config.keep_checkpoints]:
                if old != self.last_checkpoint:
                    shutil.rmtree(old)
        return self.last_checkpoint

    def _recover_learners(self, version: int, error: Exception) -> int:
        """Replace a failed learner group with a new one that starts from the last checkpoint (the
        run's start if there is none yet) and publishes it as `version`; the samplers sample on
        meanwhile, and what they made with the lost weights is dropped as stale. When rank 0 had
        published `version` before another rank failed, the new group takes those weights instead
        (a version is published once). Returns the iteration whose weights it holds. Gives up after
        `learner.max_restarts`."""
        c = self.config
        while True:
            self.restarts["learner"] += 1
            if self.restarts["learner"] > c.learner.max_restarts:
                raise RuntimeError(f"the learner group failed ({_last_line(error)}); giving up after "
                                   f"{c.learner.max_restarts} restarts (learner.max_restarts)") from error
            checkpoint = self.last_checkpoint
            log.warning("the learner group failed (%s); rebuilding it from %s", _last_line(error),
                        checkpoint or "the run's start")
            if self.learners is not None:
                self.learners.shutdown(timeout_s=0)  # a hung rank would never answer
                self.learners = None
            try:
                self.learners = LearnerGroup(c, self.weights, start_iteration=version)
                restored = self.start_iteration
                if checkpoint is not None:
                    trainable, optimizer, meta = read_checkpoint(checkpoint)
                    self.learners.load_state(trainable, optimizer)
                    restored = meta["iteration"]
                published = ray.get(self.weights.newer_than.remote(version - 1))
                if published is not None:  # rank 0 had published this update before a rank failed:
                    self.learners.load_published(published.version)  # its weights (optimizer: the checkpoint's)
                    restored = published.version
                else:
                    self.learners.publish(version)
            except (ray.exceptions.RayError, TimeoutError) as e:  # no room yet, or it failed again
                error = e
                continue
            ray.get(self.store.learners_restored.remote(version))
            return restored

    def _load_prompt_positions(self, saved: Optional[dict]) -> None:
        if not saved or not saved["positions"]:
            return
        if saved["samplers"] != self.config.sampler.max_workers:
            log.warning("resume: the checkpoint's prompt shards and passes were cut for %d samplers and this run "
                        "has %d; they start again from their beginning", saved["samplers"], self.config.sampler.max_workers)
            return
        self.prompt_positions = {(i, t): (epoch, drawn) for i, t, epoch, drawn in saved["positions"]}

    def run(self) -> Path:
        c = self.config
        run_dir = make_run_dir(c)
        dump_config(c, run_dir / "config.yaml")
        self.tracker = PerPromptStatTracker(c.algo.per_prompt_buffer, c.algo.per_prompt_min_count)
        self.first_draws = FirstDrawBaseline()
        start, samples, state = 0, 0, None
        resume = latest_checkpoint(run_dir) if c.resume == "auto" else c.resume
        if c.resume == "auto":
            log.info("resume=auto: %s", f"continuing from {resume}" if resume else f"no checkpoint in {run_dir} yet")
        if resume:
            trainable, optimizer, meta = read_checkpoint(resume)
            start, samples = meta["iteration"], meta["samples"]
            self.tracker.load_state_dict(meta.get("tracker", {}))
            self.first_draws.load_state_dict(meta.get("first_draws", {}))
            self.last_checkpoint = Path(resume)
            self._load_prompt_positions(meta.get("prompt_positions"))
            state = (trainable, optimizer)
        if c.resume:
            _truncate_metrics(run_dir / "metrics.jsonl", start)
        if start >= c.iterations and c.resume == "auto":  # a resubmitted job that had already finished
            log.info("resume=auto: %s is at iteration %d of %d; nothing left to train", resume, start, c.iterations)
            return run_dir
        if start >= c.iterations:
            raise ValueError(f"resume: the checkpoint is at iteration {start}, and iterations is "
                             f"{c.iterations}: nothing to train; raise iterations=N")
        started_ray = connect_ray(c)
        writer = MetricsWriter(run_dir)
        accounts = None
        try:
            self._start(run_dir, start, state)
            self._loop(run_dir, writer, start, samples)
        finally:
            if getattr(self, "validating", None) is not None:  # a row waiting for figures that never came
                writer.write(self.validating[0])
            writer.close()
            final = self._stop()
            if final is not None:
                accounts = {"since_iteration": start, **books(final)}
                (run_dir / "accounting.json").write_text(json.dumps(accounts, indent=2) + "\n")
            if started_ray:
                ray.shutdown()
        if accounts is not None and not accounts["balanced"]:
            raise RuntimeError(f"the books do not balance: {accounts['unaccounted']} trajectories sampled and "
                               f"neither trained, dropped nor in flight (see {run_dir / 'accounting.json'})")
        return run_dir

    def _loop(self, run_dir: Path, writer: MetricsWriter, start: int, samples: int) -> None:
        from tqdm import tqdm

        c = self.config
        from ray.util import metrics

        idle_gauge = metrics.Gauge("rlds_learner_idle_ratio", "Share of an iteration the learners wait for data")
        bar = tqdm(total=c.iterations, initial=start, desc="rlds train", unit="it", disable=not self.progress)
        v = c.validation
        stopper = EarlyStopping(v.stop_metric, v.stop_patience, v.stop_min_delta) if v.stop_metric else None
        val_key, shown_val = v.stop_metric or validation_keys(c)[0], ""
        last = time.perf_counter()
        for it in range(start, c.iterations):
            self._check_samplers()
            self._scale_samplers()
            times: dict = {}
            with timer("time/wait_batch_s", times):
                while True:  # a batch whose sampler died in between is dropped and replaced
                    batch = next_batch(self.store, it, c.ray.actor_timeout_s, self._check_samplers)
                    try:
                        result = self._update(batch, it)
                    except LEARNER_FAILURES as e:  # the batch dies with the group; the iteration is spent
                        ray.get(self.store.batch_failed.remote())
                        result = UpdateResult({"learner/restored_from": self._recover_learners(it + 1, e),
                                               "time/update_s": 0.0}, lost=True)
                        break
                    if not result.lost:
                        break
                    ray.get(self.store.batch_lost.remote())
                    self._check_samplers()
            self.store.new_version.remote(it + 1)  # samplers start on v+1 while we write metrics
            stats = result.stats
            wait_s = times["time/wait_batch_s"] - stats["time/update_s"]
            samples += 0 if result.lost else len(batch)
            now = time.perf_counter()
            store = ray.get(self.store.stats.remote())
            row = {"iteration": it + 1, "samples": samples, **stats,
                   "policy_lag/max": max(batch.lags), "policy_lag/mean": float(np.mean(batch.lags)),
                   "time/iteration_s": now - last, "time/wait_batch_s": wait_s,
                   "time/learner_idle_ratio": wait_s / (now - last),
                   "throughput/samples_per_s": len(batch) / (now - last),
                   "replay/depth": store["depth"], "samples_generated": store["added"],
                   "restarts/sampler": self.restarts["sampler"], "restarts/learner": self.restarts["learner"],
                   "samplers/running": self._samplers_running(), "samplers/left": self.samplers_left}
            row.update({f"drops/{k}": n for k, n in store["drops"].items()})
            for reason, message in store["errors"].items():  # said once, in the user's terminal
                if reason not in self.reported_errors:
                    self.reported_errors.add(reason)
                    log.warning("samples are being dropped (%s), counted in drops/%s; the first: %s", reason,
                                reason, message)
            if self.validator is not None:
                row["restarts/validator"] = self.restarts["validator"]
            last = now
            idle_gauge.set(row["time/learner_idle_ratio"])
            done, validation = self._validation(row, it + 1 == c.iterations)
            for ready in done:
                writer.write(ready)
            stop = validation is not None and stopper is not None and stopper.should_stop(validation)
            if c.sample_grid_every and (it + 1) % c.sample_grid_every == 0:
                self._save_grid(run_dir, batch, it + 1)
            if (it + 1) % c.checkpoint_every == 0 or it + 1 == c.iterations or stop:
                try:
                    self._checkpoint(run_dir, it + 1, samples)
                except LEARNER_FAILURES as e:
                    # Its weights are published as it + 1 already, so the group is rebuilt where a
                    # new version can be: the next update fails on the dead rank, and that
                    # iteration is spent on the rebuild (the batch counted as learner_failed).
                    log.warning("no checkpoint at iteration %d: the learner group failed (%s); the newest "
                                "is %s", it + 1, _last_line(e), self.last_checkpoint or "none")
            if not self.progress:  # logs (a Ray job's, say) get a line where a terminal gets a bar
                val = "".join(f"  {k} {x:.4g}" for k, x in validation.figures.items()
                              if k.count("/") <= 2) if validation is not None else ""
                log.info("iteration %d/%d  reward %.4g  %.1f samples/s  lag %d%s", it + 1, c.iterations,
                         row.get("reward/mean", float("nan")), row["throughput/samples_per_s"],
                         row["policy_lag/max"], val)
            if validation is not None:  # the bar keeps the newest validation score in view
                shown_val = f"{validation.figures[val_key]:.4g}"
            bar.set_postfix(reward=f"{row.get('reward/mean', float('nan')):.4g}",
                            **({"val": shown_val} if shown_val else {}),
                            samples_s=f"{row['throughput/samples_per_s']:.1f}", lag=row["policy_lag/max"])
            bar.update(1)
            if stop:
                log.warning("stopping early after iteration %d: %s (validation.stop_metric); the checkpoint "
                            "of this iteration is the result", it + 1, stopper.reason())
                break
        bar.close()

    def _validation(self, row: dict, last_iteration: bool) -> tuple[list[dict], Optional[ValidationResult]]:
        """The rows ready to write, and the validation that finished, if one did.

        A validation of the weights after iteration i starts when i is done and runs beside the next
        iteration; row i waits for its figures and is written with row i + 1 (after the last
        iteration, at once)."""
        ready, result = [], None
        if self.validating is not None:  # the previous iteration's
            held, ref = self.validating
            self.validating = None
            result = self._validation_result(ref, held)
            ready.append(held)
        every = self.config.validation.every
        if self.validator is not None and (row["iteration"] % every == 0 or last_iteration):
            ref = self.validator.validate.remote(self.weights)
            if not last_iteration:
                self.validating = (row, ref)
                return ready, result
            result = self._validation_result(ref, row)
        return ready + [row], result

    def _validation_result(self, ref, row: dict) -> Optional[ValidationResult]:
        """Wait for a validation and put its figures in `row`. One that fails or hangs is counted
        (`restarts/validator`) and its actor replaced; training goes on without those figures."""
        timeout = self.config.ray.actor_timeout_s
        try:
            done, _ = ray.wait([ref], timeout=timeout)
            if not done:
                raise TimeoutError(f"no answer in {timeout} s (ray.actor_timeout_s)")
            result = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 (a dead or failing validator is handled the same way)
            log.warning("the validation of iteration %d failed (%s); starting a new validator", row["iteration"],
                        _last_line(e))
            ray.kill(self.validator)
            self.restarts["validator"] += 1
            self.validator = self._start_validator()
            row["restarts/validator"] = self.restarts["validator"]
            return None
        row.update({**result.figures, "val/iteration": result.version, "time/validation_s": result.seconds})
        return result

    def _stop(self) -> Optional[dict]:
        """Stop every actor; returns the store's final counts (None if it never started or cannot answer)."""
        if not hasattr(self, "store"):
            return None
        ray.wait([self.store.close.remote()], timeout=10)
        loops = [r for r in getattr(self, "loops", []) if r is not None]
        ray.wait(loops, num_returns=len(loops), timeout=30)
        try:  # taken once no sampler adds more: what is left is being scored or waits in the store
            final = ray.get(self.store.stats.remote(), timeout=10)
        except Exception:  # noqa: BLE001 (a dead or hung store: the run reports what it has)
            final = None
        for actor in getattr(self, "samplers", []):
            if actor is not None:
                ray.kill(actor)
        if self.config.sampler.max_workers > self.config.sampler.min_workers:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])  # the request outlives the run: an autoscaler would keep the nodes
        for pool in (p for pools in self.pools for p in pools):
            for actor in pool.actors:
                ray.kill(actor)
        if getattr(self, "validator", None) is not None:
            ray.kill(self.validator)
        if getattr(self, "learners", None) is not None:
            self.learners.shutdown()
        ray.kill(self.store)
        ray.wait([self.weights.close.remote()], timeout=10)  # its slots in /dev/shm
        ray.kill(self.weights)
        return final


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Rows written after the checkpoint we resume from belong to a run we are about to redo."""
    if path.is_file():
        rows = [r for r in read_metrics(path) if r["iteration"] <= iteration]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _last_line(error: BaseException) -> str:
    """The line that says what went wrong in a Ray task error (its last), with the error type."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(error).__name__
