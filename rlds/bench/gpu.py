"""The GPU benchmark: Stable Diffusion 2's UNet and text encoder (random weights) through rlds' own code.

No weights are downloaded: the models are built from SD2-1-base's configs with random weights,
which time exactly like the trained ones. The timed code is rlds' real path:
`rlds.policy.sampling.sample_trajectories` (DDIM with log-probs, classifier-free guidance, bf16
autocast over float32 master weights) and `rlds.algo.ppo.ppo_update` (K trained denoising steps,
forward and backward with guidance, AdamW).

    python -m rlds.bench.gpu --out gpu_bench.json          # on a GPU machine
    python -m rlds.bench.gpu --tiny --steps 4              # the same code on CPU, tiny models

Model FLOPs are counted with torch.utils.flop_counter on one UNet forward at the bench batch
(doubled by guidance); a forward+backward counts as 3 forwards. MFU is achieved model FLOP/s over
the card's dense bf16 peak (null for a card not in the table).
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# Dense bf16 tensor-core peak, FLOP/s, by torch.cuda.get_device_name (first match wins).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756e12),
    (r"H100.*(SXM|HBM3)", 989.4e12),
    (r"H200(?!.*NVL)", 989.4e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),
    (r"A10G", 70e12),
]

# The paper's system, as the issue quotes it (Zhang et al. 2024, SD2 on A100s).
PAPER_REFERENCE = {
    "trajectories_per_s_per_gpu": 0.37,
    "mfu": 0.10,
    "source": "Large-scale RL for Diffusion Models (arXiv 2401.12244) as quoted in the issue: "
              "about 0.37 trajectories/s per GPU, about 10% model FLOP utilisation",
}

SD2_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-2-1-base, unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, center_input_sample=False,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD2_TEXT_CONFIG = dict(  # OpenCLIP ViT-H/14's text tower, as SD2 ships it
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(8, 16), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)

PROMPTS = ["a red circle next to a blue square", "a photo of a cat", "a green tree near a house",
           "a painting of a yellow sun above the sea", "a dog beside a horse", "a white bird in the sky",
           "an orange fish", "a small boat on a river"]

GUIDANCE_SCALE, ETA, K_STEPS = 7.0, 1.0, 5


def peak_bf16_flops(device_name: str) -> Optional[float]:
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


class _Clock:
    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_sd2_policy(device, with_vae: bool = True):
    """SD2-1-base's text encoder and UNet (and VAE), random weights, built on `device`.

    Like `load_policy` with model.dtype bfloat16: the UNet keeps float32 master weights (compute
    under autocast), the frozen text encoder and VAE are bfloat16.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlds.policy.pipeline import Policy, build_tokenizer, tiny_scheduler

    tokenizer = build_tokenizer(77)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # init on the GPU: seconds, not minutes
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD2_TEXT_CONFIG, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)).to(torch.bfloat16)
        unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
        vae = AutoencoderKL(**SD_VAE_CONFIG).to(torch.bfloat16) if with_vae else None
    # DDIM with Stable Diffusion's settings (scaled_linear 0.00085..0.012, no alpha-to-one, offset 1).
    return Policy(tokenizer, text_encoder, unet, tiny_scheduler()), vae


def build_tiny_bench_policy(with_vae: bool = True):
    import torch
    from diffusers import AutoencoderKL

    from rlds.config import TinyModelConfig
    from rlds.policy.pipeline import build_tiny_policy

    policy = build_tiny_policy(TinyModelConfig())
    vae = None
    if with_vae:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return policy, vae


def _prepare(policy, channels_last: bool):
    """What `load_policy` does for a full fine-tune, plus channels_last."""
    import torch

    policy.text_encoder.requires_grad_(False).eval()
    policy.unet.requires_grad_(True).eval()
    if channels_last:
        policy.unet.to(memory_format=torch.channels_last)


def _attention_processor(unet) -> str:
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return ",".join(names)


def _timed(fn: Callable[[], object], reps: int, clock: _Clock, share: float, sync: Callable[[], None],
           name: str, notes: list[str]) -> tuple[list[float], float, object]:
    """A warm-up call, then up to `reps` timed calls within `share` of the time left.

    Returns (timed seconds, warm-up seconds, the last result). With no time for one timed call
    the list is empty and the caller reports the warm-up (said in notes).
    """
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    warm = time.perf_counter() - t0
    phase_deadline = time.perf_counter() + share * max(0.0, clock.left())
    times: list[float] = []
    while len(times) < reps:
        estimate = float(np.mean(times)) if times else warm
        # The first timed call may use the whole remaining budget, later ones only this phase's share.
        limit = phase_deadline if times else clock.deadline
        if time.perf_counter() + estimate > limit:
            notes.append(f"{name}: stopped after {len(times)} of {reps} timed repetitions "
                         f"(time budget; {clock.left():.0f} s left)")
            break
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    if not times:
        notes.append(f"{name}: no time for a timed repetition; the warm-up time ({warm:.2f} s, "
                     "which includes one-off costs) stands in")
    return times, warm, out


