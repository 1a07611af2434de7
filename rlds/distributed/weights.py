"""WeightStore: the newest trainable weights, in one place, as PublishedWeights (version, where).

The learner publishes; samplers pull when they see a newer version. Nobody pushes to a busy actor.
The store owns what it serves, so the weights outlive the learner rank that sent them and samplers
keep loading them while a failed learner group is rebuilt:
- a learner on the store's node writes each version straight into a shared-memory slot of the
  store's directory (rlds.distributed.weight_slots): one copy, from its parameters; readers on that
  node map the slot with no copy at all;
- a learner on another node sends the weights by value and the store puts them in the object store;
- a reader on another node gets a slot's version through the object store too: one put per version,
  made when first asked.
A single `ray.put` of a fresh 1.73 GB buffer ran at 0.9-2 GB/s here (page faults; 14-17 GB/s once
the object store's pages were in use), and the store owning the object meant a second put, so
publishing that way cost 3-7 memcpys. `rlds bench --parts weights` measures both ways.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import ray

from rlds.distributed.protocol import PublishedWeights
from rlds.distributed.weight_slots import SlotReader, SlotWriter, make_directory, remove_directory

log = logging.getLogger(__name__)


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self, shared_memory: bool = True):
        self.node, self.shared_memory = _node(), shared_memory
        self.directory = None  # made when a writer on this node first asks
        self.latest: Optional[PublishedWeights] = None
        self.remote_copy: Optional[PublishedWeights] = None  # the latest slot's version, by reference
        self.reader = SlotReader()

    def slot_directory(self, node: str) -> Optional[str]:
        """Where a writer on `node` puts its versions; None when it must send them by value."""
        if not self.shared_memory or node != self.node:
            return None
        if self.directory is None:
            self.directory = make_directory()
        return None if self.directory is None else str(self.directory)

    def publish(self, version: int, flat: Optional[np.ndarray] = None, slot: Optional[str] = None) -> None:
        """`flat`: the trainable weights as one array (rlds.policy.flatten_trainable), or `slot`: the
        path of the slot of this store's directory that holds them."""
        if version <= self.latest_version():
            raise ValueError(f"weights version {version} published after {self.latest_version()}")
        if (flat is None) == (slot is None):
            raise ValueError("publish takes the weights by value or a slot, one of the two")
        self.latest = PublishedWeights(version, flat=None if flat is None else ray.put(flat), slot=slot)

    def newer_than(self, version: int, node: Optional[str] = None) -> Optional[PublishedWeights]:
        """The newest weights if they are newer than `version`, else None; for a reader on `node`
        (None: anywhere), so a reader elsewhere never gets a slot it cannot map."""
        latest = self.latest
        if latest is None or latest.version <= version:
            return None
        if latest.slot is None or node == self.node:
            return latest
        if self.remote_copy is None or self.remote_copy.version != latest.version:
            values = self.reader.read(latest.slot, latest.version)  # a slot is never rewritten while newest
            self.remote_copy = PublishedWeights(latest.version, flat=ray.put(values))
            self.reader.release()
        return self.remote_copy

    def latest_version(self) -> int:
        return -1 if self.latest is None else self.latest.version

    def close(self) -> None:
        """Remove the slots (their memory goes when the last reader lets go)."""
        remove_directory(self.directory)
        self.directory, self.shared_memory = None, False


class WeightPublisher:
    """The publishing side, in learner rank 0: each version into a slot where it can, else by value."""

    def __init__(self, store):
        self.store = store
        self.directory = ray.get(store.slot_directory.remote(_node()))
        self.writer: Optional[SlotWriter] = None

    def publish(self, version: int, module) -> None:
        from rlds.policy import flatten_trainable, trainable_parameters, write_flat_trainable

        if self.directory is not None:
            if self.writer is None:
                self.writer = SlotWriter(self.directory, sum(p.numel() for _, p in trainable_parameters(module)))
            try:
                slot = self.writer.write(version, lambda out: write_flat_trainable(module, out))
            except OSError as e:  # no room in /dev/shm for another slot
                log.warning("publishing weights through the object store from now on: %s", e)
                self.writer.close()
                self.directory = self.writer = None
            else:
                ray.get(self.store.publish.remote(version, slot=slot))
                return
        # by value: the store puts (and so owns) them, and they outlive this process
        ray.get(self.store.publish.remote(version, flatten_trainable(module)))


class WeightLoader:
    """The loading side (a sampler, the validator, a rebuilt learner): the newest weights as an
    array, a view of shared memory where it can be, valid until the next `newer_than` or `release`."""

    def __init__(self, store):
        self.store, self.node = store, _node()
        self.slots = SlotReader()

    def newer_than(self, version: int) -> Optional[tuple[int, np.ndarray]]:
        """(version, weights) of the store's newest if newer than `version`, else None."""
        for _ in range(3):
            published = ray.get(self.store.newer_than.remote(version, self.node))
            if published is None:
                return None
            if published.slot is None:
                return published.version, ray.get(published.flat)
            values = self.slots.read(published.slot, published.version)
            if values is not None:
                return published.version, values
            # the slot was rewritten with an even newer version between the two calls: ask again
        return None

    def release(self) -> None:
        """The weights were copied: let the writer reuse their slot."""
        self.slots.release()
