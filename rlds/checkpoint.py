"""Checkpoints: trainable weights and optimizer state in safetensors, the rest in JSON.

A checkpoint folder `checkpoints/iter_NNNNNN/` holds:
- `trainable.safetensors`: the trained parameters (the full UNet, or only the LoRA weights);
- `optimizer.safetensors`: AdamW's moments and step counts, one set or one a task (`algo.task_moments`),
  the hyper-parameters in its metadata;
- `state.json`: the iteration to continue from, the samples seen, the per-prompt statistics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save

from rlds.policy.pipeline import load_trainable_state_dict, trainable_state_dict


def trainable_bytes(module: torch.nn.Module) -> bytes:
    return save(trainable_state_dict(module))


def load_trainable_bytes(module: torch.nn.Module, data: bytes, where: str = "checkpoint") -> None:
    load_trainable_state_dict(module, load(data), where)


def optimizer_bytes(optimizers: list[torch.optim.Optimizer]) -> bytes:
    """Every optimizer's state in one file, its tensors under "<optimizer>/<param>.<name>"."""
    tensors, groups = {}, []
    for n, optimizer in enumerate(optimizers):
        sd = optimizer.state_dict()
        tensors.update({f"{n}/{idx}.{k}": torch.as_tensor(v).cpu().contiguous()
                        for idx, s in sd["state"].items() for k, v in s.items()})
        groups.append(sd["param_groups"])
    return save(tensors, metadata={"param_groups": json.dumps(groups)})


def load_optimizer_bytes(optimizers: list[torch.optim.Optimizer], data: bytes, where: str = "checkpoint") -> None:
    tensors = load(data)
    header_len = int.from_bytes(data[:8], "little")
    groups = json.loads(json.loads(data[8:8 + header_len]).get("__metadata__", {})["param_groups"])
    if len(groups) != len(optimizers):
        raise ValueError(f"{where}: its optimizer state holds {len(groups)} sets of AdamW moments and this run "
                         f"has {len(optimizers)} (algo.task_moments: one set shared, or one a task)")
    states: list[dict] = [{} for _ in optimizers]
    for key, value in tensors.items():
        if "/" not in key:
            raise ValueError(f"{where}: its optimizer state is in the format before per-task moments "
                             f"({key!r}); resume it with the rlds that wrote it")
        n, rest = key.split("/", 1)
        idx, name = rest.split(".", 1)
        states[int(n)].setdefault(int(idx), {})[name] = value
    for optimizer, state, group in zip(optimizers, states, groups):
        optimizer.load_state_dict({"state": state, "param_groups": group})


def save_checkpoint(folder: Path, trainable: bytes, optimizer: bytes, state: dict) -> Path:
    # Written aside, then renamed: a crash never leaves half a checkpoint under the final name.
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "trainable.safetensors").write_bytes(trainable)
    (tmp / "optimizer.safetensors").write_bytes(optimizer)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    tmp.rename(folder)
    return folder


def read_checkpoint(folder: str | Path) -> tuple[bytes, bytes, dict]:
    folder = Path(folder)
    missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder}: missing {', '.join(missing)}")
    return ((folder / "trainable.safetensors").read_bytes(), (folder / "optimizer.safetensors").read_bytes(),
            json.loads((folder / "state.json").read_text()))


def load_trainable_file(module: torch.nn.Module, folder: str | Path) -> None:
    path = Path(folder) / "trainable.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {folder}: no trainable.safetensors")
    load_trainable_state_dict(module, load_file(path), str(path))


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run folder's checkpoints with every file, oldest first (one being written is `iter_N.tmp`)."""
    found = sorted(Path(run_dir).glob("checkpoints/iter_*[0-9]"))
    return [f for f in found if all((f / n).is_file() for n in CHECKPOINT_FILES)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
