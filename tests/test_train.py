"""End to end on a local Ray: samplers, reward pools, a gloo LearnerGroup, the run folder."""
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rlds.config import ConfigError
from rlds.metrics import read_metrics
from rlds.trainer import Trainer

pytestmark = pytest.mark.timeout(300)


# The paired gain (below) of a run is one draw from a wide distribution: the samplers' batches reach
# the learners in any order, so even one seed differs run to run. At batch 16 without warmup it was
# -0.028 on one CI machine and -0.022 to +0.145 over seeds 0-7 here (2 of 8 below 0.01): AdamW's
# first steps move every weight by about the learning rate whatever the gradient's signal (approx_kl
# 0.03-0.08 in iteration 1), and a noisy first move can set the run going darker. Batch 32 alone: 3
# of 16 seeds below 0.01. Batch 32 with two warmup iterations: +0.008 to +0.095 in 13 draws at
# iteration 12, and +0.005 (4 standard errors) on CI; the gain does not rise every iteration (seed 6:
# +0.044, +0.017, +0.044 at 8, 12, 16). At 16 iterations it was +0.044 to +0.175 over seeds 0-11, the
# least 33 standard errors, so the test trains 16 and asks for 3 (a learner that does not train
# leaves the images unchanged: gain 0).
SYNC_BATCH = 32
SYNC_ITERATIONS, SYNC_CHECKPOINT = 16, 8
SYNC_RUN = ("learner.num_workers=2", f"algo.batch_size={SYNC_BATCH}", "algo.timesteps_per_iteration=3",
            f"checkpoint_every={SYNC_CHECKPOINT}", "algo.learning_rate=1e-3", "algo.warmup_iterations=2")


@pytest.fixture(scope="module")
def sync_run(ray_local, tiny_config, tmp_path_factory):
    """2 samplers, 2 brightness reward actors (+1 jpeg), 2 learner ranks over gloo, synchronous."""
    run_dir = tmp_path_factory.mktemp("sync")
    config = tiny_config(f"run_dir={run_dir}", f"iterations={SYNC_ITERATIONS}", *SYNC_RUN,
                         f"sample_grid_every={SYNC_CHECKPOINT}")
    Trainer(config, progress=False).run()
    return config, run_dir


def test_sync_run_learns_and_leaves_the_run_folder(sync_run):
    config, run_dir = sync_run
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, SYNC_ITERATIONS + 1))
    assert rows[-1]["samples"] == SYNC_ITERATIONS * SYNC_BATCH
    for key in ("reward/mean", "reward/brightness/mean", "reward/jpeg_compressibility/mean", "loss",
                "clipfrac", "approx_kl", "time/iteration_s", "throughput/samples_per_s", "policy_lag/max"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # synchronous: every trained trajectory came from the weights being trained
    assert all(r["policy_lag/max"] == 0 for r in rows)
    # and the learner recomputes the samplers' log-probs: only its own steps within an iteration move
    # the ratio (measured at most 1.0062), where stale or wrong sampler weights would move it far
    assert all(r["ratio/max"] < 1.05 for r in rows), trace(rows)
    # Learning, measured paired: the base and the final weights draw the same 64 seeded chains, so
    # the difference is the policy's alone. The training curve's first-vs-last mean is not a test:
    # its sampling noise (three iterations, 96 images a side) is as large as the gain, while the paired gain's standard
    # error is about 0.0013 (gains in SYNC_RUN's comment).
    final = run_dir / "checkpoints" / f"iter_{SYNC_ITERATIONS:06d}"
    gain, se = paired_brightness_gain(config, final)
    assert gain > 3 * se, (gain, se, trace(rows))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "samples" / f"iter_{SYNC_CHECKPOINT:06d}.png").is_file()
    assert (final / "trainable.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents*"))
    books = json.loads((run_dir / "accounting.json").read_text())
    assert books["balanced"] and books["trained"] == SYNC_ITERATIONS * SYNC_BATCH
    assert books["sampled"] >= books["trained"]
    assert books["sampled"] == books["trained"] + sum(books["dropped"].values()) + books["in_flight"]


def trace(rows) -> str:
    """What the run did, iteration by iteration, and where: the message of a failed learning check."""
    import platform

    import torch

    keys = ("reward/brightness/mean", "advantage/abs_mean", "ratio/max", "clipfrac", "approx_kl", "grad_norm")
    lines = [f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
             f"{torch.backends.cpu.get_cpu_capability()}"]
    lines += [" ".join(f"{k}={r.get(k, float('nan')):.4g}" for k in keys) for r in rows]
    return "\n".join(lines)


def paired_brightness_gain(config, checkpoint, n: int = 64) -> tuple[float, float]:
    """Mean brightness of the checkpoint's images minus the base model's on the same seeds, and its
    standard error."""
    import torch

    from rlds.checkpoint import load_trainable_file
    from rlds.policy import load_policy, sample_trajectories

    prompts = [config.prompts.items[i % len(config.prompts.items)] for i in range(n)]
    brightness = []
    for weights in (None, checkpoint):
        policy = load_policy(config.model)
        if weights is not None:
            load_trainable_file(policy.unet, weights)
        with torch.no_grad():
            traj = sample_trajectories(policy, prompts, config.sampling, seeds=list(range(n)), keep_chain=False)
        brightness.append(traj.images.reshape(n, -1).mean(axis=1) / 255.0)
    diff = brightness[1] - brightness[0]
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(n))


def test_resume_continues_at_the_checkpoint(sync_run, tiny_config):
    config, run_dir = sync_run
    start, end = SYNC_CHECKPOINT, SYNC_CHECKPOINT + 2
    ckpt = run_dir / "checkpoints" / f"iter_{start:06d}"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["iteration"] == start and state["samples"] == start * SYNC_BATCH
    resumed = tiny_config(f"resume={ckpt}", f"iterations={end}", *SYNC_RUN)
    assert Trainer(resumed, progress=False).run() == run_dir
    rows = read_metrics(run_dir / "metrics.jsonl")
    # the first run's rows after the checkpoint are replaced by the resumed ones: no gap, no repeat, no zero-step run
    assert [r["iteration"] for r in rows] == list(range(1, end + 1))
    assert rows[-1]["samples"] == end * SYNC_BATCH
    last = run_dir / "checkpoints" / f"iter_{end:06d}"
    assert json.loads((last / "state.json").read_text())["iteration"] == end
    done = tiny_config(f"resume={last}", f"iterations={end}")
    with pytest.raises(ValueError, match="nothing to train; raise iterations"):
        Trainer(done, progress=False).run()
    # A new run into the same folder without resume is refused: it would append to this run's rows.
    with pytest.raises(ConfigError, match="already holds a run's metrics.*resume=auto"):
        Trainer(tiny_config(f"run_dir={run_dir}", "iterations=2"), progress=False).run()
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, end + 1))


LEARNING_KEYS = ("reward/mean", "loss", "grad_norm", "approx_kl", "clipfrac", "samples", "lr")


@pytest.mark.parametrize("order", ["random", "passes"])
def test_a_resumed_run_repeats_the_uninterrupted_one_row_for_row(ray_local, tiny_config, tmp_path, order):
    """Synchronous, one sampler, one learner, CPU: stopped at the checkpoint of iteration 2 and
    resumed (resume=auto, the same run_dir), it trains what the uninterrupted run trained, its prompts
    drawn i.i.d. or in passes (which resume at the checkpoint's place); a second resubmission of the
    finished run trains nothing; older checkpoints beyond the newest 2 go."""
    common = ("sampler.num_workers=1", "iterations=4", "checkpoint_every=2", "algo.pretrain_beta=0.5",
              f"algo.pretrain_data={tmp_path / 'pretrain.parquet'}", "algo.pretrain_batch_size=8",
              f"prompts.order={order}")
    from rlds.data.pretrain_set import write_pretrain_set

    write_pretrain_set(tmp_path / "pretrain.parquet", 64, seed=0)
    Trainer(tiny_config(f"run_dir={tmp_path / 'whole'}", *common), progress=False).run()
    part = tmp_path / "part"
    Trainer(tiny_config(f"run_dir={part}", *common[:1], "iterations=2", *common[2:]), progress=False).run()
    Trainer(tiny_config(f"run_dir={part}", "resume=auto", "keep_checkpoints=1", *common), progress=False).run()
    whole, resumed = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert {k: a[k] for k in LEARNING_KEYS} == {k: b[k] for k in LEARNING_KEYS}, a["iteration"]
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["iter_000004"]
    Trainer(tiny_config(f"run_dir={part}", "resume=auto", *common), progress=False).run()  # done: a no-op
    assert len(read_metrics(part / "metrics.jsonl")) == 4


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    import torch

    from rlds.policy.pipeline import load_trainable_state_dict

    module = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"another model: 1 tensors differ in shape, e.g. weight \(3, 4\)"):
        load_trainable_state_dict(module, {"weight": torch.zeros(3, 4), "bias": torch.zeros(2)}, "ckpt")
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state_dict(module, {"weight": torch.zeros(2, 4)}, "ckpt")


