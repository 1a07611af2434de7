"""ReplayStore: references to scored trajectories, bounded, with a staleness gate.

Samplers reserve room for a batch before they sample it. A reservation is granted only if the
store has room (backpressure) and the batch will be trained while the sampler's weights are at most
`max_staleness` versions old. With `max_staleness: 0` this is the paper's synchronous loop: the
samplers fill exactly one batch with the current weights, then wait for the next version.

A batch holds a fixed number of trajectories of each task that trains in its iteration (`task_sizes`,
`windows`; one task for most runs). A reservation is for one task: the one furthest behind its share
that still has room, which the store names in its answer, so samplers serve every task without being
assigned one.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable, Optional

import numpy as np
import ray

from rlds.distributed.protocol import SampledBatch, ScoredBatch, TrainingBatch


# Every way a sample can leave without being trained; each is counted (and reported, even at 0).
DROP_REASONS = ("stale", "reward_failed", "reward_timeout", "nan_reward", "sampler_died", "lost_in_flight",
                "learner_failed")


@ray.remote(num_cpus=0)
class ReplayStore:
    def __init__(self, task_sizes: list[int], capacity: int, max_staleness: int, reward_timeout_s: float,
                 windows: Optional[list[tuple[int, int]]] = None):
        from ray.util import metrics

        self.sizes = list(task_sizes)
        # each task's [start, end) iterations; its k-th sample is trained in iteration start + k // size
        self.windows = windows or [(0, 2**62)] * len(self.sizes)
        self.iteration = 0  # the batch handed out next
        self.last_batch_size = 0
        # each task's room is its share of the capacity
        self.capacities = [max(n, capacity * n // sum(self.sizes)) for n in self.sizes]
        self.max_staleness, self.reward_timeout_s = max_staleness, reward_timeout_s
        self.learner_version = 0
        # samples made before the newest learner recovery came from weights that no longer exist
        self.oldest_version = 0
        self.consumed = [0] * len(self.sizes)  # samples of each task handed to the learner so far
        self.reserved: Counter = Counter()  # (sampler, task) -> samples promised
        self.pending = [0] * len(self.sizes)  # samples waiting for their scores
        self.dead: set[str] = set()  # samplers whose objects are gone
        self.ready: list[ScoredBatch] = []
        self.drops: Counter = Counter()  # reason -> samples
        self.first_errors: dict[str, str] = {}  # reason -> what the first such drop said
        self.added = 0  # trajectories handed to this store (sampled)
        self.trained_before = 0  # trajectories a resumed run had trained before this store began
        self.failed = 0  # trajectories handed to a learner group that died with them
        self.scored_batches = 0  # sampler batches every reward scored
        self.refused_batches = 0  # sampler batches a reward's own code refused (raised), not a dead actor
        self.closed = False
        self.jobs: set[asyncio.Task] = set()  # score joins in progress
        self.changed = asyncio.Condition()
        self.depth_gauge = metrics.Gauge("rlds_replay_depth", "Samples reserved, scoring or ready")
        self.drop_counter = metrics.Counter("rlds_drops", "Samples dropped, by reason", tag_keys=("reason",))
        for reason in DROP_REASONS:  # every reason's series exists from the start, at 0: a board shows
            self.drop_counter._record(0, tags={"reason": reason})  # "none dropped", not "no data" (inc refuses 0)
        self.lag_hist = metrics.Histogram("rlds_policy_lag", "Learner version minus behaviour version",
                                          boundaries=[0.5, 1.5, 2.5, 4.5, 8.5])
        self.score_hist = metrics.Histogram("rlds_score_wait_s", "Seconds from add to scored",
                                            boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30])

    # ----------------------------------------------------------- samplers

    def in_flight(self, task: Optional[int] = None) -> int:
        tasks = range(len(self.sizes)) if task is None else [task]
        return sum(sum(v for (_, t), v in self.reserved.items() if t == k) + self.pending[k]
                   + sum(len(e) for e in self.ready if e.task == k) for k in tasks)

    async def reserve(self, sampler: str, n: int, version: int, wait_s: float = 0.0) -> tuple[str, int, int]:
        """('ok' | 'wait' | 'stop', task, newest weights version), after waiting up to `wait_s` for room.

        'ok': sample n trajectories of `task` now; 'wait': full, or the batch would be too stale when
        trained. The version lets a sampler see newer weights without asking the WeightStore every
        batch. Waiting here, woken by the changes that matter, costs one call where polling costs hundreds.
        """
        deadline = time.monotonic() + wait_s
        async with self.changed:
            while True:
                status, task = self._try_reserve(sampler, n, version)
                left = deadline - time.monotonic()
                if status != "wait" or self.learner_version > version or left <= 0:
                    return status, task, self.learner_version
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except asyncio.TimeoutError:
                    pass

    def _try_reserve(self, sampler: str, n: int, version: int) -> tuple[str, int]:
        # A dead sampler's call can still be waiting here for room: granted after its release, the
        # reservation would hold that room for ever (a chaos run stalled on it, short of a batch).
        if self.closed or sampler in self.dead:
            return "stop", -1
        best, best_progress = -1, None
        for task, size in enumerate(self.sizes):
            in_flight = self.in_flight(task)
            if in_flight + n > self.capacities[task]:
                continue
            start, end = self.windows[task]
            trained_at = start + (self.consumed[task] + in_flight) // size  # the iteration that takes it
            if trained_at >= end or trained_at - version > self.max_staleness or version < self.oldest_version:
                continue
            progress = start + (self.consumed[task] + in_flight) / size
            if best_progress is None or progress < best_progress:
                best, best_progress = task, progress
        if best < 0:
            return "wait", -1
        self.reserved[sampler, best] += n
        self._gauge()
        return "ok", best

    async def add(self, batch: SampledBatch) -> None:
        n = len(batch)
        self.reserved[batch.sampler, batch.task] = max(0, self.reserved[batch.sampler, batch.task] - n)
        self.pending[batch.task] += n
        self.added += n
        job = asyncio.create_task(self._await_scores(batch))
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)

    async def _await_scores(self, batch: SampledBatch) -> None:
        reason, scored, refused = None, None, False
        try:
            names = list(batch.scores)
            values = await asyncio.wait_for(asyncio.gather(*(batch.scores[k] for k in names)),
                                            self.reward_timeout_s)
            scored = batch.scored({k: np.asarray(v, dtype=np.float32) for k, v in zip(names, values)})
            bad = [k for k, v in scored.scores.items() if not np.all(np.isfinite(v))]
            if bad:
                reason = "nan_reward"
                self.first_errors.setdefault(reason, f"reward {bad[0]!r} gave a non-finite score (NaN or inf)")
        except asyncio.TimeoutError:
            reason = "reward_timeout"
            self.first_errors.setdefault(reason, f"no scores in {self.reward_timeout_s} s (ray.actor_timeout_s)")
        except Exception as e:  # a reward actor raised or died: counted and reported, never silently lost
            reason = "reward_failed"
            refused = isinstance(e, ray.exceptions.RayTaskError)
            self.first_errors.setdefault(reason, str(e).strip().splitlines()[-1][:500] if str(e).strip() else repr(e))
        async with self.changed:
            self.pending[batch.task] -= len(batch)
            if reason is None and batch.sampler in self.dead:
                reason = "sampler_died"
            if reason is None:
                self.scored_batches += 1
                self.ready.append(scored)
                self.score_hist.observe(time.time() - batch.created)
            else:
                self._drop(reason, len(batch))
                self.refused_batches += refused
            self._gauge()
            self.changed.notify_all()

    async def release(self, sampler: str) -> int:
        """A sampler died: its reservations are freed (nothing was sampled for them yet) and its
        trajectories (it owned them) are dropped and counted; returns how many were dropped."""
        async with self.changed:
            self.changed.notify_all()
        self.dead.add(sampler)
        for task in range(len(self.sizes)):
            self.reserved.pop((sampler, task), None)
        lost = [e for e in self.ready if e.sampler == sampler]
        self.ready = [e for e in self.ready if e.sampler != sampler]
        n = sum(len(e) for e in lost)
        if n:
            self._drop("sampler_died", n)
        self._gauge()
        return n

    async def new_version(self, version: int) -> None:
        """Newer weights are published: samplers waiting for them may go at once."""
        async with self.changed:
            self.learner_version = max(self.learner_version, version)
            self.changed.notify_all()

    async def learners_restored(self, version: int) -> None:
        """The learners were rebuilt from a checkpoint and published it as `version`: whatever was
        sampled with older weights is stale, by the staleness rule, and is dropped and counted."""
        async with self.changed:
            self.oldest_version = max(self.oldest_version, version)
            self.learner_version = max(self.learner_version, version)
            self._drop_stale()
            self._gauge()
            self.changed.notify_all()

    def batch_failed(self) -> None:
        """The batch last handed out died with the learner group: counted, not trained, not refilled
        (the iteration is spent)."""
        self.failed += self.last_batch_size
        self._drop("learner_failed", self.last_batch_size)

    async def batch_lost(self) -> None:
        """A handed-out batch could not be trained (its sampler died): count it, and refill it."""
        self.iteration -= 1
        for task, size in enumerate(self.sizes_at(self.iteration)):
            self.consumed[task] -= size
        self._drop("lost_in_flight", self.last_batch_size)
        async with self.changed:
            self.changed.notify_all()

    # ----------------------------------------------------------- learner

    async def get_batch(self, learner_version: int, timeout_s: float) -> Optional[TrainingBatch]:
        """A full batch no staler than max_staleness, or None after timeout_s (nothing consumed).

        `learner_version` is also the newest published weights version: the learner publishes
        version v before the driver asks for batch v.
        """
        self.learner_version = learner_version
        deadline = time.monotonic() + timeout_s
        async with self.changed:
            sizes = self.sizes_at(self.iteration)
            while True:
                self._drop_stale()
                if all(sum(len(e) for e in self.ready if e.task == task) >= size
                       for task, size in enumerate(sizes)):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except asyncio.TimeoutError:
                    return None
            self.ready.sort(key=lambda e: (e.task, e.version, e.created))  # task by task, oldest first
            batch = []
            for task, size in enumerate(sizes):
                taken = 0
                while taken < size:
                    entry = next(e for e in self.ready if e.task == task)
                    self.ready.remove(entry)
                    batch.append(entry)
                    taken += len(entry)
                self.consumed[task] += taken
            self.iteration += 1
            self.last_batch_size = sum(sizes)
            training = TrainingBatch(batch, learner_version)
            for lag in training.lags:
                self.lag_hist.observe(lag)
            self._gauge()
            self.changed.notify_all()  # room, and a newer version, for waiting samplers
            return training

    def _drop_stale(self) -> None:
        keep = []
        for e in self.ready:
            if self.learner_version - e.version > self.max_staleness or e.version < self.oldest_version:
                self._drop("stale", len(e))
            else:
                keep.append(e)
        self.ready = keep

    def _drop(self, reason: str, n: int) -> None:
        self.drops[reason] += n
        self.drop_counter.inc(n, tags={"reason": reason})

    def _gauge(self) -> None:
        self.depth_gauge.set(self.in_flight())

    # ----------------------------------------------------------- control

    def stats(self) -> dict:
        """Counts of trajectories; one call sees them at one instant, so they balance (`books`)."""
        return {"added": self.added, "consumed": sum(self.consumed), "depth": self.in_flight(),
                "trained": sum(self.consumed) - self.trained_before - self.failed,
                "scoring": sum(self.pending), "ready": sum(len(e) for e in self.ready),
                "drops": {reason: self.drops[reason] for reason in DROP_REASONS}, "errors": dict(self.first_errors),
                "scored_batches": self.scored_batches, "refused_batches": self.refused_batches}

    async def close(self) -> None:
        self.closed = True
        async with self.changed:
            self.changed.notify_all()

    def sizes_at(self, iteration: int) -> list[int]:
        """Each task's trajectories in the batch of `iteration` (0 outside its window)."""
        return [size if start <= iteration < end else 0 for size, (start, end) in zip(self.sizes, self.windows)]

    def restart_from(self, iteration: int) -> None:
        """Continue the version/position count of a resumed run."""
        self.learner_version = self.iteration = iteration
        self.consumed = [size * min(max(iteration - start, 0), end - start)
                         for size, (start, end) in zip(self.sizes, self.windows)]
        self.trained_before = sum(self.consumed)


