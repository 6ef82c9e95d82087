"""The run directory and its records: resolved config, metrics.jsonl, results.json (or failed.json).

``results.json`` is written last and atomically, so its presence means the run finished. A run that fails writes
``failed.json`` instead. :class:`RunRecord` (results.json) and :class:`FailedRecord` (failed.json) are the only code
that reads or writes those files; schema version :data:`RESULTS_SCHEMA` is described in the README.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftlab.errors import UserError

#: 2: the method section gains ``fields`` (the method's field values); schema-1 files are read and upgraded.
RESULTS_SCHEMA = 2
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EXAMPLES_FILE = "eval_examples.json"  # per-example evaluation values (peftlab.per_example)
#: A kept run's wall time in its sweep, beside its copied-back results (peftlab.report writes it, a sweep that
#: adopts the run reads it), so that the study's machine time survives the loss of the sweep folder.
SWEEP_WALL_FILE = "sweep_wall.json"
TRACKED_PACKAGES = ("peftlab", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                    "tokenizers", "safetensors", "numpy", "scikit-learn", "sacrebleu", "rouge-score")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old content or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per process, host and call: writers on different nodes of a shared filesystem never share a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
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

    from peftlab.precision import cpu_model_name, detect

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                            "cpu": cpu_model_name(), "cpu_native_bf16": detect("cpu").native_bf16,
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            # where a sweep ran it (peftlab.sweep.jobs sets the executor)
                            "host": socket.gethostname(), "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "executor": os.environ.get("PEFTLAB_EXECUTOR")}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def default_run_name(cfg) -> str:
    """runs/<model>-<task>-<method><what the method adds, e.g. -r8a16>-<UTC time>."""
    from peftlab.methods import get_method

    method = get_method(cfg.method)
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.model).name or cfg.model)
    shape = method.run_id_part(cfg.method_fields())
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
            run.clear_outcome()
            for name in [] if resuming else [METRICS_FILE, EXAMPLES_FILE]:
                (path / name).unlink(missing_ok=True)
            atomic_write_text(path / CONFIG_FILE, yaml.safe_dump(reloadable_config(cfg), sort_keys=False))
        return run

    def clear_outcome(self) -> None:
        """Remove an earlier attempt's results.json or failed.json (before the folder runs again)."""
        for name in (RESULTS_FILE, FAILED_FILE):
            (self.path / name).unlink(missing_ok=True)

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

    def finish(self, record: RunRecord) -> Path:
        """Write results.json (atomically, last)."""
        if self.is_writer:
            record.write(self.path)
        return self.path / RESULTS_FILE

    def fail(self, error: str, extra: dict[str, Any] | None = None) -> None:
        """Record a failed run: failed.json, never results.json."""
        if self.is_writer and self.path.is_dir():
            FailedRecord(error=error, time=dt.datetime.now(dt.UTC).isoformat(), **(extra or {})).write(self.path)


# --- the run record (results.json) -------------------------------------------------------------------------------
class Section(BaseModel):
    """A part of the record. Open-ended: keys this version does not name are kept (and written back)."""

    model_config = ConfigDict(extra="allow")


class ModelInfo(Section):
    name: str | None = None
    source: str | None = None  # the local folder (or hub id) the base was loaded from
    adapter_base: str | None = None  # the base as adapter_config.json names it: its hub id where known
    architecture: str | None = None
    dtype: str | None = None
    device: str | None = None
    precision: str | None = None  # fp32 | bf16-mixed | bf16-true (schema 2 records before it: absent)
    precision_reason: str | None = None  # e.g. "auto: CPU has avx512_bf16"


class MethodInfo(Section):
    """The method and its field values. ``r``/``alpha`` stay at the top (schema 1's keys) for other readers."""

    name: str | None = None
    summary: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)
    r: int | None = None
    alpha: int | float | None = None
    target_modules: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _schema1_fields(cls, data: Any) -> Any:
        # schema 1 had no `fields`: its r and alpha were the only method fields it recorded
        if isinstance(data, dict) and "fields" not in data and ("r" in data or "alpha" in data):
            data = {**data, "fields": {k: data[k] for k in ("r", "alpha") if k in data}}
        return data


class TaskInfo(Section):
    name: str | None = None
    metric: str | None = None
    higher_is_better: bool | None = None


class DataPart(Section):
    """One split as a task's info block reports it: blocks (clm) or examples."""

    source: str | None = None
    split: str | None = None
    fingerprint: str | None = None
    blocks_used: int | None = None
    blocks_total: int | None = None
    examples_used: int | None = None
    examples_total: int | None = None

    @property
    def used(self) -> int | None:
        return self.blocks_used if self.blocks_used is not None else self.examples_used

    @property
    def total(self) -> int | None:
        return self.blocks_total if self.blocks_total is not None else self.examples_total


class DataInfo(Section):
    train: DataPart | None = None
    eval: DataPart | None = None
    notes: list[str] = Field(default_factory=list)


class Params(Section):
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None


class Metrics(Section):
    before: dict[str, Any] | None = None
    after: dict[str, Any] = Field(default_factory=dict)
    per_epoch: list[dict[str, Any]] = Field(default_factory=list)
    final_train_loss: float | None = None
    history_tail: list[dict[str, Any]] | None = None


class Timing(Section):
    load_time_s: float | None = None
    train_time_s: float | None = None
    epoch_times_s: list[float] = Field(default_factory=list)
    epochs_trained: float | None = None
    time_per_epoch_s: float | None = None
    optimizer_steps: int | None = None
    tokens_trained: int | None = None
    tokens_per_s: float | None = None
    eval_time_s: float | None = None
    processes: int | None = None


