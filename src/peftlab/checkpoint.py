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
        # this process's GPU only: a rank that saved every visible GPU's state could not resume on fewer GPUs
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return tensors, {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        # earlier checkpoints saved every visible GPU's state ("torch_cuda_<i>"): take this GPU's
        state = tensors.get("torch_cuda", tensors.get(f"torch_cuda_{torch.cuda.current_device()}"))
        if state is not None:
            torch.cuda.set_rng_state(state)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _state_json(loop_state, scheduler, cfg, best: dict[str, Any] | None, rng: dict[str, Any] | None,
                fmt: str, processes: int) -> str:
    return json.dumps({"loop": asdict(loop_state), "scheduler": scheduler.state_dict(), "rng": rng,
                       "config": cfg.model_dump(), "defining": cfg.defining_subset(), "best": best,
                       "format": fmt, "processes": processes}, default=str)


def _disk_error(exc: OSError, run_dir: Path, name: str) -> None:
    previous = newest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise ResourceError(f"disk full while writing checkpoint {name}; {kept}. Free space, then "
                            "rerun with --resume") from None


def _publish(tmp: Path, final: Path) -> None:
    """fsync the written folder, then rename it into place (replacing a checkpoint of the same step)."""
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def save_checkpoint(run_dir: Path, loop_state, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    cfg, keep_last: int, best: dict[str, Any] | None = None, processes: int = 1) -> Path:
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
        (tmp / STATE_FILE).write_text(_state_json(loop_state, scheduler, cfg, best, rng_meta, "safetensors",
                                                  processes))
        _publish(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        if not isinstance(exc, OSError):
            raise
        _disk_error(exc, run_dir, final.name)
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def save_sharded_checkpoint(run_dir: Path, loop_state, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler, cfg, keep_last: int, best: dict[str, Any] | None, is_writer: bool,
                            processes: int, barrier) -> Path:
    """Every rank writes its shards (DCP) into one temporary folder; rank 0 then adds the loop state and renames
    the folder into place, so a crash at any point leaves the previous checkpoint as the newest valid one.
    A collective: every rank calls it; ``barrier`` synchronises them."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{loop_state.step:07d}"
    tmp = root / f".tmp-step-{loop_state.step:07d}-sharded"  # one name for every rank (not a pid)
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write_sharded_state(tmp, model, optimizer)
        barrier()
        if is_writer:
            (tmp / STATE_FILE).write_text(_state_json(loop_state, scheduler, cfg, best, None, "dcp", processes))
            _publish(tmp, final)
    except OSError as exc:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        _disk_error(exc, run_dir, final.name)
        raise
    if is_writer:
        prune_checkpoints(run_dir, keep_last)
    barrier()
    return final


def is_valid(folder: Path) -> bool:
    """A checkpoint is valid when its state parses and every file its format requires is present."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if state.get("format") == "dcp":
        return sharded_files_present(folder, int(state.get("processes", 1)))
    return all((folder / name).is_file() for name in REQUIRED_FILES)


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
        raise UserError(f"--resume {resume}: not a valid peftlab checkpoint (needs {STATE_FILE} and the weights, "
                        "optimizer and RNG files of its format)")
    return path


def check_compatible(folder: Path, cfg) -> dict[str, Any]:
    """The checkpoint's state, after checking that it was made by an equivalent config."""
    from peftlab.config import RunConfig, field_default

    state = json.loads((folder / STATE_FILE).read_text())
    theirs, ours = state["defining"], json.loads(json.dumps(cfg.defining_subset(), default=str))
    for key in ours:  # a field added after the checkpoint was written had its default then
        if key not in theirs and key in RunConfig.model_fields:
            theirs[key] = field_default(key)
    changed = sorted(k for k in ours if theirs.get(k) != ours[k])
    if changed:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours[k]!r}" for k in changed[:4])
        raise UserError(f"--resume: checkpoint {folder} was made with a different {', '.join(changed)} ({detail}); "
                        "resume with the same settings, or start a new run in another --output-dir")
    return state


def check_processes(folder: Path, state: dict[str, Any], processes: int) -> None:
    """Refuse a checkpoint written by another number of processes: the global batch (batch_size x grad_accum x
    processes) and each rank's share of the data depend on it, so the run would not continue the same training."""
    theirs = state.get("processes")
    if theirs is not None and int(theirs) != processes:
        raise UserError(f"--resume: checkpoint {folder} was written by {theirs} process(es) and this run has "
                        f"{processes}; the global batch and data order depend on it. Resume with {theirs} "
                        "process(es), or start a new run in another --output-dir")


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    state: dict[str, Any]) -> None:
    """Restore weights, optimizer, scheduler and RNG states in place (either format; a sharded checkpoint is a
    collective: every rank calls this)."""
    if state.get("format") == "dcp":
        read_sharded_state(folder, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        return
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


# --- the sharded format (FSDP2): torch.distributed.checkpoint -------------------------------------------------

DCP_FOLDER = "dcp"
RNG_FOLDER = "rng"


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optimizer": optim_sd}


def write_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable weights and optimizer states, and its own RNG state, into
    ``folder`` (which rank 0 created). A collective."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    dcp.save(_training_state(model, optimizer), checkpoint_id=str(folder / DCP_FOLDER))
    (folder / RNG_FOLDER).mkdir(exist_ok=True)
    tensors, meta = _rng_state()
    save_file(tensors, folder / RNG_FOLDER / f"rank-{rank}.safetensors")
    (folder / RNG_FOLDER / f"rank-{rank}.json").write_text(json.dumps(meta))


def read_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load this rank's shards (DCP reads the parts each rank owns) and its RNG state. A collective."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder / DCP_FOLDER))
    # strict=False: the frozen base is not in the checkpoint (it is reloaded from the model); DCP's load above
    # already failed on any trainable tensor the checkpoint lacks.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    rank = dist.get_rank()
    _restore_rng(load_file(folder / RNG_FOLDER / f"rank-{rank}.safetensors"),
                 json.loads((folder / RNG_FOLDER / f"rank-{rank}.json").read_text()))


def sharded_files_present(folder: Path, processes: int) -> bool:
    """Whether a sharded checkpoint holds DCP's metadata and every rank's RNG state."""
    return (folder / DCP_FOLDER / ".metadata").is_file() and all(
        (folder / RNG_FOLDER / f"rank-{r}.{ext}").is_file() for r in range(processes)
        for ext in ("safetensors", "json"))
