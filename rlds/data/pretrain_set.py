"""The pretraining image-caption set (for L_pre and for pretraining the ShapesWorld model), as Parquet.

One row per example: `image` (PNG bytes), `caption` (string), and metadata (`kind`, `colours`,
`shapes`, `relation`, `named_colours`, `width`, `height`). Rows are written in row groups, so a reader
streams a large set group by group. `PretrainSet` needs only an image column and a caption column,
so it reads a real image-caption set (e.g. a LAION subset in Parquet, images as encoded bytes) the
same way; images of another size are centre-cropped and resized to `resolution`.
"""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rlds.data.shapes import KINDS, SIZE, caption, render, sample_scene, scene_kind

DEFAULT_KIND_WEIGHTS = {"single": 0.3, "relation": 0.3, "colour_free_single": 0.2, "colour_free_relation": 0.2}

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("kind", pa.string()),
    ("colours", pa.list_(pa.string())),
    ("shapes", pa.list_(pa.string())),
    ("relation", pa.string()),
    ("named_colours", pa.bool_()),
    ("width", pa.int16()),
    ("height", pa.int16()),
])


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # lossless: the reader gets the exact pixels back
    return buf.getvalue()


def examples(n: int, seed: int, bias: float = 0.85, bias_colour: str = "red",
             kind_weights: Optional[dict] = None) -> Iterator[tuple]:
    """(scene, image, caption) for the n examples of a set; the same arguments give the same examples."""
    weights = kind_weights or DEFAULT_KIND_WEIGHTS
    kinds = list(weights)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown caption kinds {sorted(unknown)}; ShapesWorld has {KINDS}")
    p = np.array([weights[k] for k in kinds], np.float64)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng, kinds[rng.choice(len(kinds), p=p / p.sum())], bias, bias_colour)
        yield scene, render(scene), caption(scene)


def write_pretrain_set(path: str | Path, n: int, seed: int = 0, bias: float = 0.85, bias_colour: str = "red",
                       kind_weights: Optional[dict] = None, row_group_size: int = 1024) -> Path:
    """Render n examples to one Parquet file, `row_group_size` rows per row group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"rlds.shapes": json.dumps({"n": n, "seed": seed, "bias": bias, "bias_colour": bias_colour,
                                       "kind_weights": kind_weights or DEFAULT_KIND_WEIGHTS})}
    rows = []
    with pq.ParquetWriter(path, SCHEMA.with_metadata(meta)) as writer:
        def flush():
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=row_group_size)
            rows.clear()

        for scene, image, text in examples(n, seed, bias, bias_colour, kind_weights):
            rows.append({"image": png_bytes(image), "caption": text,
                         "kind": scene_kind(scene),
                         "colours": [o.colour for o in scene.objects], "shapes": [o.shape for o in scene.objects],
                         "relation": scene.relation, "named_colours": scene.name_colours,
                         "width": SIZE, "height": SIZE})
            if len(rows) == row_group_size:
                flush()
        if rows:
            flush()
    return path


# `algo.pretrain_data: shapes`: the L_pre set of ShapesWorld runs. Only captions that name their colours:
# the colour-free ones carry the pretraining bias (85% red) that the fairness task removes, and an
# L_pre step on them would train the bias straight back in.
SHAPES_REGULARISER = {"n": 16384, "seed": 1, "kind_weights": {"single": 0.5, "relation": 0.5}}


def cache_dir() -> Path:
    """Where rlds keeps what it can rebuild: $RLDS_CACHE, default ~/.cache/rlds."""
    import os

    return Path(os.environ.get("RLDS_CACHE", Path.home() / ".cache" / "rlds"))


def check_pretrain_data(algo, fail) -> None:
    """algo.pretrain_data, when algo.pretrain_beta turns L_pre on."""
    if algo.pretrain_beta <= 0:
        return
    if not algo.pretrain_data:
        fail("algo.pretrain_data", "algo.pretrain_beta > 0 needs an image-caption Parquet file or folder "
             "(or `shapes`: the ShapesWorld set, written on first use)")
    if algo.pretrain_data != "shapes" and not Path(algo.pretrain_data).exists():
        fail("algo.pretrain_data", f"not found: {algo.pretrain_data}")


def regulariser_path(name: str) -> Path:
    """The file algo.pretrain_data names: `shapes` is ShapesWorld's own set, anything else a path."""
    return shapes_regulariser_set() if name == "shapes" else Path(name)


def shapes_regulariser_set() -> Path:
    """The ShapesWorld L_pre set, written on first use (~14 s) to the cache, and reused after.

    Every process that needs it may call this: the content is fixed, and the file appears atomically."""
    import os

    path = cache_dir() / "shapes_regulariser.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_pretrain_set(tmp, **SHAPES_REGULARISER)
        os.replace(tmp, path)
    return path


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (resolution, resolution):  # a real set: centre crop to a square, then resize
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


class PretrainSet:
    """Batches of (uint8 images [B, R, R, 3], captions) from one Parquet file or a folder of them.

    Shuffling is by seed and epoch: row groups in a random order, then rows shuffled within a window of
    `shuffle_groups` consecutive groups. One group (plus the window) is in memory at a time.
    """

    def __init__(self, path: str | Path, resolution: int = SIZE, image_column: str = "image",
                 caption_column: str = "caption", shuffle_groups: int = 2):
        path = Path(path)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet files")
        self.paths, self.files = files, [pq.ParquetFile(f) for f in files]
        self.resolution, self.shuffle_groups = resolution, max(1, shuffle_groups)
        self.columns = [image_column, caption_column]
        for name, f in zip(files, self.files):
            have = f.schema_arrow.names
            missing = [c for c in self.columns if c not in have]
            if missing:
                raise ValueError(f"{name}: missing column {missing[0]!r} of an image-caption set "
                                 f"(has {have}); name the columns with image_column= / caption_column=")
        self.groups = [(i, g) for i, f in enumerate(self.files) for g in range(f.num_row_groups)]

    def __len__(self) -> int:
        return sum(f.metadata.num_rows for f in self.files)

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[tuple[np.ndarray, list[str]]]:
        """One epoch of batches; every row appears once."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.groups)) if shuffle else np.arange(len(self.groups))
        images, captions = [], []
        for start in range(0, len(order), self.shuffle_groups):
            where = [self.groups[k] for k in order[start:start + self.shuffle_groups]]
            window = [self.files[f].read_row_group(g, columns=self.columns) for f, g in where]
            table = pa.concat_tables(window)
            rows = rng.permutation(table.num_rows) if shuffle else np.arange(table.num_rows)
            data, text = table.column(0).to_pylist(), table.column(1).to_pylist()
            for r in rows:
                try:
                    images.append(decode_image(data[r], self.resolution))
                except Exception as e:  # noqa: BLE001 (PIL raises several kinds)
                    raise ValueError(f"{self._row_name(where, window, r)}: its image does not decode "
                                     f"({type(e).__name__}: {e})") from e
                captions.append(text[r])
                if len(images) == batch_size:
                    yield np.stack(images), captions
                    images, captions = [], []
        if images and not drop_last:
            yield np.stack(images), captions

    def _row_name(self, where, window, r: int) -> str:
        """'FILE, row group G, row R' of row r of a window's concatenated table."""
        for (f, g), table in zip(where, window):
            if r < table.num_rows:
                return f"{self.paths[f]}, row group {g}, row {r}"
            r -= table.num_rows
        return f"row {r}"

    def stream(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Full batches forever, epoch after epoch (for the L_pre step), from batch number `start` on
        (a resumed run continues where the checkpoint's stream was)."""
        if len(self) < batch_size:
            raise ValueError(f"a pretraining set of {len(self)} rows cannot fill batches of {batch_size}")
        per_epoch = len(self) // batch_size
        epoch, skip = divmod(start, per_epoch)
        while True:
            yield from itertools.islice(self.batches(batch_size, seed, epoch, shuffle=True, drop_last=True), skip, None)
            epoch, skip = epoch + 1, 0