class PhaseMemory(Section):
    cpu_peak_rss_gb: float | None = None
    cuda_max_allocated_gb: float | None = None
    cuda_max_reserved_gb: float | None = None
    rss_reset_ok: bool | None = None


class Memory(Section):
    load: PhaseMemory | None = None
    train: PhaseMemory | None = None
    train_per_process: list[PhaseMemory] = Field(default_factory=list)
    headline_gb: float | None = None
    headline_kind: str | None = None
    estimate: dict[str, Any] | None = None  # the planner's own dict (peftlab.plan)


class Artifact(Section):
    path: str | None = None
    kind: str | None = None  # "adapter" | "model"
    size_bytes: int | None = None


class Change(Section):
    """A difference (after - before) with its paired bootstrap interval."""

    estimate: float
    lo: float
    hi: float
    level: float = 0.95
    resamples: int | None = None

    @property
    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of zero (a significant change)."""
        return self.lo > 0 or self.hi < 0


class BenchmarkResult(Section):
    """One general-ability benchmark (lm-eval): its accuracies before and after training, and the forgetting
    (after - before per metric, with a paired bootstrap 95% interval over its items)."""

    items: int | None = None
    limit: int | None = None
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    forgetting: dict[str, Change] | None = None


class RunRecord(BaseModel):
    """A finished run's results.json. Every section is optional so that partial or older records still load;
    :meth:`to_dict` writes back exactly the keys that were set (plus nothing), so a read-write round trip keeps
    the file's shape."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: int = Field(default=RESULTS_SCHEMA, alias="schema")
    status: str | None = None
    run_dir: str | None = None
    started: str | None = None
    finished: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    model: ModelInfo = Field(default_factory=ModelInfo)
    method: MethodInfo = Field(default_factory=MethodInfo)
    task: TaskInfo = Field(default_factory=TaskInfo)
    data: DataInfo = Field(default_factory=DataInfo)
    params: Params = Field(default_factory=Params)
    metrics: Metrics = Field(default_factory=Metrics)
    timing: Timing = Field(default_factory=Timing)
    memory: Memory = Field(default_factory=Memory)
    artifact: Artifact | None = None
    sample: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    git_commit: str | None = None
    machine: dict[str, Any] = Field(default_factory=dict)
    resumed: bool | None = None
    resumed_from: str | None = None
    benchmarks: dict[str, BenchmarkResult] | None = None
    benchmark_time_s: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "schema" not in data:
            return data
        version = data["schema"]
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"schema {version!r} is not a results.json schema version")
        if version > RESULTS_SCHEMA:
            raise ValueError(f"schema {version} is newer than this peftlab reads (up to {RESULTS_SCHEMA})")
        return {**data, "schema": RESULTS_SCHEMA}  # schema 1 -> 2: MethodInfo maps r/alpha to fields

    # --- reading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "results") -> RunRecord:
        """A record from parsed JSON (a results.json or a sweep store's copy); bad content is a one-line error."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}; it is not a peftlab "
                            "results.json")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the record"
            message = first["msg"].removeprefix("Value error, ")
            fix = "upgrade peftlab" if "newer than" in message else "rerun the run or remove the folder"
            raise UserError(f"{source}: {where}: {message}; {fix}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "results") -> RunRecord:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UserError(f"{source} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}: "
                            "cut short or corrupted); rerun the run or remove the file") from None
        return cls.from_dict(data, source)

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        """Whether the folder holds a results.json (a finished run's, or one that a reader will refuse)."""
        return (Path(run_dir) / RESULTS_FILE).is_file()

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """Load a finished run's results.json (schema 1 or 2)."""
        path = Path(run_dir) / RESULTS_FILE
        if not path.is_file():
            raise UserError(f"{run_dir}: no results.json here; is it a finished peftlab run directory?")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def read_if_valid(cls, run_dir: str | Path) -> RunRecord | None:
        """The record, or None when there is none or it does not load (a sweep deciding whether to adopt a run)."""
        try:
            return cls.read(run_dir)
        except (UserError, OSError):
            return None

    # --- writing ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object: schema 1's keys (``schema`` included) plus additions; unset sections are left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def write(self, run_dir: str | Path) -> Path:
        """Write results.json atomically (readers see the old file or the whole new one)."""
        path = Path(run_dir) / RESULTS_FILE
        write_json(path, self.to_dict())
        return path

    # --- what readers ask ---------------------------------------------------------------------------------------
    def headline(self) -> float | None:
        """The task's headline metric after training."""
        value = self.metrics.after.get(self.task.metric) if self.task.metric else None
        return value if isinstance(value, int | float) else None

    def benchmark_change(self, name: str, metric: str = "acc") -> Change | None:
        """A benchmark's forgetting (after - before) in one metric, with its interval, or None."""
        result = (self.benchmarks or {}).get(name)
        return (result.forgetting or {}).get(metric) if result is not None else None

    def baseline_key(self) -> str | None:
        """The key of the shared baseline evaluation this run's "before" metrics came from (peftlab.baseline)."""
        key = (self.metrics.before or {}).get("baseline_key")
        return str(key) if key else None

    def metric(self, key: str, stage: str = "after") -> float | None:
        """A numeric metric of the 'before' or 'after' evaluation, or None."""
        values = self.metrics.after if stage == "after" else (self.metrics.before or {})
        value = values.get(key)
        return value if isinstance(value, int | float) else None


class FailedRecord(BaseModel):
    """failed.json: why a run stopped (``error``, one line) and when; extra keys (e.g. the step) are kept."""

    model_config = ConfigDict(extra="allow")

    status: str = "failed"
    error: str
    time: str | None = None

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FAILED_FILE
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> FailedRecord | None:
        """The failure record, or None when there is none or it does not load (a crash may cut it short)."""
        path = Path(run_dir) / FAILED_FILE
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
