"""Experiment trackers (``--report-to``): TensorBoard, MLflow, W&B and trackio, through accelerate's tracker API.

A run logs, to every tracker it names:

* the resolved config as hyperparameters (flattened, lists joined with commas);
* per logging step ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` (step = optimizer step);
* the evaluation metrics before training (``eval_before/<metric>``, step 0), after each epoch and at the end
  (``eval/<metric>``);
* the final results (``final/...``): train time, tokens/s, peak memory, trainable parameters.

The run's name in the tracker is its run id (the run directory's name); the experiment/project is
``tracking_project`` (``peftlab`` by default; a sweep sets its own name). Local logs go to ``tracking_dir``
(default ``<run dir>/tracking``): TensorBoard event files under ``tensorboard/<run id>``, MLflow's file store under
``mlruns`` (unless ``MLFLOW_TRACKING_URI`` is set), W&B's run folder under ``wandb``.

A tracker that fails (an unwritable folder, a server that went away) is reported once on stderr and then left
out; the run itself goes on and is recorded as usual.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import UserError

if TYPE_CHECKING:
    from peftlab.record import RunRecord

#: tracker name -> the module that must be importable for it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
EXTRA = "pip install 'peftlab[tracking]'"
DEFAULT_PROJECT = "peftlab"


def parse_report_to(value: Any) -> list[str]:
    """``none`` / ``all`` / a name / a comma list (or a YAML list) -> a validated list of names."""
    if value is None:
        return ["none"]
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    known = ("none", "all", *TRACKER_PACKAGES)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(known)}, or a comma list")
    if "none" in names and len(names) > 1:
        raise ValueError("'none' cannot be combined with other trackers")
    return names or ["none"]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKER_PACKAGES[name]) is not None


def resolve_trackers(report_to: list[str]) -> list[str]:
    """The trackers to start; a named tracker whose package is missing is a one-line error naming the extra."""
    if report_to in ([], ["none"]):
        return []
    if "all" in report_to:
        found = [name for name in TRACKER_PACKAGES if _installed(name)]
        if not found:
            raise UserError(f"--report-to all: no tracker package is installed; {EXTRA}")
        return found
    for name in report_to:
        if not _installed(name):
            raise UserError(f"--report-to {name}: the {TRACKER_PACKAGES[name]!r} package is not installed; {EXTRA}")
    return list(dict.fromkeys(report_to))


def _say(message: str) -> None:
    print(f"peftlab: warning: {message}", file=sys.stderr, flush=True)


def _safe_tracker_class():
    from accelerate.tracking import GeneralTracker

    class SafeTracker(GeneralTracker):
        """An accelerate tracker whose failures never reach the run: said once on stderr, then it goes quiet."""

        main_process_only = True
        requires_logging_directory = False

        def __init__(self, name: str, make) -> None:
            self.name = name
            self._make = make  # () -> the accelerate tracker, built at start() on the main process
            self.inner = None
            self.failed = False
            super().__init__()

        @property
        def tracker(self):
            return None if self.inner is None else self.inner.tracker

        def _guard(self, what: str, call, starting: bool = False) -> None:
            if self.failed or (self.inner is None and not starting):
                return  # failed before, or not the main process: nothing to do
            try:
                call()
            except Exception as exc:  # any tracker error: the run matters more than its tracker
                self.failed = True
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                _say(f"tracker {self.name} failed while {what} ({type(exc).__name__}: {detail}); it is turned off "
                     "for this run, training goes on")

        def start(self) -> None:
            from accelerate.state import PartialState

            if not PartialState().is_main_process:
                return  # only rank 0 logs

            def begin():
                inner = self._make()
                inner.start()
                self.inner = inner
            self._guard("starting", begin, starting=True)

        def store_init_configuration(self, values: dict) -> None:
            self._guard("storing the config", lambda: self.inner.store_init_configuration(values))

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self._guard("logging", lambda: self.inner.log(values, step=step, **kwargs))

        def finish(self) -> None:
            self._guard("finishing", lambda: self.inner.finish())

    return SafeTracker


def _factory(name: str, folder: Path, project: str, run_name: str):
    """A function that builds accelerate's tracker ``name`` logging under ``folder``."""
    from accelerate import tracking as acc

    def tensorboard():
        return acc.TensorBoardTracker(run_name, str(folder / "tensorboard"))

    def mlflow():
        import mlflow as mlf

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # The local default is mlflow's file store (mlflow-skinny has no SQL store); mlflow 3 refuses it unless
            # opted in. A server or sqlite URI in MLFLOW_TRACKING_URI is used as is.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlf.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        return acc.MLflowTracker(experiment_name=project, run_name=run_name)

    def wandb():
        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        return acc.WandBTracker(project, name=run_name, dir=str(folder / "wandb"))

    def trackio():
        return acc.TrackioTracker(project, name=run_name)

    return {"tensorboard": tensorboard, "mlflow": mlflow, "wandb": wandb, "trackio": trackio}[name]


