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
)  # the block types are unet_blocks(4, cross_attention_at_top=True)
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


def sd2_architecture():
    """SD2-1-base's UNet and text encoder (and VAE), as `rlds.policy.build_policy` builds them. Like
    `load_policy` with model.dtype bfloat16: the UNet keeps float32 master weights (compute under
    autocast), the frozen text encoder and VAE are bfloat16."""
    import torch

    from rlds.policy.builder import Architecture

    return Architecture(unet=SD2_UNET_CONFIG, text_encoder=SD2_TEXT_CONFIG, max_prompt_length=77, vae=SD_VAE_CONFIG,
                        frozen_dtype=torch.bfloat16)


def tiny_bench_architecture():
    """rlds' tiny model with a tiny VAE: the same code path on CPU."""
    import dataclasses

    from rlds.config import TinyModelConfig
    from rlds.policy.builder import tiny_architecture

    return dataclasses.replace(tiny_architecture(TinyModelConfig()), vae=TINY_VAE_CONFIG)


def _count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attention_processor(unet) -> str:
    return ",".join(sorted({type(p).__name__ for p in unet.attn_processors.values()}))


def _mfu(flops: Optional[float], seconds: float, peak: Optional[float]):
    if flops is None or not seconds:
        return None, None
    achieved = flops / seconds
    return achieved, (achieved / peak if peak else None)


