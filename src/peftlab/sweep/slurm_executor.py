"""``--executor slurm``: submitit's executor, one job-array task per run. Settings come from the sweep file's
``slurm:`` block, overridden by ``--slurm-partition``, ``--slurm-time`` (minutes), ``--slurm-gpus-per-task``,
``--slurm-cpus-per-task`` and ``--slurm-array-parallelism``. Each task runs :func:`peftlab.sweep.jobs.run_job`: it
checks that it sees the sweep folder, starts ``peftlab train --config`` and returns its status to the driver; the
SLURM allocation sets the visible GPUs. ``cluster: local`` (submitit's local executor: the same job code, no SLURM)
is for tests and for trying a sweep file on one machine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.sweep.executor import Executor, ExecutorOptions, require
from peftlab.sweep.jobs import EXECUTOR_ENV, JobResult, RunJob, run_job

#: The settings a ``slurm:`` block (or the command line) may give, and their types.
SLURM_SETTINGS = {"partition": str, "time": int, "gpus_per_task": int, "cpus_per_task": int,
                  "array_parallelism": int, "cluster": str}
DEFAULT_TIME_MIN = 24 * 60  # submitit's local executor would otherwise stop a job after 2 minutes
DEFAULT_ARRAY_PARALLELISM = 256  # submitit's default


def _slurm_run(job: RunJob) -> JobResult:
    return run_job(job, {EXECUTOR_ENV: "slurm"})


def check_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Unknown keys and wrong types in a ``slurm:`` block: one line naming the key."""
    for key, value in settings.items():
        if key not in SLURM_SETTINGS:
            raise UserError(f"{where}: unknown key {key!r}; expected {', '.join(SLURM_SETTINGS)}")
        kind = SLURM_SETTINGS[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise UserError(f"{where}: {key} must be {'a positive integer' if kind is int else 'a string'}, "
                            f"got {value!r}")
    if settings.get("cluster", "slurm") not in ("slurm", "local"):
        raise UserError(f"{where}: cluster must be slurm or local, got {settings['cluster']!r}")
    return settings


class SlurmExecutor(Executor):
    """Submits runs as one job array per batch of submissions; polls the jobs."""

    name = "slurm"

    def __init__(self, submitit: Any, settings: dict[str, Any]) -> None:
        self.submitit = submitit
        self.settings = settings
        self.cluster = settings.get("cluster", "slurm")
        self.parallelism = settings.get("array_parallelism", DEFAULT_ARRAY_PARALLELISM)
        self.executor: Any = None
        self.buffer: list[RunJob] = []
        self.running: dict[str, tuple[Any, float]] = {}  # run id -> (submitit job, start)

    @classmethod
    def from_options(cls, options: ExecutorOptions, sweep_slurm: dict[str, Any]) -> SlurmExecutor:
        given = {k: v for k, v in options.slurm.items() if v is not None}
        settings = check_settings({**sweep_slurm, **given}, "slurm settings")
        submitit = require("submitit", "slurm")
        if settings.get("cluster", "slurm") == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--executor slurm: no `sbatch` on PATH; run the sweep on a SLURM login node")
        return cls(submitit, settings)

    @property
    def slots(self) -> int:
        return self.parallelism

    def start(self, sweep_dir: Path, token: str) -> None:
        self.executor = self.submitit.AutoExecutor(folder=sweep_dir / "slurm" / "%j", cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.settings.get("time", DEFAULT_TIME_MIN),
                                  "name": f"peftlab-{sweep_dir.name}",
                                  "slurm_array_parallelism": self.parallelism}
        for key in ("partition", "gpus_per_task"):
            if key in self.settings:
                params[f"slurm_{key}"] = self.settings[key]
        if "cpus_per_task" in self.settings:
            params["cpus_per_task"] = self.settings["cpus_per_task"]
        self.executor.update_parameters(**params)

    def has_room(self, job: RunJob) -> bool:
        if self.cluster == "slurm":  # SLURM queues the array and throttles it (array_parallelism)
            return True
        return len(self.running) + len(self.buffer) < self.parallelism  # submitit's local executor does not

    def threads_for(self, processes: int) -> int | None:
        cpus = self.settings.get("cpus_per_task")
        return max(1, cpus // processes) if cpus else None

    def submit(self, job: RunJob) -> int | None:
        self.buffer.append(job)  # submitted together at the next wait(): one job array
        return None

    def _flush(self) -> None:
        if not self.buffer:
            return
        jobs, self.buffer = self.buffer, []
        with self.executor.batch():
            submitted = [self.executor.submit(_slurm_run, job) for job in jobs]
        for job, handle in zip(jobs, submitted, strict=True):
            self.running[job.run_id] = (handle, time.monotonic())

    def wait(self, timeout_s: float) -> list[tuple[str, JobResult]]:
        self._flush()
        deadline = time.monotonic() + timeout_s
        while True:
            ended = [run_id for run_id, (handle, _) in self.running.items() if handle.done()]
            if ended or not self.running or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        return [(run_id, self._result(run_id)) for run_id in ended]

    def _result(self, run_id: str) -> JobResult:
        handle, start = self.running.pop(run_id)
        try:
            return handle.result()
        except Exception as exc:  # the job died: killed, timed out, node failure, preempted
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else type(exc).__name__
            return JobResult(None, time.monotonic() - start,
                             error=f"the SLURM job {handle.job_id} did not finish ({type(exc).__name__}): "
                                   f"{reason}"[:400])

    def cancel_all(self) -> list[str]:
        ids = [job.run_id for job in self.buffer] + list(self.running)
        for handle, _ in self.running.values():
            handle.cancel(check=False)
        self.buffer, self.running = [], {}
        return ids

    def describe(self) -> str:
        return f"slurm ({self.cluster}), array parallelism {self.parallelism}"