def test_sample_command_uses_the_checkpoint(sync_run, tmp_path):
    from rlds.cli import main

    config, run_dir = sync_run
    cfg = str(run_dir / "config.yaml")
    ckpt = str(run_dir / "checkpoints" / f"iter_{SYNC_ITERATIONS:06d}")
    args = ["sample", cfg, "--prompts", "a red circle", "--num-per-prompt", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "tuned"), "--checkpoint", ckpt]) == 0
    assert main(args + ["--out", str(tmp_path / "base")]) == 0
    records = [json.loads(x) for x in (tmp_path / "tuned" / "images.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [("a red circle", 0), ("a red circle", 1)]
    from PIL import Image

    from rlds.checkpoint import load_trainable_file
    from rlds.policy import load_policy, sample_trajectories
    from rlds.policy.sampling import eval_sampling

    def read(folder):
        return np.stack([np.asarray(Image.open(tmp_path / folder / r["file"])) for r in records])

    # the command's images are the checkpoint's, to the bit, and not the base model's
    policy = load_policy(config.model)
    load_trainable_file(policy.unet, ckpt)
    expected = sample_trajectories(policy, ["a red circle"] * 2, eval_sampling(config.sampling), seeds=[0, 1]).images
    assert np.array_equal(read("tuned"), expected)
    assert not np.array_equal(read("tuned"), read("base"))


def test_async_lag_never_exceeds_max_staleness_with_the_pretraining_step(ray_local, tiny_config, tmp_path):
    """The L_pre step with the guidance anchor, through the learners' DDP."""
    from rlds.data.pretrain_set import write_pretrain_set

    write_pretrain_set(tmp_path / "pretrain.parquet", 64, seed=0)
    config = tiny_config(f"run_dir={tmp_path}", "iterations=6", "replay.max_staleness=1",
                         "algo.pretrain_beta=0.5", f"algo.pretrain_data={tmp_path / 'pretrain.parquet'}",
                         "algo.pretrain_batch_size=8", "algo.guidance_anchor_beta=1.0")
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 6 and all(r["policy_lag/max"] <= 1 for r in rows)
    assert all(np.isfinite(r["pretrain_loss"]) and r["pretrain_grad_norm"] > 0 for r in rows)
    # taken after each iteration's RL step, against the base's weights
    anchor = [r["guidance_anchor"] for r in rows]
    assert all(np.isfinite(a) and a >= 0 for a in anchor) and max(anchor) > 0
    assert sum(r.get("drops/stale", 0) for r in rows[-1:]) == 0


def run_killing(trainer, ray, ready, victim, within_s=120) -> bool:
    """Run `trainer`, killing the actor `victim()` (no restart) once `ready()` holds; whether it did."""
    killed = threading.Event()

    def kill():
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if ready():
                ray.kill(victim(), no_restart=True)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    trainer.run()
    killer.join(timeout=5)
    return killed.is_set()


def test_a_killed_sampler_is_restarted_and_counted(ray_local, tiny_config, tmp_path):
    trainer = Trainer(tiny_config(f"run_dir={tmp_path}", "iterations=8"), progress=False)
    metrics = tmp_path / "metrics.jsonl"

    def started():
        samplers = getattr(trainer, "samplers", None)
        return bool(samplers and samplers[0] is not None and metrics.exists() and metrics.read_text())

    assert run_killing(trainer, ray_local, started, lambda: trainer.samplers[0], within_s=60)
    rows = read_metrics(metrics)
    assert len(rows) == 8 and rows[-1]["restarts/sampler"] >= 1
    books = json.loads((tmp_path / "accounting.json").read_text())  # what the dead sampler held is counted
    assert books["balanced"] and books["trained"] == 8 * 8


def test_a_killed_learner_rank_is_rebuilt_from_the_last_checkpoint(ray_local, tiny_config, tmp_path):
    """Rank 1 of 2 dies after the first checkpoint: the group is rebuilt from it, the batch it held
    is counted, the samples made with the lost weights are dropped as stale, and the run finishes."""
    config = tiny_config(f"run_dir={tmp_path}", "iterations=8", "learner.num_workers=2", "checkpoint_every=2")
    trainer = Trainer(config, progress=False)

    def checkpointed():
        return (tmp_path / "checkpoints" / "iter_000002").is_dir()

    assert run_killing(trainer, ray_local, checkpointed, lambda: trainer.learners.actors[1])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert rows[-1]["restarts/learner"] == 1
    failed = [r for r in rows if "learner/restored_from" in r]
    assert len(failed) == 1 and failed[0]["learner/restored_from"] >= 2 and "loss" not in failed[0]
    assert rows[-1]["samples"] == 7 * 8  # the failed iteration trained nothing
    books = json.loads((tmp_path / "accounting.json").read_text())
    assert books["balanced"] and books["dropped"]["learner_failed"] == 8 and books["trained"] == 7 * 8


def test_a_reward_whose_environment_cannot_be_built_fails_the_run_at_once(ray_local, tiny_config, tmp_path):
    config = tiny_config(f"run_dir={tmp_path}", "rewards=[{name: brightness, pip: [rlds-no-such-package==0.0.1]}]")
    with pytest.raises(RuntimeError, match=r"reward 'brightness' .* did not start .*pip \['rlds-no-such-package"):
        Trainer(config, progress=False).run()
    books = json.loads((tmp_path / "accounting.json").read_text())
    assert books["balanced"]


def test_images_too_small_for_a_reward_stop_the_run_with_what_it_needs(ray_local, tiny_config, tmp_path):
    # ShapesWorld's rewards are calibrated on 32 px images; the tiny model draws 16 px ones
    config = tiny_config(f"run_dir={tmp_path}", "rewards=[{name: shapes_quality, num_cpus: 0.25}]")
    with pytest.raises(RuntimeError, match=r"refused every sampled batch .*'shapes_quality' needs images of at "
                                           r"least 32x32 pixels and was given 16x16"):
        Trainer(config, progress=False).run()
    books = json.loads((tmp_path / "accounting.json").read_text())
    refused = 3 * config.sampler.batch_size
    assert books["balanced"] and books["trained"] == 0 and books["dropped"]["reward_failed"] >= refused


def test_a_sampler_range_uses_the_room_there_is_and_takes_back_its_autoscaler_request(ray_local, tiny_config,
                                                                                       tmp_path, monkeypatch):
    import ray.autoscaler.sdk

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    config = tiny_config(f"run_dir={tmp_path}", "sampler.num_workers=[1, 3]", "iterations=6")
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["samplers/running"] >= 1 and rows[-1]["samplers/running"] == 3  # the local instance has room
    assert rows[-1]["samplers/left"] == 0 and rows[-1]["restarts/sampler"] == 0
    shape, cleared = requests
    assert shape.count({"CPU": config.sampler.num_cpus}) >= 3 and cleared == []  # the run's shape, then nothing


def test_published_weights_outlive_the_learner_that_put_them(ray_local):
    from rlds.distributed.weights import WeightStore

    @ray_local.remote
    class Publisher:
        def publish(self, store):
            ray_local.get(store.publish.remote(1, np.arange(250_000, dtype=np.float32)))  # 1 MB: a put

    store, publisher = WeightStore.remote(), Publisher.remote()
    ray_local.get(publisher.publish.remote(store))
    ray_local.kill(publisher)
    time.sleep(0.5)
    newest = ray_local.get(store.newer_than.remote(0))
    assert newest.version == 1 and ray_local.get(newest.flat, timeout=10)[999] == 999
    ray_local.kill(store)


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no /dev/shm")
def test_weights_in_shared_memory_slots_outlive_their_writer_and_reach_other_nodes(ray_local, monkeypatch):
    """A learner on the store's node writes each version into a slot; readers there map it (no
    copy), a reader on another node gets it through the object store, and a full /dev/shm sends
    the weights by value instead."""
    import torch

    from rlds.distributed import weight_slots
    from rlds.distributed.weights import WeightLoader, WeightPublisher, WeightStore

    @ray_local.remote
    class Publisher:
        def publish(self, store, version):
            module = torch.nn.Linear(1000, 250, bias=False)
            torch.nn.init.constant_(module.weight, float(version))
            WeightPublisher(store).publish(version, module)

    store, publisher = WeightStore.remote(), Publisher.remote()
    ray_local.get(publisher.publish.remote(store, 1))
    ray_local.kill(publisher)
    loader = WeightLoader(store)  # the driver: on the store's node
    published = ray_local.get(store.newer_than.remote(0, loader.node))
    assert published.flat is None and published.slot.startswith("/dev/shm/")
    version, values = loader.newer_than(0)
    assert version == 1 and values.size == 250_000 and np.all(values == 1) and not values.flags.writeable
    elsewhere = ray_local.get(store.newer_than.remote(0, "another-node"))
    assert elsewhere.slot is None and np.all(ray_local.get(elsewhere.flat, timeout=10) == 1)

    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weight_slots.os, "posix_fallocate", no_room)
    module = torch.nn.Linear(1000, 250, bias=False)
    torch.nn.init.constant_(module.weight, 2.0)
    WeightPublisher(store).publish(2, module)  # slot-0 is newest and a new slot finds no room
    published = ray_local.get(store.newer_than.remote(1, loader.node))
    assert published.slot is None and np.all(loader.newer_than(1)[1] == 2)
    directory = Path(ray_local.get(store.slot_directory.remote(loader.node)))
    assert (directory / "slot-0").is_file()
    ray_local.get(store.close.remote())
    assert not directory.exists()
    ray_local.kill(store)


def test_joint_training_keeps_each_tasks_rewards_and_advantages_apart(ray_local, tiny_config, tmp_path):
    """Two tasks: each iteration trains 4 of each, scored only by the task's own reward, each task's
    step with AdamW moments of its own (algo.task_moments: per_task)."""
    import yaml
    from safetensors import safe_open

    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": "tiny"}, "sampling": {"num_steps": 6},
        "tasks": [{"name": "bright", "prompts": {"items": ["a red circle"]},
                   "rewards": [{"name": "brightness", "num_cpus": 0.25}], "batch_size": 4},
                  {"name": "varied", "prompts": {"items": ["a dog", "a cat"]},
                   "rewards": [{"name": "diversity", "num_cpus": 0.25}], "batch_size": 4,
                   "images_per_prompt": 4, "advantage": "batch", "lr_scale": 0.5}],
        "algo": {"task_moments": "per_task"}, "sampler": {"num_cpus": 0.5}, "ray": {"num_cpus": 4}}))
    config = tiny_config(f"run_dir={tmp_path / 'run'}", "iterations=3", "checkpoint_every=3", path=str(path))
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["samples"] for r in rows] == [8, 16, 24]
    for key in ("reward/bright/mean", "reward/bright/brightness/mean", "reward/varied/mean",
                "reward/varied/diversity/mean"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert not any("reward/bright/diversity/mean" in r or "reward/varied/brightness/mean" in r for r in rows)
    assert all(r["lr/varied"] == pytest.approx(0.5 * r["lr/bright"]) and r["lr/bright"] == r["lr"] for r in rows)
    # diversity is one reward per group of 4 (one group a task batch); brightness differs image to image
    assert all(r["reward/varied/mean"] == r["reward/varied/diversity/mean"] for r in rows)
    # what shows a run going wrong: ties within groups, spread, image statistics, per task
    assert all(0 <= r["reward/varied/zero_std_groups"] <= 1 and r["reward/bright/std"] >= 0 for r in rows)
    assert all(0 < r["images/bright/brightness"] < 1 and r["images/varied/contrast"] >= 0 for r in rows)
    # one prompt in groups of one: from its second image on, every group reports its gain over the first
    assert all(np.isfinite(r["reward/bright/gain"]) and np.isfinite(r["reward/bright/brightness/gain"]) for r in rows)
    assert not any("reward/varied/brightness/gain" in r for r in rows)
    # two sets of moments, each stepped by its own task only (K = 2 steps a task and iteration; shared: 12)
    with safe_open(str(tmp_path / "run" / "checkpoints" / "iter_000003" / "optimizer.safetensors"), "pt") as f:
        steps = {key.split("/")[0]: f.get_tensor(key).item() for key in f.keys() if key.endswith(".step")}
    assert steps == {"0": 6.0, "1": 6.0}


def test_tasks_in_turn_train_only_in_their_iterations_each_on_its_own_schedule(ray_local, tiny_config, tmp_path):
    """A curriculum: `bright` in iterations 1-2, then `varied` in 3-4, each with its own AdamW moments
    and its linear learning-rate schedule running over its own iterations."""
    import json as _json

    import yaml

    path = tmp_path / "turns.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": "tiny"}, "sampling": {"num_steps": 6},
        "tasks": [{"name": "bright", "prompts": {"items": ["a red circle"]}, "iterations": [1, 2],
                   "rewards": [{"name": "brightness", "num_cpus": 0.25}], "batch_size": 4},
                  {"name": "varied", "prompts": {"items": ["a dog", "a cat"]}, "iterations": [3, 4],
                   "rewards": [{"name": "diversity", "num_cpus": 0.25}], "batch_size": 4,
                   "images_per_prompt": 4, "advantage": "batch", "lr_scale": 0.5}],
        "algo": {"task_moments": "per_task", "lr_schedule": "linear", "learning_rate": 1.0e-4},
        "replay": {"max_staleness": 1}, "sampler": {"num_cpus": 0.5}, "ray": {"num_cpus": 4}}))
    config = tiny_config(f"run_dir={tmp_path / 'run'}", "iterations=4", "checkpoint_every=4", path=str(path))
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["samples"] for r in rows] == [4, 8, 12, 16]
    trained = [("reward/bright/mean" in r, "reward/varied/mean" in r) for r in rows]
    assert trained == [(True, False)] * 2 + [(False, True)] * 2
    assert [r.get("lr/bright") for r in rows[:2]] == pytest.approx([1e-4, 0.5e-4])
    assert [r.get("lr/varied") for r in rows[2:]] == pytest.approx([0.5e-4, 0.25e-4])  # its schedule starts afresh
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "checkpoints" / "iter_000004" / "optimizer.safetensors"), "pt") as f:
        steps = {key.split("/")[0]: f.get_tensor(key).item() for key in f.keys() if key.endswith(".step")}
    assert steps == {"0": 4.0, "1": 4.0}  # K = 2 steps in each of a task's two iterations
    accounting = _json.loads((tmp_path / "run" / "accounting.json").read_text())
    assert accounting["balanced"] and accounting["trained"] == 16


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_a_forward_process_objective_trains_cfg_free_on_x0_alone(ray_local, tiny_config, tmp_path, objective):
    """The samplers keep only x_0 (no chain, no log-probs); the learners train without guidance."""
    config = tiny_config(f"run_dir={tmp_path}", "iterations=3", f"algo.objective={objective}",
                         "sampling.guidance_scale=1.0", "sampling.eval_guidance_scale=3.0", "sampling.eta=0.0",
                         "algo.kl_beta=0.1", "algo.optimizer_steps=1", "learner.num_workers=2")
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] > 0  # the first update starts at the reference


