"""Resumable checkpoints without pickle.

`output/last/` (and `output/best/`) hold:
  adapter_config.json + adapter_model.safetensors  the adapter itself (PEFT format, or ours)
  trainable.safetensors     every trainable tensor by name (PEFT's adapter file can be lossy for
                            training: p-tuning saves the encoder OUTPUT, not the encoder)
  optimizer.safetensors     optimizer state tensors (`state.{i}.{key}`) + torch RNG state
  trainer_state.json        step, loss history, best metric, optimizer hyper-parameters, options
Only safetensors and JSON are ever read back, so a checkpoint directory that a user tampered with
cannot execute code (torch.load / pickle is never used).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or from an incompatible run."""


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors (for safetensors) and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(dest: Path, trainable, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write into a temp dir, then swap it in, so an interrupted save never leaves a half `dest`."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable.save(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.trainable_state().items()},
              str(tmp / TRAINABLE_FILE))
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    meta = dict(state, format=FORMAT_VERSION, optimizer=opt_meta)
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=str))
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(src: Path, trainable, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable tensors, optimizer state and RNG from `src`; return trainer_state."""
    if not (src / STATE_FILE).is_file():
        raise CheckpointError(f"no checkpoint to resume from: {src / STATE_FILE} not found")
    try:
        meta = json.loads((src / STATE_FILE).read_text())
        trainable_tensors = load_file(str(src / TRAINABLE_FILE))
        opt_tensors = load_file(str(src / OPTIMIZER_FILE))
    except Exception as exc:  # JSON / safetensors / OS errors all mean "unusable checkpoint"
        raise CheckpointError(f"corrupt checkpoint in {src}: {exc}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{src}: unsupported checkpoint format {meta.get('format')!r}")
    try:
        trainable.load_trainable_state(trainable_tensors)
    except ValueError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    rng = opt_tensors.pop("rng.torch", None)
    try:
        optimizer.load_state_dict(optimizer_from_flat(opt_tensors, meta["optimizer"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{src}: optimizer state does not match this run: {exc}") from None
    if rng is not None:
        torch.set_rng_state(rng)
    return meta
