"""A node removed without warning, on a Ray cluster of three nodes in this process's machine."""
import json
import threading
import time

import pytest

from rlds.metrics import read_metrics
from rlds.trainer import Trainer

pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=4) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_lost_without_warning_costs_only_its_work_in_flight(cluster, tiny_config, tmp_path):
    """The node holding the learner group goes (with whatever samplers and reward actors Ray put
    there): the group is rebuilt on the other node from the last checkpoint, lost samplers and reward
    actors are replaced, and every trajectory is accounted for."""
    import ray

    cluster, workers = cluster
    config = tiny_config(f"run_dir={tmp_path}", "iterations=10", "learner.num_workers=2", "checkpoint_every=2",
                         "replay.max_staleness=1", "ray.actor_timeout_s=240")
    trainer = Trainer(config, progress=False)
    removed = []

    def remove_the_learners_node():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (tmp_path / "checkpoints" / "iter_000002").is_dir():
            time.sleep(0.1)
        table = ray.util.placement_group_table(trainer.learners.pg)
        node_id = table["bundles_to_node_id"][0]
        node = next(w for w in workers if w.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node_id)

    thread = threading.Thread(target=remove_the_learners_node, daemon=True)
    thread.start()
    trainer.run()
    thread.join(timeout=5)
    assert removed
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert rows[-1]["restarts/learner"] >= 1
    books = json.loads((tmp_path / "accounting.json").read_text())
    assert books["balanced"] and books["dropped"]["learner_failed"] >= 8
