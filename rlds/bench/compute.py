"""`rlds bench --parts compute`: what a trajectory costs in each way of computing it, in one process.

For the config's model, sampling and objective, one actor's threads (the sampler's CPUs): the
samplers' rate and the learners' update rate (trajectories/s) in float32, under bfloat16 autocast
(`model.dtype: bfloat16`), with channels-last weights and with a compiled UNet (`torch.compile`;
what compiling added to the warm-up is `compile_s`, small where inductor's on-disk cache already
holds the graphs). For an objective that trains on the samplers' log-probs (PPO) it also
says whether the learner recomputes them to the bit: a way of computing that does not keeps the
first importance ratio off 1. Repetitions are interleaved across the options and their medians
kept, so that a machine that slows down for a while slows every option alike.
"""
from __future__ import annotations

import time

import numpy as np

from rlds.config import Config, actor_threads, task_list
from rlds.data.prompts import prompt_list

OPTIONS = ("float32", "bfloat16", "channels_last", "compile")


def _prepared(config: Config, option: str):
    import torch

    from rlds.algo.objectives import objective_class
    from rlds.algo.ppo import make_optimizer
    from rlds.policy import load_policy

    policy = load_policy(config.model)
    if option == "channels_last":
        policy.unet.to(memory_format=torch.channels_last)
    elif option == "compile":
        policy.unet.compile()  # in place, and lazy: the warm-up iteration compiles both graphs
    dtype = torch.bfloat16 if option == "bfloat16" else torch.float32
    objective = objective_class(config.algo.objective)(policy.unet, config.algo)
    optimizer = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], config.algo)
    return {"policy": policy, "dtype": dtype, "objective": objective, "optimizer": optimizer,
            "sample_s": [], "update_s": []}


def _iteration(config: Config, run: dict, prompts: list[str], seed: int, check: bool = False) -> tuple[float, float]:
    """One iteration's sampling and update: their seconds. With `check`, between the two (untimed),
    whether the learner recomputes the samplers' log-probs to the bit (`run["to_the_bit"]`)."""
    from rlds.policy import sample_trajectories

    per, total = config.sampler.batch_size, config.algo.batch_size
    policy, keep_chain = run["policy"], run["objective"].needs_chain
    start = time.perf_counter()
    trajs = [sample_trajectories(policy, [prompts[(seed + b * per + i) % len(prompts)] for i in range(per)],
                                 config.sampling, seeds=list(range(seed + b * per, seed + (b + 1) * per)),
                                 dtype=run["dtype"], keep_chain=keep_chain)
             for b in range(total // per)]
    sample_s = time.perf_counter() - start
    if check and run["objective"].needs_chain:
        run["to_the_bit"] = _recomputes_to_the_bit(run, trajs[0])
    advantages = np.random.default_rng(seed).standard_normal(total).astype(np.float32)
    policy.scheduler.set_timesteps(config.sampling.num_steps)
    start = time.perf_counter()
    run["objective"].update(policy, trajs, np.split(advantages, len(trajs)), run["optimizer"],
                            np.random.default_rng(seed), dtype=run["dtype"])
    return sample_s, time.perf_counter() - start


def _recomputes_to_the_bit(run: dict, traj) -> bool:
    import torch

    from rlds.policy.sampling import step_log_prob

    return all(torch.equal(step_log_prob(run["policy"], traj, s, run["dtype"]).detach(),
                           torch.from_numpy(traj.log_probs[:, s])) for s in range(traj.log_probs.shape[1]))


def compute_options(config: Config, options: tuple[str, ...] = OPTIONS, repeats: int = 5) -> dict:
    """Each option's sampling and update rates (medians of `repeats` interleaved iterations after a
    warm-up, which for `compile` includes compiling both graphs) and its speed-up over float32."""
    import torch

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown compute option(s) {unknown}; options: {', '.join(OPTIONS)}")
    threads = actor_threads(config, config.sampler.num_cpus)
    torch.set_num_threads(threads)
    prompts = prompt_list(task_list(config)[0])
    total = config.algo.batch_size
    runs = {name: _prepared(config, name) for name in options}
    out: dict = {"threads": threads, "objective": config.algo.objective, "options": {}}
    for name, run in runs.items():  # warm-up (and compilation), with the bit check
        start = time.perf_counter()
        _iteration(config, run, prompts, 0, check=True)
        run["warmup_s"] = time.perf_counter() - start
    for rep in range(repeats):
        for name, run in runs.items():
            sample_s, update_s = _iteration(config, run, prompts, 1000 * (rep + 1))
            run["sample_s"].append(sample_s)
            run["update_s"].append(update_s)
    for name, run in runs.items():
        sample, update = float(np.median(run["sample_s"])), float(np.median(run["update_s"]))
        out["options"][name] = {
            "sample_trajectories_per_s": total / sample, "update_trajectories_per_s": total / update,
            "core_seconds_per_trajectory": threads * (sample + update) / total,
            "warmup_s": run["warmup_s"], "to_the_bit": run.get("to_the_bit")}
    if "float32" in out["options"]:
        base = out["options"]["float32"]
        for figures in out["options"].values():
            figures["speedup_over_float32"] = (base["core_seconds_per_trajectory"]
                                               / figures["core_seconds_per_trajectory"])
        if "compile" in out["options"]:  # what compiling added to the warm-up (less where inductor's cache has it)
            out["options"]["compile"]["compile_s"] = out["options"]["compile"]["warmup_s"] - base["warmup_s"]
    return out