def make_trackers(cfg, run_path: Path) -> list:
    """accelerate trackers (wrapped so they cannot fail the run) for ``cfg.report_to``; [] for none."""
    names = resolve_trackers(cfg.report_to)
    if not names:
        return []
    folder = Path(cfg.tracking_dir).expanduser() if cfg.tracking_dir else run_path / "tracking"
    project = cfg.tracking_project or DEFAULT_PROJECT
    safe = _safe_tracker_class()
    return [safe(name, _factory(name, folder, project, run_path.name)) for name in names]


def hyperparameters(cfg) -> dict[str, bool | int | float | str]:
    """The resolved config as flat scalar hyperparameters (None -> 'null', lists -> comma-joined)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in cfg.model_dump().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif value is None:
            value = "null"
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[key] = value
    return out


def start(accelerator, cfg, run_path: Path) -> None:
    """Attach and start the trackers ``cfg.report_to`` names, logging the config as hyperparameters."""
    trackers = make_trackers(cfg, run_path)
    if not trackers:
        return
    # The Accelerator exists before the run directory (and so the run's name) is known: hand it the trackers now.
    accelerator.log_with = trackers
    accelerator.init_trackers(cfg.tracking_project or DEFAULT_PROJECT, config=hyperparameters(cfg))


def _scalars(prefix: str, values: dict[str, Any] | None) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_step(accelerator, row: dict[str, Any]) -> None:
    """One logging step's training scalars."""
    if accelerator.trackers:
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch")
        accelerator.log(_scalars("train", {k: row.get(k) for k in keys}), step=int(row["step"]))


def log_eval(accelerator, metrics: dict[str, Any] | None, step: int, prefix: str = "eval") -> None:
    """Evaluation metrics (``eval_before`` at step 0, ``eval`` after epochs and at the end)."""
    if accelerator.trackers and metrics:
        accelerator.log(_scalars(prefix, metrics), step=step)


def log_results(accelerator, record: RunRecord) -> None:
    """The run's final figures (from its record) at the last step."""
    if not accelerator.trackers:
        return
    timing = record.timing
    final = {"train_time_s": timing.train_time_s, "tokens_per_s": timing.tokens_per_s,
             "load_time_s": timing.load_time_s, "eval_time_s": timing.eval_time_s,
             "peak_memory_gb": record.memory.headline_gb, "trainable_params": record.params.trainable_params,
             "final_train_loss": record.metrics.final_train_loss}
    step = int(timing.optimizer_steps or 0)
    accelerator.log({**_scalars("final", final), **_scalars("eval", record.metrics.after)}, step=step)


def finish(accelerator) -> None:
    """Close every tracker (flush files, end runs). Not accelerate's end_training: that also tears down the process
    group, which the caller may still need."""
    for tracker in list(getattr(accelerator, "trackers", []) or []):
        tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers = []
