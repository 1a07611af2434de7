"""Shared-memory weight slots, in one process (flocks are per open file, so one process can play
the writer and several readers)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from rlds.distributed.weight_slots import PREFIX, SlotReader, SlotWriter, make_directory, remove_directory

N = 1000


@pytest.fixture
def slots(tmp_path):
    directory = make_directory(str(tmp_path))
    yield directory
    remove_directory(directory)


def fill_with(value):
    def fill(out):
        out[:] = np.arange(N, dtype=np.float32) + value
    return fill


def test_a_version_reads_back_as_a_read_only_view_and_free_slots_are_reused(slots):
    writer, reader = SlotWriter(slots, N), SlotReader()
    first = writer.write(1, fill_with(1))
    values = reader.read(first, 1)
    assert values[5] == 6 and not values.flags.writeable
    second = writer.write(2, fill_with(2))  # the first slot is held and newest: a new one
    assert second != first
    assert reader.read(second, 2)[5] == 7
    assert writer.write(3, fill_with(3)) == first  # let go of, and no longer the newest
    assert len(list(slots.glob("slot-*"))) == 2


def test_a_slot_held_by_a_reader_is_never_rewritten(slots):
    writer, old, new = SlotWriter(slots, N), SlotReader(), SlotReader()
    held = old.read(writer.write(1, fill_with(1)), 1)
    for version in range(2, 6):
        path = writer.write(version, fill_with(version))
        assert new.read(path, version)[0] == version
    assert held[0] == 1 and held[-1] == N  # still version 1, whole
    assert len(list(slots.glob("slot-*"))) == 3  # the held one, the newest and one between


def test_a_reader_told_of_a_version_since_overwritten_gets_none(slots):
    writer, reader = SlotWriter(slots, N), SlotReader()
    path = writer.write(1, fill_with(1))
    writer.write(2, fill_with(2))
    assert writer.write(3, fill_with(3)) == path  # nobody held version 1
    assert reader.read(path, 1) is None
    assert reader.read(path, 3)[0] == 3


def test_a_write_that_fails_midway_leaves_a_slot_no_reader_takes_and_frees_its_lock(slots):
    writer, reader = SlotWriter(slots, N), SlotReader()
    path = writer.write(1, fill_with(1))
    writer.write(2, fill_with(2))

    def broken(out):
        out[:10] = -1
        raise RuntimeError("died mid-write")

    with pytest.raises(RuntimeError):
        writer.write(3, broken)  # into the first slot: not newest, not held
    assert reader.read(path, 1) is None  # half-written: its header says no version
    assert writer.write(3, fill_with(3)) == path  # the lock went with the failed write


def test_a_directory_of_a_dead_owner_is_removed_and_a_live_ones_kept(tmp_path):
    import socket

    host = socket.gethostname().replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = tmp_path / f"{PREFIX}{host}-{int(dead.stdout)}-abcd1234"
    kept = tmp_path / f"{PREFIX}{host}-{os.getpid()}-abcd1234"
    gone.mkdir()
    kept.mkdir()
    (gone / "slot-0").write_bytes(b"x")
    new = make_directory(str(tmp_path))
    assert not gone.exists() and kept.is_dir() and new.is_dir()
    assert make_directory(str(tmp_path / "no-such-dir")) is None
