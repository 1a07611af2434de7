"""One timer and one metric reduction, for every part that reports figures.

A key ending in `/min` reduces by the minimum, one ending in `/max` by the maximum, every other key
by the mean over the rows that have it. The same rule holds over the terms of one update, over the
tasks of an iteration and over the learner ranks, so a figure means the same wherever it is read.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Mapping


def reduce_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Many rows of figures into one (see the module docstring); keys come out sorted."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            values.setdefault(key, []).append(float(value))
    out = {}
    for key in sorted(values):
        v = values[key]
        out[key] = min(v) if key.endswith("/min") else max(v) if key.endswith("/max") else sum(v) / len(v)
    return out


@contextlib.contextmanager
def timer(key: str, into: dict) -> Iterator[None]:
    """Add the seconds the block takes to `into[key]` (created at 0), also when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - start