def _mfu(flops: Optional[float], seconds: float, peak: Optional[float]):
    if flops is None or not seconds:
        return None, None
    achieved = flops / seconds
    return achieved, (achieved / peak if peak else None)


def run_gpu_bench(tiny: bool = False, batch_size: int = 8, num_steps: int = 50, compile: bool = False,
                  time_budget_s: float = 420, reps: int = 3, vae: bool = True,
                  peak_flops: Optional[float] = None, out: Optional[str] = None) -> dict:
    """Time rlds' sampler and learner on SD2's UNet (random weights) on one GPU; a JSON-able dict.

    `tiny=True` runs the same code on CPU with rlds' tiny model (float32, as rlds runs on CPU).
    `out`: a JSON file rewritten after every phase, so that a run cut short still leaves numbers.
    """
    import torch

    threads = torch.get_num_threads()
    if tiny:
        torch.set_num_threads(1)  # as rlds' actors run on CPU (torch_threads: 1); robust on a busy machine
    try:
        return _run(tiny, batch_size, num_steps, compile, time_budget_s, reps, vae, peak_flops, out)
    finally:
        torch.set_num_threads(threads)


def _run(tiny, batch_size, num_steps, compile, time_budget_s, reps, vae, peak_flops, out) -> dict:
    import torch

    from rlds.algo.advantages import compute_advantages
    from rlds.algo.ppo import make_optimizer, ppo_update
    from rlds.config import AlgoConfig, SamplingConfig
    from rlds.policy.sampling import guided_noise, sample_trajectories

    clock = _Clock(time_budget_s)
    notes: list[str] = []
    result: dict = {"mode": "tiny" if tiny else "sd2", "complete": False, "notes": notes}

    def save():
        result["wall_s"] = round(clock.elapsed(), 2)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2, default=_jsonable))

    if tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise RuntimeError("rlds.bench.gpu needs a CUDA GPU for the SD2 benchmark; "
                           "tiny=True (--tiny) runs the same code path on CPU")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # rlds: model.dtype on GPU, float32 on CPU
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops if peak_flops is not None else (peak_bf16_flops(device_name) if cuda else None)
    if cuda:
        torch.backends.cudnn.benchmark = True
    k = min(K_STEPS, num_steps)
    if k < K_STEPS:
        notes.append(f"num_steps {num_steps} < {K_STEPS}: the learner trains {k} steps per update")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def reset_memory():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def peak_memory_gb() -> float:
        if cuda:
            return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # process RSS

    import diffusers
    import transformers
    result.update({
        "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peak_bf16_flops": peak, "paper_reference": PAPER_REFERENCE,
    })

    # ------------------------------------------------------------------ build
    t0 = time.perf_counter()
    policy, vae_model = build_tiny_bench_policy(vae) if tiny else build_sd2_policy(device, vae)
    policy.to(device)
    if vae_model is not None:
        vae_model.to(device).requires_grad_(False).eval()
        vae_model.to(memory_format=torch.channels_last)
    _prepare(policy, channels_last=True)
    sync()
    result["build_s"] = round(time.perf_counter() - t0, 2)
    sampling_cfg = SamplingConfig(num_steps=num_steps, eta=ETA, guidance_scale=GUIDANCE_SCALE)
    algo_cfg = AlgoConfig(batch_size=batch_size, timesteps_per_iteration=k)
    optimizer = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], algo_cfg)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    result["config"] = {
        "batch_size": batch_size, "num_steps": num_steps, "guidance_scale": GUIDANCE_SCALE, "eta": ETA,
        "timesteps_per_iteration": k, "optimizer": type(optimizer).__name__,
        "learning_rate": algo_cfg.learning_rate, "compute_dtype": str(dtype).replace("torch.", ""),
        "unet_weights_dtype": str(next(policy.unet.parameters()).dtype).replace("torch.", ""),
        "channels_last": True, "compile": bool(compile), "cudnn_benchmark": bool(cuda),
        "attention_processor": _attention_processor(policy.unet),
        "latent_shape": list(policy.latent_shape), "unet_params": _count_params(policy.unet),
        "text_encoder_params": _count_params(policy.text_encoder),
        "vae_params": _count_params(vae_model) if vae_model is not None else None,
        "time_budget_s": time_budget_s, "reps": reps,
    }
    save()

    # ------------------------------------------------------------------ FLOPs of one UNet forward
    from torch.utils.flop_counter import FlopCounterMode

    from rlds.policy.sampling import autocast, encode_prompts

    with torch.no_grad():
        cond = encode_prompts(policy, prompts)
        uncond = encode_prompts(policy, [""])
        policy.scheduler.set_timesteps(num_steps, device=device)
        x = torch.randn((batch_size,) + policy.latent_shape, device=device)
        t = policy.scheduler.timesteps[0]
        counter = FlopCounterMode(display=False)
        with counter, autocast(policy, dtype):
            guided_noise(policy, x, t, cond, uncond, GUIDANCE_SCALE)  # the UNet at 2 x batch (CFG)
    forward = float(counter.get_total_flops())
    sampling_flops = num_steps * forward
    learner_flops = 3 * k * forward  # forward + backward ~ 3 forwards, one guided call per trained step
    result["flops"] = {
        "unet_forward": forward, "unet_forward_batch": 2 * batch_size,
        "unet_forward_per_image": forward / (2 * batch_size),
        "sampling_per_batch": sampling_flops, "learner_per_batch": learner_flops,
        "note": "one UNet forward at the guided batch (2 x batch_size), counted by "
                "torch.utils.flop_counter; forward+backward = 3 x forward; the text encoder, the "
                "DDIM arithmetic and the optimizer are not counted",
    }
    if not cuda:
        notes.append("on CPU the flop counter does not see fused CPU attention kernels: FLOPs are a floor")
    save()

    if compile:
        t0 = time.perf_counter()
        policy.unet.compile()  # in place: Policy and ppo_update keep the same module
        result["config"]["compile_call_s"] = round(time.perf_counter() - t0, 2)
        notes.append("torch.compile: the warm-up times include compilation (no_grad and grad graphs)")

    seeds_rng = np.random.default_rng(0)

    def sample(version: int = 0):
        return sample_trajectories(policy, prompts, sampling_cfg, seeds=seeds_rng.integers(2**62, size=batch_size),
                                   policy_version=version, prompt_ids=np.arange(batch_size),
                                   sample_ids=np.arange(batch_size), dtype=dtype)

    reward_rng = np.random.default_rng(1)

    def advantages_for(traj):
        rewards = reward_rng.normal(size=len(traj))  # stands in for a reward model's scores
        return compute_advantages(rewards, "batch", algo_cfg.advantage_clip, traj.prompt_ids)

    update_rng = np.random.default_rng(2)

    def learn(traj):
        return ppo_update(policy, [traj], [advantages_for(traj)], optimizer, algo_cfg, update_rng, dtype=dtype)

    # ------------------------------------------------------------------ sampling
    reset_memory()
    times, warm, traj = _timed(sample, reps, clock, 0.3, sync, "sampling", notes)
    sec = float(np.median(times)) if times else warm
    achieved, mfu = _mfu(sampling_flops, sec, peak)
    result["sampling"] = {
        "seconds_per_batch": sec, "trajectories_per_s": batch_size / sec,
        "achieved_flops": achieved, "mfu": mfu, "reps": len(times), "times_s": times,
        "warmup_s": warm, "peak_memory_gb": peak_memory_gb(),
        "what": f"sample_trajectories: {num_steps} DDIM steps (eta {ETA}), CFG {GUIDANCE_SCALE}, "
                "text encoding, latents/log-probs copied to host numpy",
    }
    save()

    # ------------------------------------------------------------------ learner
    if clock.left() > 0:
        reset_memory()
        times, warm, _ = _timed(lambda: learn(traj), reps, clock, 0.4, sync, "learner", notes)
        sec = float(np.median(times)) if times else warm
        achieved, mfu = _mfu(learner_flops, sec, peak)
        result["learner"] = {
            "seconds_per_update": sec, "seconds_per_trained_step": sec / k,
            "trajectories_per_s": batch_size / sec, "achieved_flops": achieved, "mfu": mfu,
            "reps": len(times), "times_s": times, "warmup_s": warm, "peak_memory_gb": peak_memory_gb(),
            "what": f"ppo_update: {k} trained denoising steps on one batch of {batch_size}, each a guided "
                    "forward+backward and an AdamW step over the full UNet",
        }
        save()
    else:
        notes.append("learner: skipped (time budget spent)")

    # ------------------------------------------------------------------ end to end
    if "learner" in result and clock.left() > 0:
        version = iter(range(1, 10**6))

        def iteration():
            trajectory = sample(next(version))
            learn(trajectory)
        reset_memory()
        e2e_reps = max(1, reps - 1)
        # The warm-up is one more real iteration; with no time for a timed one it stands in.
        if clock.left() > result["sampling"]["seconds_per_batch"] + result["learner"]["seconds_per_update"]:
            times, warm, _ = _timed(iteration, e2e_reps, clock, 0.6, sync, "end_to_end", notes)
            sec = float(np.median(times)) if times else warm
            achieved, mfu = _mfu(sampling_flops + learner_flops, sec, peak)
            result["end_to_end"] = {
                "seconds_per_iteration": sec, "trajectories_per_s": batch_size / sec,
                "achieved_flops": achieved, "mfu": mfu, "reps": len(times), "times_s": times,
                "warmup_s": warm, "peak_memory_gb": peak_memory_gb(),
                "what": "sample a batch, then update on it (max_staleness 0 on one GPU); no reward model",
            }
        else:
            notes.append("end_to_end: skipped (time budget spent)")
        save()

    # ------------------------------------------------------------------ VAE decode (not in the RL loop)
    if vae_model is not None and clock.left() > 0:
        latents = torch.randn((batch_size, vae_model.config.latent_channels) + tuple(policy.latent_shape[1:]),
                              device=device, dtype=next(vae_model.parameters()).dtype)

        @torch.no_grad()
        def decode():
            return vae_model.decode(latents / vae_model.config.scaling_factor).sample

        counter = FlopCounterMode(display=False)
        reset_memory()
        with counter:
            decode()
        vae_flops = float(counter.get_total_flops())
        times, warm, images = _timed(decode, 1, clock, 1.0, sync, "vae_decode", notes)
        sec = float(np.median(times)) if times else warm
        achieved, mfu = _mfu(vae_flops, sec, peak)
        result["vae_decode"] = {
            "seconds_per_batch": sec, "images_per_s": batch_size / sec, "flops": vae_flops,
            "achieved_flops": achieved, "mfu": mfu, "image_shape": list(images.shape[1:]),
            "reps": len(times), "peak_memory_gb": peak_memory_gb(),
            "what": f"one VAE decode of the batch ({'a tiny' if tiny else 'SD' + chr(39) + 's'} AutoencoderKL "
                    f"config, random weights, {str(latents.dtype).replace('torch.', '')}); not part of the "
                    "RL loop timings above",
        }
        save()

    # ------------------------------------------------------------------ summary
    e2e = result.get("end_to_end")
    paper = PAPER_REFERENCE
    result["summary"] = {
        "sampling_trajectories_per_s": result["sampling"]["trajectories_per_s"],
        "learner_trajectories_per_s": result.get("learner", {}).get("trajectories_per_s"),
        "end_to_end_trajectories_per_s": e2e["trajectories_per_s"] if e2e else None,
        "end_to_end_mfu": e2e["mfu"] if e2e else None,
        "vs_paper_trajectories_per_s": (e2e["trajectories_per_s"] / paper["trajectories_per_s_per_gpu"]
                                        if e2e else None),
        "vs_paper_mfu": (e2e["mfu"] / paper["mfu"] if e2e and e2e["mfu"] is not None else None),
    }
    if peak is None:
        notes.append(f"no bf16 peak known for {device_name!r}: MFU is null (pass peak_flops to set one)")
    result["complete"] = all(key in result for key in ("sampling", "learner", "end_to_end"))
    save()
    return result


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlds.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results here as JSON (rewritten after every phase)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (tests the code path)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per trajectory")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per phase (at most)")
    parser.add_argument("--time-budget", type=float, default=420, help="seconds; phases shorten to fit")
    parser.add_argument("--no-vae", action="store_true", help="skip the separate VAE decode timing")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    args = parser.parse_args(argv)
    try:
        result = run_gpu_bench(tiny=args.tiny, batch_size=args.batch_size, num_steps=args.steps,
                               compile=args.compile, time_budget_s=args.time_budget, reps=args.reps,
                               vae=not args.no_vae, out=args.out,
                               peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
    except RuntimeError as e:
        print(f"rlds.bench.gpu: {e}", file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps({"device": result["device"], **result["summary"], "notes": result["notes"]},
                     indent=2, default=_jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