def books(stats: dict) -> dict:
    """Every trajectory the samplers handed the store, accounted for: trained, dropped (by reason)
    or still in flight (being scored, or scored and not yet trained) when the counts were taken.

        sampled == trained + sum(dropped) + in_flight
    """
    dropped = dict(stats["drops"])
    in_flight = stats["scoring"] + stats["ready"]
    unaccounted = stats["added"] - stats["trained"] - sum(dropped.values()) - in_flight
    return {"sampled": stats["added"], "trained": stats["trained"], "dropped": dropped, "in_flight": in_flight,
            "unaccounted": unaccounted, "balanced": unaccounted == 0, "errors": stats.get("errors", {})}


# A reward whose own code refused this many batches, and scored none, refuses its input, not a draw:
# the run stops and says why instead of dropping every batch until ray.actor_timeout_s.
REFUSED_BATCHES_TO_STOP = 3


def check_rewards_score(stats: dict) -> None:
    if stats["scored_batches"] == 0 and stats["refused_batches"] >= REFUSED_BATCHES_TO_STOP:
        raise RuntimeError(f"the rewards refused every sampled batch so far ({stats['refused_batches']} batches, "
                           f"none scored; counted in drops/reward_failed): {stats['errors'].get('reward_failed')}")


def next_batch(store, iteration: int, timeout_s: float,
               on_wait: Optional[Callable[[], None]] = None) -> TrainingBatch:
    """The next full batch from `store`, asking with a short server-side wait so that nothing is
    consumed by an abandoned call; `on_wait` runs between asks (the trainer checks its samplers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ref = store.get_batch.remote(iteration, 1.0)
        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"the ReplayStore did not answer in {timeout_s} s (ray.actor_timeout_s)")
        batch = ray.get(ref)
        if batch is not None:
            return batch
        if on_wait is not None:
            on_wait()
        check_rewards_score(ray.get(store.stats.remote(), timeout=timeout_s))
        if time.monotonic() > deadline:
            stats = ray.get(store.stats.remote(), timeout=10)
            raise TimeoutError(f"no full batch for iteration {iteration} in {timeout_s} s "
                               f"(ray.actor_timeout_s); store: {stats}")
