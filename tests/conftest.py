import os
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RLDS_CACHE"] = tempfile.mkdtemp(prefix="rlds-test-cache-")  # never the user's ~/.cache


def processes_of(*markers: str) -> list[int]:
    """Pids of this machine's processes whose command line holds every marker (a private temp dir
    of a cluster a test started: its processes only, never anyone else's)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            line = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if all(m in line for m in markers) and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def free_ports(count: int) -> list[int]:
    """`count` distinct ports, free now. Each socket stays bound until all are picked: closed one at a
    time, the kernel may hand the same port out twice (CI drew one port for two of Ray's components)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance (never someone else's cluster), shut down after the module."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 60000})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    """A small, fast end-to-end config; tests override what they exercise."""
    from rlds.configure import load_config

    def make(*overrides, path="configs/tiny.yaml"):
        base = ("iterations=4", "sampling.num_steps=6", "algo.batch_size=8", "sampler.batch_size=4",
                "sampler.num_workers=2", "learner.num_workers=1", "algo.timesteps_per_iteration=2",
                "ray.actor_timeout_s=120", "sample_grid_every=2", "checkpoint_every=2")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return load_config(os.path.join(root, path), base + tuple(overrides))
    return make



@pytest.fixture(scope="session")
def tiny_owlv2(tmp_path_factory):
    """A random-weight OWLv2 detector (64 px, 16 boxes) saved as a user's model folder, loaded
    through the same from_pretrained path as the real one."""
    from rlds.bench.rewards import save_random_owlv2

    return str(save_random_owlv2(tmp_path_factory.mktemp("owlv2"), "tiny"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP (32 px) saved as a user's model folder."""
    from rlds.bench.rewards import save_random_clip

    return str(save_random_clip(tmp_path_factory.mktemp("clip"), "tiny"))


@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory):
    """A random-weight model in Stable Diffusion's layout (a VAE, 4-channel 8x8 latents, 64 px images)
    saved as a diffusers folder: the stand-in for SD in the real-image rewards' training runs."""
    import torch
    from diffusers import AutoencoderKL

    from rlds.config import TinyModelConfig
    from rlds.policy.builder import build_policy, tiny_architecture
    from rlds.policy.pipeline import save_policy

    torch.manual_seed(0)
    policy = build_policy(tiny_architecture(TinyModelConfig(sample_size=8, in_channels=4)))
    policy.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                               block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64)
    folder = tmp_path_factory.mktemp("sd")
    save_policy(policy, folder)
    return str(folder)
