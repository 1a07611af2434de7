"""Node-local shared-memory slots for published weights: one copy to publish, none to load.

A slot is a file in /dev/shm: a header (magic, version, size) and the flat float32 weights
(rlds.policy.flatten_trainable's layout). The writer holds an exclusive flock on a slot while it
writes, with the header's version at -1 until the data is whole. A reader holds a shared flock on
the slot its parameters are views of until it takes a newer one, so a slot is only rewritten when
nobody reads it. The writer never rewrites the newest slot (samplers are on their way to it) and
makes a new slot when every other is held: a run has as many slots as versions in use at once.
Slots are kept and rewritten, not made anew, so their pages are faulted in once per run, not once
per version. Locks die with their process, so a dead reader frees its slot and a writer that died
mid-write leaves a slot no reader takes. No Ray here: the WeightStore owns the directory.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import socket
import struct
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np

MAGIC = b"RLDSWTS1"
HEADER = struct.Struct("<8sqq")  # magic, version (-1 while written), values
DATA_OFFSET = 64  # the weights start cache-line aligned
PREFIX = "rlds-weights-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def make_directory(root: str = "/dev/shm") -> Optional[Path]:
    """A new slot directory under `root` (None where there is no such shared-memory file system).
    Removes the directories of owners on this host that died without removing theirs."""
    base = Path(root)
    if not base.is_dir() or not os.access(base, os.W_OK):
        return None
    host = socket.gethostname().replace("-", "_")
    for old in base.glob(f"{PREFIX}{host}-*"):
        try:
            pid = int(old.name.split("-")[3])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def remove_directory(path: Optional[Path]) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class _Slot:
    """One open slot file, mapped, in this process."""

    def __init__(self, path: Path, writable: bool):
        self.path = path
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                             mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))

    def header(self) -> tuple[int, int]:
        magic, version, values = HEADER.unpack_from(self.map, 0)
        if magic != MAGIC:
            raise ValueError(f"{self.path} is not a weights slot")
        return version, values

    def values(self, count: int) -> np.ndarray:
        return np.frombuffer(self.map, dtype=np.float32, count=count, offset=DATA_OFFSET)

    def lock(self, exclusive: bool, wait: bool = True) -> bool:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.fd, flags)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class SlotWriter:
    """The publishing side (learner rank 0): writes each version into a free slot of `directory`."""

    def __init__(self, directory: str | Path, numel: int):
        self.directory, self.numel = Path(directory), numel
        self.slots: dict[str, _Slot] = {}

    def write(self, version: int, fill: Callable[[np.ndarray], None]) -> str:
        """Write `version` by `fill(out)` (out: a writable float32 array of `numel` values in the
        slot); returns the slot's path. OSError when the file system has no room for another slot
        (the caller publishes through the object store instead)."""
        slot = self._free_slot()
        try:
            HEADER.pack_into(slot.map, 0, MAGIC, -1, self.numel)
            fill(slot.values(self.numel))
            HEADER.pack_into(slot.map, 0, MAGIC, version, self.numel)
        finally:
            slot.unlock()
        return str(slot.path)

    def _free_slot(self) -> _Slot:
        for name in sorted(p.name for p in self.directory.glob("slot-*")):
            if name not in self.slots:
                self.slots[name] = _Slot(self.directory / name, writable=True)
        versions = {name: slot.header()[0] for name, slot in self.slots.items()}
        newest = max(versions, key=versions.get) if versions else None
        for name, slot in self.slots.items():
            if name != newest and slot.lock(exclusive=True, wait=False):
                return slot
        return self._new_slot()

    def _new_slot(self) -> _Slot:
        name = f"slot-{len(self.slots)}"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # allocates every page now: a full file system fails here, not with SIGBUS mid-write
            os.posix_fallocate(fd, 0, DATA_OFFSET + 4 * self.numel)
            os.pwrite(fd, HEADER.pack(MAGIC, -1, self.numel), 0)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        os.close(fd)
        slot = _Slot(path, writable=True)
        slot.lock(exclusive=True)  # a new file: nobody else holds it
        self.slots[name] = slot
        return slot

    def close(self) -> None:
        for slot in self.slots.values():
            slot.map.close()
            os.close(slot.fd)
        self.slots.clear()


class SlotReader:
    """The loading side (a sampler): maps a slot and holds it until the next one is taken."""

    def __init__(self):
        self.slots: dict[str, _Slot] = {}
        self.held: Optional[_Slot] = None

    def read(self, path: str, version: int) -> Optional[np.ndarray]:
        """The weights of `version` in the slot at `path`, a read-only view valid until the next
        `read` or `release`; None when that slot has since been rewritten with another version
        (ask the store again)."""
        slot = self.slots.get(path)
        if slot is None:
            slot = self.slots[path] = _Slot(Path(path), writable=False)
        if slot is not self.held:
            slot.lock(exclusive=False)  # waits only while a writer fills it
        found, values = slot.header()
        if found != version:
            if slot is not self.held:
                slot.unlock()
            return None
        if self.held is not None and self.held is not slot:
            self.held.unlock()
        self.held = slot
        return slot.values(values)

    def release(self) -> None:
        if self.held is not None:
            self.held.unlock()
            self.held = None
