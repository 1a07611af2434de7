import os
import socket
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RLDS_CACHE"] = tempfile.mkdtemp(prefix="rlds-test-cache-")  # never the user's ~/.cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