def test_group_shared_noise_reaches_the_learners_with_each_batchs_group_ids(ray_local, tiny_config, tmp_path):
    """algo.group_shared_noise through the real path: sampler group ids -> replay -> LearnerGroup ->
    each rank's shard -> the objective, which then draws one noise per group of 4, not one per image."""
    config = tiny_config(f"run_dir={tmp_path}", "iterations=2", "algo.objective=nft", "algo.advantage=group",
                         "algo.group_shared_noise=true", "sampler.images_per_prompt=4", "algo.optimizer_steps=1",
                         "sampling.guidance_scale=1.0", "learner.num_workers=2")
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["images_per_noise_draw"] for r in rows] == [4.0, 4.0]


def test_a_mixed_task_reports_each_sets_rewards_and_ties(ray_local, tiny_config, tmp_path):
    """prompts.mix: colour-named and colour-free ShapesWorld prompts in one task, each reward scoring
    its own set, the colour-free ones sampled at their own guidance scale and in groups of their own
    size; every figure a run going wrong shows comes per set too."""
    rewards = ("rewards=[{name: shapes_composition, num_cpus: 0.25, args: {colour_named_only: true}}, "
               "{name: shapes_parity, num_cpus: 0.25, args: {colour_free_only: true}}]")
    config = tiny_config(f"run_dir={tmp_path}", "iterations=3", "prompts.items=[]", "prompts.shapes=composition",
                         "prompts.mix={fairness: 0.5}", "prompts.guidance_scale_by_set={fairness: 3.0}",
                         "sampler.images_per_prompt=2", "prompts.images_per_prompt_by_set={fairness: 4}",
                         "model.source=shapes", rewards)
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    fair = [r for r in rows if "reward/fairness/shapes_parity/mean" in r]
    named = [r for r in rows if "reward/composition/shapes_composition/mean" in r]
    assert fair and named
    assert all(r["reward/fairness/shapes_composition/mean"] == 0 for r in fair)  # not its set
    assert all(r["reward/composition/shapes_parity/mean"] == 0 for r in named)
    assert all(0 <= r["reward/fairness/zero_std_groups"] <= 1 and r["reward/fairness/group_std"] >= 0 for r in fair)
    assert all(0 <= r["reward/composition/zero_std_groups"] <= 1 for r in named)


def test_validation_scores_its_own_prompts_and_a_rule_stops_the_run(ray_local, tiny_config, tmp_path):
    """Validation every 2 iterations on prompts training never sees; a stop rule that the second
    validation cannot meet ends the run after its figures come in, with a checkpoint there."""
    config = tiny_config(f"run_dir={tmp_path}", "iterations=10", "validation.every=2",
                         "validation.images_per_task=4", "prompts.validation_items=[a white house, a green tree]",
                         "validation.stop_metric=val/brightness/mean", "validation.stop_patience=1",
                         "validation.stop_min_delta=10")
    Trainer(config, progress=False).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # the validation of iteration 4 arrives while iteration 5 trains: the run stops after 5
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    validated = [r for r in rows if "val/mean" in r]
    assert [r["val/iteration"] for r in validated] == [2, 4]
    for r in validated:  # the task's reward, weighted as in training (brightness + 0.05 jpeg)
        assert r["val/mean"] == pytest.approx(r["val/brightness/mean"] + 0.05 * r["val/jpeg_compressibility/mean"])
        assert 0 < r["val/brightness/mean"] < 1 and r["time/validation_s"] > 0
    assert (tmp_path / "checkpoints" / "iter_000005" / "trainable.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "iter_000006").exists()


def test_a_killed_validator_is_replaced_and_counted_and_training_goes_on(ray_local, tiny_config, tmp_path):
    config = tiny_config(f"run_dir={tmp_path}", "iterations=8", "validation.every=2", "validation.images_per_task=2",
                         "prompts.validation_items=[a white house]")
    trainer = Trainer(config, progress=False)
    metrics = tmp_path / "metrics.jsonl"

    def validated():
        return metrics.exists() and "val/mean" in metrics.read_text()

    assert run_killing(trainer, ray_local, validated, lambda: trainer.validator)
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert rows[-1]["restarts/validator"] == 1
    assert "val/mean" in rows[-1]  # the new validator scored the final weights


def test_a_run_joins_only_the_cluster_it_is_told_of(monkeypatch, tiny_config):
    """Left at null, ray.address means RAY_ADDRESS's cluster (a submitted job's) or a private one,
    never whatever instance Ray's discovery finds on the machine."""
    import ray

    from rlds.trainer import connect_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert connect_ray(tiny_config()) and calls[-1] == {"address": "local", "num_cpus": 4, "num_gpus": None}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    connect_ray(tiny_config())
    assert calls[-1] == {"address": "10.0.0.1:6379"}
    connect_ray(tiny_config("ray.address=auto"))
    assert calls[-1] == {"address": "auto"}
