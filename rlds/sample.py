"""`rlds sample`: images from the base model or a checkpoint, with the loader training uses."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from tqdm import tqdm

from rlds.checkpoint import load_trainable_file
from rlds.config import Config
from rlds.policy import load_policy, sample_trajectories
from rlds.policy.sampling import eval_sampling


def read_prompts(prompts: str) -> list[str]:
    """A file of prompts (one a line), or the text of one prompt."""
    path = Path(prompts)
    if path.is_file():
        found = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not found:
            raise ValueError(f"--prompts {prompts}: the file holds no prompts")
        return found
    return [prompts]


def sample_images(config: Config, prompts: list[str], out: Path, checkpoint: Optional[str] = None,
                  seed: int = 0, num_per_prompt: int = 1, batch_size: int = 8, progress: bool = True) -> Path:
    policy = load_policy(config.model, "cuda" if torch.cuda.is_available() else "cpu")
    if checkpoint:
        load_trainable_file(policy.unet, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, seed + k) for p in prompts for k in range(num_per_prompt)]
    records = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="rlds sample", disable=not progress):
        chunk = jobs[start:start + batch_size]
        traj = sample_trajectories(policy, [p for p, _ in chunk], eval_sampling(config.sampling),
                                   seeds=[s for _, s in chunk])
        for i, ((prompt, s), image) in enumerate(zip(chunk, traj.images)):
            name = f"{start + i:05d}.png"
            Image.fromarray(image).save(out / name)
            records.append({"file": name, "prompt": prompt, "seed": s})
    with open(out / "images.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return out
