"""Atomic, pickle-free training checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the trainable weights, the optimizer and scheduler
state, the RNG states, the loop position and the metrics so far. Tensors are stored with safetensors and everything
else as JSON, so loading a checkpoint never unpickles anything. Each one is written to a temporary folder, fsynced,
then renamed into place: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.errors import ResourceError, UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
REQUIRED_FILES = (STATE_FILE, "trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (contiguous CPU copies)."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters()
            if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return tensors, {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(run_dir: Path, loop_state, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    cfg, keep_last: int, best: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically and prune old ones. Raises ResourceError when the disk is full."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop_state.step:07d}"
    tmp = root / f".tmp-step-{loop_state.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {"loop": asdict(loop_state), "scheduler": scheduler.state_dict(), "rng": rng_meta,
                 "config": cfg.model_dump(), "defining": cfg.defining_subset(), "best": best}
        (tmp / STATE_FILE).write_text(json.dumps(state, default=str))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        if not isinstance(exc, OSError):
            raise
        previous = newest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"disk full while writing checkpoint {final.name}; {kept}. Free space, then "
                                "rerun with --resume") from None
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def is_valid(folder: Path) -> bool:
    """A checkpoint is valid when every required file is present and its state parses."""
    if not folder.is_dir() or not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Valid checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if is_valid(p))


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints plus the one marked best; remove stale temporaries."""
    found = list_checkpoints(run_dir)
    best = _best_path(found)
    for old in found[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in checkpoint_root(run_dir).glob(".tmp-step-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def _best_path(found: list[Path]) -> Path | None:
    scored = []
    for path in found:
        best = json.loads((path / STATE_FILE).read_text()).get("best")
        if best and best.get("value") is not None:
            sign = -1.0 if best["higher_is_better"] else 1.0
            scored.append((sign * best["value"], path))
    return min(scored)[1] if scored else None


def resolve_resume(resume: str, run_dir: Path, allow_pickle: bool) -> Path:
    """The checkpoint folder to resume from: the newest valid one ('auto'), or a given checkpoint or run folder."""
    if resume == "auto":
        found = newest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"--resume: no valid checkpoint in {checkpoint_root(run_dir)}; train with --save-every N "
                            "to write checkpoints, or drop --resume")
        return found
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / STATE_FILE).is_file():
        found = newest_checkpoint(path)
        if found is not None:
            return found
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    if pickles and not allow_pickle:
        raise UserError(f"--resume {resume}: {pickles[0]} is a pickle file, and unpickling can run arbitrary code; "
                        "peftlab checkpoints use safetensors and JSON. Pass --allow-pickle only if you trust it")
    if not is_valid(path):
        raise UserError(f"--resume {resume}: not a valid peftlab checkpoint (needs {', '.join(REQUIRED_FILES)})")
    return path


def check_compatible(folder: Path, cfg) -> dict[str, Any]:
    """The checkpoint's state, after checking that it was made by an equivalent config."""
    state = json.loads((folder / STATE_FILE).read_text())
    theirs, ours = state["defining"], json.loads(json.dumps(cfg.defining_subset(), default=str))
    changed = sorted(k for k in ours if theirs.get(k) != ours[k])
    if changed:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours[k]!r}" for k in changed[:4])
        raise UserError(f"--resume: checkpoint {folder} was made with a different {', '.join(changed)} ({detail}); "
                        "resume with the same settings, or start a new run in another --output-dir")
    return state


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    state: dict[str, Any]) -> None:
    """Restore weights, optimizer, scheduler and RNG states in place."""
    weights = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise UserError(f"--resume: checkpoint {folder} has weights this model lacks ({missing[0]}); resume with "
                        "the same model and method")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    meta = json.loads((folder / "optimizer.json").read_text())
    _restore_optimizer(optimizer, load_file(folder / "optimizer.safetensors"), meta)
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(load_file(folder / "rng.safetensors"), state["rng"])