class GpuBench:
    """The benchmark in named stages, each adding its figures to `result` (rewritten to `out` after
    each, so that a run cut short still leaves numbers): build, flops, sampling, learner,
    end_to_end, vae_decode, summary."""

    def __init__(self, tiny: bool, batch_size: int, num_steps: int, compile: bool, time_budget_s: float,
                 reps: int, vae: bool, peak_flops: Optional[float], out: Optional[str]):
        import torch

        self.tiny, self.batch_size, self.num_steps, self.compile = tiny, batch_size, num_steps, compile
        self.reps, self.with_vae, self.out = reps, vae, out
        self.start = time.perf_counter()
        self.deadline = self.start + time_budget_s
        self.notes: list[str] = []
        self.result: dict = {"mode": "tiny" if tiny else "sd2", "complete": False, "notes": self.notes}
        if tiny:
            self.device = torch.device("cpu")
        elif torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            raise RuntimeError("rlds.bench.gpu needs a CUDA GPU for the SD2 benchmark; "
                               "tiny=True (--tiny) runs the same code path on CPU")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # rlds: model.dtype on GPU, float32 on CPU
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.peak = peak_flops if peak_flops is not None else (peak_bf16_flops(self.device_name) if self.cuda else None)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.k = min(K_STEPS, num_steps)
        if self.k < K_STEPS:
            self.notes.append(f"num_steps {num_steps} < {K_STEPS}: the learner trains {self.k} steps per update")
        self.seeds = np.random.default_rng(0)
        self.rewards = np.random.default_rng(1)
        self.update_rng = np.random.default_rng(2)

    # ------------------------------------------------------------------ helpers

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.result["wall_s"] = round(time.perf_counter() - self.start, 2)
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.result, indent=2, default=_jsonable))

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float:
        import torch

        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # process RSS

    def timed(self, fn: Callable[[], object], reps: int, share: float, name: str) -> tuple[float, dict, object]:
        """A warm-up call, then up to `reps` timed calls within `share` of the time left.

        Returns (median seconds, figures, the last result). With no time for one timed call the
        warm-up's seconds stand in (said in notes)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        warm = time.perf_counter() - t0
        phase_deadline = time.perf_counter() + share * max(0.0, self.left())
        times: list[float] = []
        while len(times) < reps:
            estimate = float(np.mean(times)) if times else warm
            # The first timed call may use the whole remaining budget, later ones only this phase's share.
            limit = phase_deadline if times else self.deadline
            if time.perf_counter() + estimate > limit:
                self.notes.append(f"{name}: stopped after {len(times)} of {reps} timed repetitions "
                                  f"(time budget; {self.left():.0f} s left)")
                break
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        if not times:
            self.notes.append(f"{name}: no time for a timed repetition; the warm-up time ({warm:.2f} s, "
                              "which includes one-off costs) stands in")
        seconds = float(np.median(times)) if times else warm
        return seconds, {"reps": len(times), "times_s": times, "warmup_s": warm}, out

    def sample(self, version: int = 0):
        from rlds.policy.sampling import sample_trajectories

        return sample_trajectories(self.policy, self.prompts, self.sampling_cfg,
                                   seeds=self.seeds.integers(2**62, size=self.batch_size), policy_version=version,
                                   prompt_ids=np.arange(self.batch_size), sample_ids=np.arange(self.batch_size),
                                   dtype=self.dtype)

    def learn(self, traj):
        from rlds.algo.advantages import compute_advantages
        from rlds.algo.ppo import ppo_update

        rewards = self.rewards.normal(size=len(traj))  # stands in for a reward model's scores
        advantages = compute_advantages(rewards, "batch", self.algo_cfg.advantage_clip, traj.prompt_ids)
        return ppo_update(self.policy, [traj], [advantages], self.optimizer, self.algo_cfg, self.update_rng,
                          dtype=self.dtype)

    # ------------------------------------------------------------------ stages

    def build(self) -> None:
        """The models, the optimizer, the configs and the versions of what runs them."""
        import diffusers
        import torch
        import transformers

        from rlds.algo.ppo import make_optimizer
        from rlds.config import AlgoConfig, SamplingConfig
        from rlds.policy.builder import build_policy

        self.result.update({
            "device": self.device_name, "torch": torch.__version__, "cuda": torch.version.cuda if self.cuda else None,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peak_bf16_flops": self.peak, "paper_reference": PAPER_REFERENCE,
        })
        t0 = time.perf_counter()
        arch = tiny_bench_architecture() if self.tiny else sd2_architecture()
        if not self.with_vae:
            arch.vae = None
        policy = build_policy(arch, self.device)
        # The VAE decode is timed on its own: sampling returns latents, as the RL loop trains on them.
        self.vae, policy.vae = policy.vae, None
        if self.vae is not None:
            self.vae.requires_grad_(False).eval().to(memory_format=torch.channels_last)
        # what load_policy does for a full fine-tune, plus channels_last
        policy.text_encoder.requires_grad_(False).eval()
        policy.unet.requires_grad_(True).eval()
        policy.unet.to(memory_format=torch.channels_last)
        self.policy = policy
        self.sync()
        self.result["build_s"] = round(time.perf_counter() - t0, 2)
        self.sampling_cfg = SamplingConfig(num_steps=self.num_steps, eta=ETA, guidance_scale=GUIDANCE_SCALE)
        self.algo_cfg = AlgoConfig(batch_size=self.batch_size, timesteps_per_iteration=self.k)
        self.optimizer = make_optimizer([p for p in policy.unet.parameters() if p.requires_grad], self.algo_cfg)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(self.batch_size)]
        self.result["config"] = {
            "batch_size": self.batch_size, "num_steps": self.num_steps, "guidance_scale": GUIDANCE_SCALE,
            "eta": ETA, "timesteps_per_iteration": self.k, "optimizer": type(self.optimizer).__name__,
            "learning_rate": self.algo_cfg.learning_rate, "compute_dtype": str(self.dtype).replace("torch.", ""),
            "unet_weights_dtype": str(next(policy.unet.parameters()).dtype).replace("torch.", ""),
            "channels_last": True, "compile": bool(self.compile), "cudnn_benchmark": bool(self.cuda),
            "attention_processor": _attention_processor(policy.unet),
            "latent_shape": list(policy.latent_shape), "unet_params": _count_params(policy.unet),
            "text_encoder_params": _count_params(policy.text_encoder),
            "vae_params": _count_params(self.vae) if self.vae is not None else None,
            "time_budget_s": round(self.deadline - self.start, 2), "reps": self.reps,
        }

    def flops(self) -> None:
        """Model FLOPs of one guided UNet forward (the bench batch, doubled by guidance)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from rlds.policy.sampling import autocast, encode_prompts, guided_noise

        policy = self.policy
        with torch.no_grad():
            cond = encode_prompts(policy, self.prompts)
            uncond = encode_prompts(policy, [""])
            policy.scheduler.set_timesteps(self.num_steps, device=self.device)
            x = torch.randn((self.batch_size,) + policy.latent_shape, device=self.device)
            counter = FlopCounterMode(display=False)
            with counter, autocast(policy, self.dtype):
                guided_noise(policy, x, policy.scheduler.timesteps[0], cond, uncond, GUIDANCE_SCALE)
        forward = float(counter.get_total_flops())
        self.sampling_flops = self.num_steps * forward
        self.learner_flops = 3 * self.k * forward  # forward + backward ~ 3 forwards, one guided call per step
        self.result["flops"] = {
            "unet_forward": forward, "unet_forward_batch": 2 * self.batch_size,
            "unet_forward_per_image": forward / (2 * self.batch_size),
            "sampling_per_batch": self.sampling_flops, "learner_per_batch": self.learner_flops,
            "note": "one UNet forward at the guided batch (2 x batch_size), counted by "
                    "torch.utils.flop_counter; forward+backward = 3 x forward; the text encoder, the "
                    "DDIM arithmetic and the optimizer are not counted",
        }
        if not self.cuda:
            self.notes.append("on CPU the flop counter does not see fused CPU attention kernels: FLOPs are a floor")
        if self.compile:
            t0 = time.perf_counter()
            policy.unet.compile()  # in place: Policy and ppo_update keep the same module
            self.result["config"]["compile_call_s"] = round(time.perf_counter() - t0, 2)
            self.notes.append("torch.compile: the warm-up times include compilation (no_grad and grad graphs)")

    def sampling(self) -> None:
        self.reset_memory()
        sec, figures, self.trajectory = self.timed(self.sample, self.reps, 0.3, "sampling")
        achieved, mfu = _mfu(self.sampling_flops, sec, self.peak)
        self.result["sampling"] = {
            "seconds_per_batch": sec, "trajectories_per_s": self.batch_size / sec, "achieved_flops": achieved,
            "mfu": mfu, **figures, "peak_memory_gb": self.peak_memory_gb(),
            "what": f"sample_trajectories: {self.num_steps} DDIM steps (eta {ETA}), CFG {GUIDANCE_SCALE}, "
                    "text encoding, latents/log-probs copied to host numpy",
        }

    def learner(self) -> None:
        if self.left() <= 0:
            self.notes.append("learner: skipped (time budget spent)")
            return
        self.reset_memory()
        sec, figures, _ = self.timed(lambda: self.learn(self.trajectory), self.reps, 0.4, "learner")
        achieved, mfu = _mfu(self.learner_flops, sec, self.peak)
        self.result["learner"] = {
            "seconds_per_update": sec, "seconds_per_trained_step": sec / self.k,
            "trajectories_per_s": self.batch_size / sec, "achieved_flops": achieved, "mfu": mfu, **figures,
            "peak_memory_gb": self.peak_memory_gb(),
            "what": f"ppo_update: {self.k} trained denoising steps on one batch of {self.batch_size}, each a "
                    "guided forward+backward and an AdamW step over the full UNet",
        }

    def end_to_end(self) -> None:
        if "learner" not in self.result or self.left() <= 0:
            return
        need = self.result["sampling"]["seconds_per_batch"] + self.result["learner"]["seconds_per_update"]
        if self.left() <= need:  # the warm-up is one more real iteration
            self.notes.append("end_to_end: skipped (time budget spent)")
            return
        versions = iter(range(1, 10**6))
        self.reset_memory()
        sec, figures, _ = self.timed(lambda: self.learn(self.sample(next(versions))), max(1, self.reps - 1), 0.6,
                                     "end_to_end")
        achieved, mfu = _mfu(self.sampling_flops + self.learner_flops, sec, self.peak)
        self.result["end_to_end"] = {
            "seconds_per_iteration": sec, "trajectories_per_s": self.batch_size / sec, "achieved_flops": achieved,
            "mfu": mfu, **figures, "peak_memory_gb": self.peak_memory_gb(),
            "what": "sample a batch, then update on it (max_staleness 0 on one GPU); no reward model",
        }

    def vae_decode(self) -> None:
        """One VAE decode of the batch; not part of the RL loop timings."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        vae = self.vae
        if vae is None or self.left() <= 0:
            return
        latents = torch.randn((self.batch_size, vae.config.latent_channels) + tuple(self.policy.latent_shape[1:]),
                              device=self.device, dtype=next(vae.parameters()).dtype)

        @torch.no_grad()
        def decode():
            return vae.decode(latents / vae.config.scaling_factor).sample

        counter = FlopCounterMode(display=False)
        self.reset_memory()
        with counter:
            decode()
        flops = float(counter.get_total_flops())
        sec, figures, images = self.timed(decode, 1, 1.0, "vae_decode")
        achieved, mfu = _mfu(flops, sec, self.peak)
        self.result["vae_decode"] = {
            "seconds_per_batch": sec, "images_per_s": self.batch_size / sec, "flops": flops,
            "achieved_flops": achieved, "mfu": mfu, "image_shape": list(images.shape[1:]), "reps": figures["reps"],
            "peak_memory_gb": self.peak_memory_gb(),
            "what": f"one VAE decode of the batch ({'a tiny' if self.tiny else 'SD' + chr(39) + 's'} AutoencoderKL "
                    f"config, random weights, {str(latents.dtype).replace('torch.', '')}); not part of the "
                    "RL loop timings above",
        }

    def summary(self) -> None:
        e2e, paper = self.result.get("end_to_end"), PAPER_REFERENCE
        self.result["summary"] = {
            "sampling_trajectories_per_s": self.result["sampling"]["trajectories_per_s"],
            "learner_trajectories_per_s": self.result.get("learner", {}).get("trajectories_per_s"),
            "end_to_end_trajectories_per_s": e2e["trajectories_per_s"] if e2e else None,
            "end_to_end_mfu": e2e["mfu"] if e2e else None,
            "vs_paper_trajectories_per_s": (e2e["trajectories_per_s"] / paper["trajectories_per_s_per_gpu"]
                                            if e2e else None),
            "vs_paper_mfu": (e2e["mfu"] / paper["mfu"] if e2e and e2e["mfu"] is not None else None),
        }
        if self.peak is None:
            self.notes.append(f"no bf16 peak known for {self.device_name!r}: MFU is null (pass peak_flops to set one)")
        self.result["complete"] = all(key in self.result for key in ("sampling", "learner", "end_to_end"))

    STAGES = ("build", "flops", "sampling", "learner", "end_to_end", "vae_decode", "summary")

    def run(self) -> dict:
        for stage in self.STAGES:
            getattr(self, stage)()
            self.save()
        return self.result


def run_gpu_bench(tiny: bool = False, batch_size: int = 8, num_steps: int = 50, compile: bool = False,
                  time_budget_s: float = 420, reps: int = 3, vae: bool = True,
                  peak_flops: Optional[float] = None, out: Optional[str] = None) -> dict:
    """Time rlds' sampler and learner on SD2's UNet (random weights) on one GPU; a JSON-able dict.

    `tiny=True` runs the same code on CPU with rlds' tiny model (float32, as rlds runs on CPU).
    `out`: a JSON file rewritten after every stage, so that a run cut short still leaves numbers.
    """
    import torch

    threads = torch.get_num_threads()
    if tiny:
        torch.set_num_threads(1)  # as rlds' actors run on CPU (torch_threads: 1); robust on a busy machine
    try:
        return GpuBench(tiny, batch_size, num_steps, compile, time_budget_s, reps, vae, peak_flops, out).run()
    finally:
        torch.set_num_threads(threads)


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
