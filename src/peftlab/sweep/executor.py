"""Where a sweep's runs start: the interface every executor implements, its options, and the registry.

An executor only decides where each run's process starts; every run is still ``python -m peftlab train --config
FILE`` (:func:`peftlab.sweep.runner.run_command`). The driver (:mod:`peftlab.sweep.runner`) asks an executor
whether a run fits now, submits it, waits for finished runs and records them in the store; on Ctrl-C or any error
it cancels every run the executor started. Executors: ``local`` (:mod:`~peftlab.sweep.local_executor`, a slot
scheduler on this machine), ``ray`` (:mod:`~peftlab.sweep.ray_executor`) and ``slurm``
(:mod:`~peftlab.sweep.slurm_executor`, through submitit).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.sweep.jobs import JobResult, RunJob

#: name -> "module:class"; imported only when chosen, so Ray and submitit stay optional.
EXECUTORS = {"local": "peftlab.sweep.local_executor:LocalExecutor",
             "ray": "peftlab.sweep.ray_executor:RayExecutor",
             "slurm": "peftlab.sweep.slurm_executor:SlurmExecutor"}
CLUSTER_EXTRA = "pip install 'peftlab[cluster]'"


@dataclass(frozen=True)
class ExecutorOptions:
    """The command line's executor settings (None: the executor's default)."""

    parallel: int | None = None
    gpus_per_run: int | None = None
    cpus_per_run: int | None = None
    ray_address: str | None = None
    #: submitit settings, merged over the sweep file's ``slurm:`` block.
    slurm: dict[str, Any] = field(default_factory=dict)


class Executor(ABC):
    """Starts runs somewhere and reports when they end. One instance serves one sweep invocation."""

    #: The name a run records in results.json (machine.executor).
    name = ""

    @property
    @abstractmethod
    def slots(self) -> int:
        """How many runs run at once (the ETA and the dry-run estimate divide by it)."""

    def start(self, sweep_dir: Path, token: str) -> None:
        """Connect and check that workers see ``sweep_dir`` (the driver wrote ``token`` there); UserError if not."""
        return None

    @abstractmethod
    def has_room(self, job: RunJob) -> bool:
        """Whether ``job`` can be submitted now (it is submitted only then)."""

    def threads_for(self, processes: int) -> int | None:
        """torch threads for a run of ``processes`` processes (None: the run's own choice)."""
        return None

    @abstractmethod
    def submit(self, job: RunJob) -> int | None:
        """Start ``job``; returns the run's process id when it runs on this machine."""

    @abstractmethod
    def wait(self, timeout_s: float) -> list[tuple[str, JobResult]]:
        """(run id, result) of the runs that ended, waiting up to ``timeout_s`` for at least one."""

    @abstractmethod
    def cancel_all(self) -> list[str]:
        """Stop every run still running; returns their ids."""

    def close(self) -> None:
        """Release what :meth:`start` acquired."""
        return None

    def describe(self) -> str:
        """'local, 2 at once' for progress lines."""
        return f"{self.name}, {self.slots} at once"


def build_executor(name: str, options: ExecutorOptions, sweep_slurm: dict[str, Any] | None = None) -> Executor:
    """The executor called ``name``, checked against this machine; UserError for an unknown name, bad options or
    a missing extra."""
    if name not in EXECUTORS:
        raise UserError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    module_name, cls_name = EXECUTORS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name).from_options(options, sweep_slurm or {})


def require(module: str, executor: str) -> Any:
    """Import an optional engine, or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--executor {executor} needs {module}, which is not installed; {CLUSTER_EXTRA}") from None
