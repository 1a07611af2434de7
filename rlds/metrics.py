"""The run folder's record of training: metrics.jsonl, TensorBoard events, image grids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


class MetricsWriter:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["iteration"]
        for key, value in row.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_grid(images: np.ndarray, captions: list[str], path: Path, cell: int = 128, columns: int = 4) -> None:
    """Images (uint8 [N, H, W, 3]) in a grid, each with its caption underneath."""
    n = len(images)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    wrapped = [_wrap(caption, cell // 6) for caption in captions]
    text_h = 4 + 12 * max(len(lines) for lines in wrapped)  # room for the longest caption, whole
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for line, text in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + 12 * line), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines
