"""Prompt sources of any size, streamed and sharded: no process ever holds the whole list.

A source is a prompt file (`FileSource`) or a generated set (`GeneratedSource`,
rlds.data.generated); either gives the prompts of a part one at a time (`prompts(part)`).

- Formats: text (one prompt a line, `#` comments), TSV with a header (PartiPrompts' `Prompt`
  column), Parquet (DiffusionDB's `metadata.parquet`, its `prompt` column), read with pyarrow a
  record batch at a time. `prompts.column` names another column.
- Split: a prompt's part (train | validation | heldout) is fixed by a hash of its text, with
  `prompts.heldout_share` and `prompts.validation_share`; it never moves when the file grows, and
  every process agrees on it without sharing state.
- Shards: sampler i of N streams the file and keeps the prompts whose hash mod N is i, so a prompt
  repeated anywhere in the file falls in one shard, where it is dropped after its first time (a set
  of 8-byte hashes: 16 MB for DiffusionDB's 1.8 M unique prompts over all shards).
- Order: epoch after epoch, shuffled through a buffer with a seed fixed by (seed, shard, epoch);
  `PromptShard.position` = (epoch, prompts drawn in it), and a shard made at a position continues
  exactly there. The trainer keeps each sampler's position in its checkpoints.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from rlds.data.generated import GeneratedArgs, iter_part, share_of

FORMATS = {".txt": "text", ".tsv": "tsv", ".parquet": "parquet"}
DEFAULT_COLUMN = {"tsv": "Prompt", "parquet": "prompt"}
READ_ROWS = 65536  # Parquet rows per record batch


@dataclass(frozen=True)
class FileSource:
    """`prompts.file` and how it is read and split."""
    path: str
    column: str = ""
    heldout_share: float = 0.0
    validation_share: float = 0.0

    @property
    def format(self) -> str:
        return FORMATS.get(Path(self.path).suffix.lower(), "text")

    def part(self, prompt: str) -> str:
        coin = share_of(prompt, "split")
        if coin < self.heldout_share:
            return "heldout"
        return "validation" if coin < self.heldout_share + self.validation_share else "train"

    def prompts(self, part: str) -> Iterator[str]:
        return (text for text in read_prompts(self) if self.part(text) == part)


@dataclass(frozen=True)
class GeneratedSource:
    """`prompts.generated`: a set made from class lists, already split by its own rule."""
    kind: str
    args: GeneratedArgs = GeneratedArgs()

    @property
    def path(self) -> str:  # what errors name
        return f"prompts.generated: {self.kind}"

    def prompts(self, part: str) -> Iterator[str]:
        return iter_part(self.kind, part, self.args)


def prompt_id(prompt: str) -> int:
    """A 63-bit id fixed by the text: per-prompt statistics of a streamed source key on it."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") >> 1


def read_prompts(source: FileSource) -> Iterator[str]:
    """Every non-empty prompt of the file in file order, streamed; duplicates included."""
    fmt = source.format
    if fmt == "parquet":
        import pyarrow.parquet as pq

        column = source.column or DEFAULT_COLUMN[fmt]
        f = pq.ParquetFile(source.path)
        if column not in f.schema_arrow.names:
            raise ValueError(f"{source.path}: no column {column!r} (columns: {', '.join(f.schema_arrow.names)}); "
                             "set prompts.column")
        for batch in f.iter_batches(batch_size=READ_ROWS, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text and text.strip():
                    yield text.strip()
    elif fmt == "tsv":
        column = source.column or DEFAULT_COLUMN[fmt]
        with open(source.path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{source.path}: line 1 has no column {column!r} (header: "
                                 f"{', '.join(reader.fieldnames or [])}); set prompts.column")
            for row in reader:
                text = (row.get(column) or "").strip()
                if text:
                    yield text
    else:
        with open(source.path) as f:
            for line in f:
                text = line.strip()
                if text and not text.startswith("#"):
                    yield text


def unique_prompts(source, part: str, index: int = 0, count: int = 1) -> Iterator[str]:
    """The prompts of `part` in shard `index` of `count`, each once, in the source's order."""
    seen: set[bytes] = set()
    for text in source.prompts(part):
        digest = hashlib.sha256(text.encode()).digest()
        if int.from_bytes(digest[8:16], "big") % count != index or digest[:8] in seen:
            continue
        seen.add(digest[:8])
        yield text


def first_prompts(source, part: str, limit: int) -> list[str]:
    """Up to `limit` prompts of `part`, in file order (a validation set, a held-out evaluation)."""
    out = []
    for text in unique_prompts(source, part):
        out.append(text)
        if len(out) == limit:
            break
    return out


class PromptShard:
    """One sampler's stream of a part of a file source (see the module docstring)."""

    def __init__(self, source: FileSource | GeneratedSource, part: str, index: int, count: int, seed: int,
                 position: tuple[int, int] = (0, 0), shuffle_buffer: int = 4096):
        self.source, self.part, self.index, self.count = source, part, index, count
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch, self.drawn = position
        self._stream = self._epoch_stream(self.epoch)
        for _ in range(self.drawn):
            next(self._stream)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.drawn

    def _epoch_stream(self, epoch: int) -> Iterator[str]:
        rng = np.random.default_rng([self.seed, self.index, self.count, epoch])
        buffer: list[str] = []
        for text in unique_prompts(self.source, self.part, self.index, self.count):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(text)
                continue
            k = int(rng.integers(len(buffer)))
            buffer[k], text = text, buffer[k]
            yield text
        rng.shuffle(buffer)
        yield from buffer

    def draw(self, k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            text = next(self._stream, None)
            if text is None:
                if self.drawn == 0:
                    raise ValueError(f"{self.source.path}: shard {self.index} of {self.count} has no "
                                     f"{self.part} prompts (too few prompts for {self.count} samplers, or "
                                     "prompts.heldout_share/validation_share take them all)")
                self.epoch, self.drawn = self.epoch + 1, 0
                self._stream = self._epoch_stream(self.epoch)
                continue
            out.append(text)
            self.drawn += 1
        return out
