"""``--executor local``: a pool of slots on this machine. ``--parallel N`` runs at once (default: one per visible
GPU on CUDA, 1 on CPU), each with ``--gpus-per-run K`` GPUs of its own (``CUDA_VISIBLE_DEVICES``); a run of
``processes: P`` takes P slots (P x K GPUs). On CPU the N slots share the cores: each run gets ``cores / N`` torch
threads, set explicitly. A run that needs more slots than the machine has runs alone, on all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from peftlab.errors import UserError
from peftlab.sweep.executor import Executor, ExecutorOptions
from peftlab.sweep.jobs import EXECUTOR_ENV, JobResult, RunJob, start_process, stop_process


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (ids or UUIDs)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = torch.cuda.device_count()
    return listed[:count] if listed else [str(i) for i in range(count)]


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Started:
    job: RunJob
    proc: subprocess.Popen
    start: float
    units: list[str]


class LocalExecutor(Executor):
    """Slots on this machine: GPU ids on CUDA, anonymous CPU slots otherwise."""

    name = "local"

    def __init__(self, parallel: int, gpus_per_run: int, gpus: list[str], cores: int) -> None:
        self.parallel = parallel
        self.gpus_per_run = gpus_per_run
        self.gpus = gpus
        self.cores = cores
        # free units: K GPU ids per slot on CUDA, one token per slot on CPU
        self.free = list(gpus[:parallel * gpus_per_run]) if gpus else [f"cpu{i}" for i in range(parallel)]
        self.capacity = len(self.free)
        self.running: dict[str, _Started] = {}

    @classmethod
    def from_options(cls, options: ExecutorOptions, _slurm: dict[str, Any]) -> LocalExecutor:
        gpus = visible_gpus()
        per = options.gpus_per_run
        if per is not None and per < 1:
            raise UserError(f"--gpus-per-run {per}: expected 1 or more")
        if per is not None and per > len(gpus):
            raise UserError(f"--gpus-per-run {per}: only {len(gpus)} GPU(s) visible on this machine; lower it"
                            + ("" if gpus else " or drop it to run on CPU"))
        per = per or 1
        parallel = options.parallel if options.parallel is not None else max(1, len(gpus) // per)
        if parallel < 1:
            raise UserError(f"--parallel {parallel}: expected 1 or more runs at once")
        if gpus and parallel * per > len(gpus):
            raise UserError(f"--parallel {parallel} with --gpus-per-run {per} needs {parallel * per} GPUs; "
                            f"{len(gpus)} visible; lower --parallel to {max(1, len(gpus) // per)}")
        return cls(parallel, per, gpus, cpu_cores())

    @property
    def slots(self) -> int:
        return self.parallel

    def _units(self, job: RunJob) -> int:
        per_process = self.gpus_per_run if self.gpus else 1
        return min(job.processes * per_process, self.capacity)  # more than the machine has: all of it, alone

    def has_room(self, job: RunJob) -> bool:
        return self._units(job) <= len(self.free)

    def threads_for(self, processes: int) -> int | None:
        return max(1, self.cores // self.parallel)

    def submit(self, job: RunJob) -> int | None:
        units = [self.free.pop(0) for _ in range(self._units(job))]
        env = {EXECUTOR_ENV: self.name}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(units)
        proc = start_process(job, env)
        self.running[job.run_id] = _Started(job, proc, time.monotonic(), units)
        return proc.pid

    def wait(self, timeout_s: float) -> list[tuple[str, JobResult]]:
        deadline = time.monotonic() + timeout_s
        while True:
            ended = [(run_id, s) for run_id, s in self.running.items() if s.proc.poll() is not None]
            if ended or not self.running or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        out = []
        for run_id, started in ended:
            del self.running[run_id]
            self.free.extend(started.units)
            out.append((run_id, JobResult(started.proc.returncode, time.monotonic() - started.start)))
        return out

    def cancel_all(self) -> list[str]:
        for started in self.running.values():  # SIGINT to all first, so they stop in parallel
            if started.proc.poll() is None:
                started.proc.send_signal(signal.SIGINT)
        for started in self.running.values():
            stop_process(started.proc)
        ids = list(self.running)
        self.running.clear()
        return ids

    def describe(self) -> str:
        where = f"{self.gpus_per_run} GPU(s) each" if self.gpus else f"{self.threads_for(1)} torch thread(s) each"
        return f"local, {self.parallel} at once, {where}"
