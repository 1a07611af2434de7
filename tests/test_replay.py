"""The ReplayStore on a real local Ray: backpressure, the staleness gate, failures counted."""
import time

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


def add(ray, store, sampler, version, scores, n=2, task=0):
    from rlds.distributed.protocol import SampledBatch

    batch = SampledBatch(sampler, task, ray.put(np.zeros(n)), scores, version, np.zeros(n, np.int64), np.arange(n))
    ray.get(store.add.remote(batch))


def test_backpressure_staleness_and_batches(ray_local):
    ray = ray_local
    from rlds.distributed.replay import ReplayStore

    store = ReplayStore.remote(task_sizes=[4], capacity=4, max_staleness=0, reward_timeout_s=30)
    assert ray.get(store.reserve.remote("s", 2, 0))[0] == "ok"
    assert ray.get(store.reserve.remote("s", 2, 0))[0] == "ok"
    assert ray.get(store.reserve.remote("s", 2, 0))[0] == "wait"  # full
    for _ in range(2):
        add(ray, store, "s", 0, {"r": ray.put(np.ones(2, np.float32))})
    assert ray.get(store.get_batch.remote(0, 5.0)) is not None
    # the next batch needs version 1 in sync mode: version-0 samplers wait, version-1 ones may go
    assert ray.get(store.reserve.remote("s", 2, 0))[0] == "wait"
    assert ray.get(store.reserve.remote("s", 2, 1))[0] == "ok"


def test_get_batch_times_out_without_consuming(ray_local):
    ray = ray_local
    from rlds.distributed.replay import ReplayStore

    store = ReplayStore.remote(task_sizes=[4], capacity=8, max_staleness=1, reward_timeout_s=30)
    assert ray.get(store.reserve.remote("s", 2, 0))[0] == "ok"
    add(ray, store, "s", 0, {"r": ray.put(np.ones(2, np.float32))})
    assert ray.get(store.get_batch.remote(0, 0.2)) is None
    assert ray.get(store.reserve.remote("s", 2, 0))[0] == "ok"
    add(ray, store, "s", 0, {"r": ray.put(np.full(2, 2.0, np.float32))})
    batch = ray.get(store.get_batch.remote(0, 5.0))
    assert batch is not None and [list(p.scores["r"]) for p in batch.parts] == [[1, 1], [2, 2]]
    assert ray.get(store.stats.remote())["consumed"] == 4


def test_failed_nan_and_stale_rewards_are_counted_not_lost(ray_local):
    ray = ray_local
    from rlds.distributed.replay import ReplayStore, books

    @ray.remote
    def broken():
        raise RuntimeError("reward model crashed")

    store = ReplayStore.remote(task_sizes=[4], capacity=8, max_staleness=1, reward_timeout_s=30)
    for _ in range(3):
        assert ray.get(store.reserve.remote("s", 2, 0))[0] == "ok"
    add(ray, store, "s", 0, {"r": broken.remote()})
    add(ray, store, "s", 0, {"r": ray.put(np.array([1.0, np.nan], np.float32))})
    add(ray, store, "s", 0, {"r": ray.put(np.ones(2, np.float32))})
    # learner at version 2: version-0 data is 2 versions old, past max_staleness 1
    assert ray.get(store.get_batch.remote(2, 1.0)) is None
    deadline = time.monotonic() + 30  # the failed reward's error reaches the store when Ray delivers it
    while sum((stats := ray.get(store.stats.remote()))["drops"].values()) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {k: v for k, v in stats["drops"].items() if v} == {"reward_failed": 2, "nan_reward": 2, "stale": 2}
    # what went wrong is said, not just counted
    assert "reward model crashed" in stats["errors"]["reward_failed"]
    assert stats["errors"]["nan_reward"] == "reward 'r' gave a non-finite score (NaN or inf)"
    assert books(stats) == {"sampled": 6, "trained": 0, "dropped": stats["drops"], "in_flight": 0,
                            "unaccounted": 0, "balanced": True, "errors": stats["errors"]}


@pytest.mark.parametrize("scores, message", [
    (np.ones(3), r"shape \(3,\) for 2 images; it must return one number per image"),
    (np.ones((2, 2)), r"shape \(2, 2\) for 2 images"),
    (["good", "bad"], "not numbers"),
])
def test_a_reward_that_returns_the_wrong_thing_is_named(scores, message):
    from rlds.rewards.base import checked_scores

    with pytest.raises(ValueError, match=message):
        checked_scores("mine", scores, 2)
    assert checked_scores("mine", [1, np.inf], 2).dtype == np.float32  # non-finite: dropped by the store


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32, 3), np.float32), r"given images as float32 \(2, 32, 32, 3\); it scores uint8"),
    (np.zeros((2, 32, 32), np.uint8), r"as uint8 \(2, 32, 32\)"),
    (np.zeros((2, 32, 32, 4), np.uint8), r"as uint8 \(2, 32, 32, 4\)"),
    ([[0]], "as list"),
    (np.zeros((3, 32, 32, 3), np.uint8), "given 3 images for 2 prompts"),
    (np.zeros((2, 32, 16, 3), np.uint8), "needs images of at least 32x32 pixels and was given 32x16"),
])
def test_images_a_reward_cannot_score_are_named(images, message):
    from rlds.rewards.base import checked_images

    with pytest.raises(ValueError, match=message):
        checked_images("mine", images, 2, min_size=32)
    assert checked_images("mine", np.zeros((2, 64, 48, 3), np.uint8), 2, min_size=32).shape == (2, 64, 48, 3)


def test_a_dead_samplers_reservations_and_entries_are_released(ray_local):
    ray = ray_local
    from rlds.distributed.replay import ReplayStore, books

    store = ReplayStore.remote(task_sizes=[4], capacity=4, max_staleness=0, reward_timeout_s=30)
    assert ray.get(store.reserve.remote("a", 2, 0))[0] == "ok"
    assert ray.get(store.reserve.remote("b", 2, 0))[0] == "ok"
    add(ray, store, "a", 0, {"r": ray.put(np.ones(2, np.float32))})
    assert ray.get(store.reserve.remote("c", 2, 0))[0] == "wait"
    assert ray.get(store.release.remote("b")) == 0  # a reservation is freed: nothing was sampled for it
    assert ray.get(store.release.remote("a")) == 2
    assert ray.get(store.reserve.remote("c", 4, 0))[0] == "ok"
    stats = ray.get(store.stats.remote())
    assert stats["drops"]["sampler_died"] == 2 and books(stats)["balanced"] and books(stats)["sampled"] == 2


def test_a_reservation_still_waiting_when_its_sampler_dies_is_not_granted(ray_local):
    """A sampler killed while its reserve call waits for room: the call outlives it, and room freed
    after the release must go to the living, or the store stays a batch short."""
    ray = ray_local
    from rlds.distributed.replay import ReplayStore

    store = ReplayStore.remote(task_sizes=[4], capacity=4, max_staleness=1, reward_timeout_s=30)
    assert ray.get(store.reserve.remote("a", 4, 0))[0] == "ok"
    waiting = store.reserve.remote("b", 4, 0, 30.0)  # full: b waits for room
    time.sleep(0.5)
    assert ray.get(store.release.remote("b")) == 0  # b died while waiting
    add(ray, store, "a", 0, {"r": ray.put(np.ones(4, np.float32))}, n=4)
    assert ray.get(store.get_batch.remote(0, 5.0)) is not None  # room again
    assert ray.get(waiting, timeout=30)[0] == "stop"
    assert ray.get(store.stats.remote())["depth"] == 0
    assert ray.get(store.reserve.remote("c", 4, 1))[0] == "ok"


def test_tasks_fill_their_shares_and_batches_come_task_by_task(ray_local):
    ray = ray_local
    from rlds.distributed.replay import ReplayStore

    store = ReplayStore.remote(task_sizes=[4, 2], capacity=6, max_staleness=0, reward_timeout_s=30)
    # each reservation goes to the task furthest behind its share: 0 (0/4), 1 (0/2), 0 (2/4), then full
    granted = [ray.get(store.reserve.remote("s", 2, 0))[:2] for _ in range(4)]
    assert granted == [("ok", 0), ("ok", 1), ("ok", 0), ("wait", -1)]
    add(ray, store, "s", 0, {"b": ray.put(np.full(2, 5.0, np.float32))}, task=1)
    add(ray, store, "s", 0, {"a": ray.put(np.ones(2, np.float32))}, task=0)
    assert ray.get(store.get_batch.remote(0, 0.2)) is None  # task 0 has 2 of its 4
    add(ray, store, "s", 0, {"a": ray.put(np.ones(2, np.float32))}, task=0)
    batch = ray.get(store.get_batch.remote(0, 5.0))
    assert batch.tasks == [0, 0, 1] and len(batch) == 6 and batch.lags == [0, 0, 0]
    assert [sorted(p.scores) for p in batch.parts] == [["a"], ["a"], ["b"]]
    assert ray.get(store.stats.remote())["consumed"] == 6


def test_a_task_is_sampled_and_trained_only_in_its_iterations(ray_local):
    """Task 0 trains in iterations 0-1, task 1 in 2-3 (tasks[].iterations), with max_staleness 1."""
    ray = ray_local
    from rlds.distributed.replay import ReplayStore, books

    store = ReplayStore.remote(task_sizes=[2, 2], capacity=8, max_staleness=1, reward_timeout_s=30,
                               windows=[(0, 2), (2, 4)])

    def fill(version, task):
        status, granted, _ = ray.get(store.reserve.remote("s", 2, version))
        assert (status, granted) == ("ok", task)
        add(ray, store, "s", version, {"r": ray.put(np.ones(2, np.float32))}, task=granted)

    fill(0, 0)  # iteration 0
    fill(0, 0)  # iteration 1, one version ahead
    # task 1's first samples go to iteration 2: two versions ahead of weights 0, too stale for it
    assert ray.get(store.reserve.remote("s", 2, 0))[:2] == ("wait", -1)
    assert ray.get(store.get_batch.remote(0, 5.0)).tasks == [0]
    fill(1, 1)  # iteration 2; task 0's window is full, so the reservation goes to task 1
    assert ray.get(store.get_batch.remote(1, 5.0)).tasks == [0]
    fill(2, 1)  # iteration 3
    for version in (2, 3):
        assert ray.get(store.get_batch.remote(version, 5.0)).tasks == [1]
    assert ray.get(store.reserve.remote("s", 2, 4))[:2] == ("wait", -1)  # every window is full
    assert books(ray.get(store.stats.remote()))["trained"] == 8
    # a resumed run at iteration 3 has task 0 done and task 1 one batch in
    ray.get(store.restart_from.remote(3))  # as the trainer does: a reservation must not overtake it
    assert ray.get(store.reserve.remote("s", 2, 3))[:2] == ("ok", 1)
    assert ray.get(store.reserve.remote("s", 2, 3))[:2] == ("wait", -1)


def test_books_that_do_not_balance_say_by_how_much():
    from rlds.distributed.replay import DROP_REASONS, books

    stats = {"added": 92, "trained": 64, "scoring": 8, "ready": 4,
             "drops": {reason: 0 for reason in DROP_REASONS} | {"stale": 16}}
    assert books(stats)["balanced"] and books(stats)["in_flight"] == 12
    stats["added"] = 95
    assert books(stats)["unaccounted"] == 3 and not books(stats)["balanced"]
