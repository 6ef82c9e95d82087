"""The run directory and its records: resolved config, metrics.jsonl, results.json (or failed.json).

``results.json`` is written last and atomically, so its presence means the run finished. A run that fails writes
``failed.json`` instead. Schema version :data:`RESULTS_SCHEMA` is described in the README.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import UserError

RESULTS_SCHEMA = 1
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TRACKED_PACKAGES = ("peftlab", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                    "tokenizers", "safetensors", "numpy", "scikit-learn", "sacrebleu", "rouge-score")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old content or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the peftlab checkout that runs (with '+dirty' if it has local changes), if any."""
    here = Path(__file__).resolve().parent
    git = shutil.which("git")
    if git is None:
        return None
    try:
        commit = subprocess.run([git, "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run([git, "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def default_run_name(cfg) -> str:
    """runs/<model>-<task>-<method>[-r<r>a<alpha>]-<UTC time>."""
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.model).name or cfg.model)
    from peftlab.methods import get_method

    shape = get_method(cfg.method).run_id_part(cfg.method_fields())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{model}-{cfg.task}-{cfg.method}{shape}-{stamp}"


def reloadable_config(cfg) -> dict[str, Any]:
    """The resolved config (run fields and its method's fields only), so that `--config` accepts it again."""
    return cfg.model_dump(mode="json")


class RunDir:
    """A run's folder. Created before heavy work; results.json only appears when the run finishes."""

    def __init__(self, path: Path, is_writer: bool = True) -> None:
        self.path = path
        self.is_writer = is_writer

    @classmethod
    def open_for(cls, cfg, is_writer: bool = True, resuming: bool = False) -> RunDir:
        """Prepare the run directory, refusing to overwrite a finished run unless asked."""
        path = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / default_run_name(cfg)
        run = cls(path, is_writer)
        if (path / RESULTS_FILE).is_file() and not cfg.overwrite:
            raise UserError(f"output_dir {str(path)!r} already holds a finished run (results.json); pass "
                            "--overwrite to replace it, or choose another --output-dir")
        if path.exists() and not path.is_dir():
            raise UserError(f"output_dir {str(path)!r} is a file; choose a folder")
        if is_writer:
            path.mkdir(parents=True, exist_ok=True)
            stale = [RESULTS_FILE, FAILED_FILE] + ([] if resuming else [METRICS_FILE])
            for name in stale:
                (path / name).unlink(missing_ok=True)
            atomic_write_text(path / CONFIG_FILE, yaml.safe_dump(reloadable_config(cfg), sort_keys=False))
        return run

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl."""
        if not self.is_writer:
            return
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metrics.jsonl lines past a checkpoint's step (they are recomputed on resume)."""
        path = self.path / METRICS_FILE
        if not self.is_writer or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    kept.append(line)
            except ValueError:  # a line cut short by the crash
                continue
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def finish(self, results: dict[str, Any]) -> Path:
        """Write results.json (atomically, last)."""
        if self.is_writer:
            write_json(self.path / RESULTS_FILE, results)
        return self.path / RESULTS_FILE

    def fail(self, error: str, extra: dict[str, Any] | None = None) -> None:
        """Record a failed run: failed.json, never results.json."""
        if self.is_writer and self.path.is_dir():
            write_json(self.path / FAILED_FILE, {"status": "failed", "error": error,
                                                 "time": dt.datetime.now(dt.UTC).isoformat(),
                                                 **(extra or {})})


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """Load a finished run's results.json."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no results.json here; is it a finished peftlab run directory?")
    return json.loads(path.read_text(encoding="utf-8"))
