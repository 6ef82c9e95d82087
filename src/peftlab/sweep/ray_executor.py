"""``--executor ray``: each run is one Ray task (``num_gpus`` = the run's GPUs, ``num_cpus`` = its CPUs) that starts
the same ``peftlab train --config`` process as every executor; Ray's GPU assignment (``ray.get_gpu_ids()``) sets
the run's ``CUDA_VISIBLE_DEVICES``. ``--ray-address auto | HOST:PORT`` joins a running cluster; without it, a local
Ray instance is started (and stopped at the end). Tasks are never retried by Ray (``max_retries=0``): a dead worker
is a failed run, which ``--retry-failed`` redoes."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.sweep.executor import Executor, ExecutorOptions, require
from peftlab.sweep.jobs import EXECUTOR_ENV, JobResult, RunJob, run_job, visibility_error


def _ray_run(job: RunJob) -> JobResult:
    """The Ray task: the run's process, with the GPUs Ray gave this task."""
    import ray

    env = {EXECUTOR_ENV: "ray"}
    gpus = ray.get_gpu_ids()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return run_job(job, env)


def _ray_check(sweep_dir: Path, token: str) -> str | None:
    return visibility_error(sweep_dir, token)


def _check_reachable(address: str) -> None:
    """A HOST:PORT that does not answer fails here in seconds, rather than in Ray's long connection retries."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected auto or HOST:PORT (the head node's GCS address)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                        "one with `ray start --head` or fix the address") from None


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address`` or start a local instance; True when this call started Ray (so it stops
    it). A Ray already initialised in this process (a test, a notebook) is used as it is."""
    if address not in (None, "auto"):
        _check_reachable(address)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--ray-address {address}: cannot connect to Ray ({first}); start a cluster with "
                        "`ray start --head` or fix the address") from None
    return True


class RayExecutor(Executor):
    """Runs as Ray tasks; at most as many at once as the cluster's CPUs and GPUs fit (or ``--parallel``)."""

    name = "ray"

    def __init__(self, ray: Any, started_ray: bool, gpus_per_run: int, cpus_per_run: int, slots: int) -> None:
        self.ray = ray
        self.started_ray = started_ray
        self.gpus_per_run = gpus_per_run
        self.cpus_per_run = cpus_per_run
        self._slots = slots
        self.running: dict[Any, tuple[RunJob, int, float]] = {}  # object ref -> (job, slots it holds, start)

    @classmethod
    def from_options(cls, options: ExecutorOptions, _slurm: dict[str, Any]) -> RayExecutor:
        for flag, value in (("--parallel", options.parallel), ("--gpus-per-run", options.gpus_per_run),
                            ("--cpus-per-run", options.cpus_per_run)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: expected 1 or more")
        ray = require("ray", "ray")
        started = connect(ray, options.ray_address)
        try:
            return cls._sized(ray, started, options)
        except BaseException:
            if started:
                ray.shutdown()
            raise

    @classmethod
    def _sized(cls, ray: Any, started: bool, options: ExecutorOptions) -> RayExecutor:
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        per_gpu = options.gpus_per_run if options.gpus_per_run is not None else (1 if gpus else 0)
        if per_gpu > gpus:
            raise UserError(f"--gpus-per-run {per_gpu}: the Ray cluster has {gpus} GPU(s); lower it")
        gpu_slots = gpus // per_gpu if per_gpu else math.inf
        if options.cpus_per_run is not None:
            per_cpu = options.cpus_per_run
        elif per_gpu:  # share the cluster's CPUs among its GPU slots
            per_cpu = max(1, cpus // int(gpu_slots))
        else:
            per_cpu = max(1, cpus // options.parallel) if options.parallel else 1
        if per_cpu > cpus:
            raise UserError(f"--cpus-per-run {per_cpu}: the Ray cluster has {cpus} CPU(s); lower it")
        slots = int(min(cpus // per_cpu, gpu_slots, options.parallel or math.inf))
        return cls(ray, started, per_gpu, per_cpu, max(1, slots))

    @property
    def slots(self) -> int:
        return self._slots

    def start(self, sweep_dir: Path, token: str) -> None:
        problem = self.ray.get(self.ray.remote(_ray_check).options(num_cpus=0).remote(sweep_dir, token))
        if problem is not None:
            raise UserError(problem)

    def _units(self, job: RunJob) -> int:
        return min(job.processes, self._slots)

    def has_room(self, job: RunJob) -> bool:
        return sum(units for _, units, _ in self.running.values()) + self._units(job) <= self._slots

    def threads_for(self, processes: int) -> int | None:
        return max(1, self.cpus_per_run // processes)

    def submit(self, job: RunJob) -> int | None:
        task = self.ray.remote(_ray_run).options(
            num_cpus=self.cpus_per_run * job.processes, num_gpus=self.gpus_per_run * job.processes,
            max_retries=0, retry_exceptions=False, name=f"peftlab-run-{job.run_id}")
        self.running[task.remote(job)] = (job, self._units(job), time.monotonic())
        return None

    def wait(self, timeout_s: float) -> list[tuple[str, JobResult]]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout_s)
        out = []
        for ref in ready:
            job, _units, start = self.running.pop(ref)
            try:
                out.append((job.run_id, self.ray.get(ref)))
            except self.ray.exceptions.RayError as exc:
                out.append((job.run_id, JobResult(None, time.monotonic() - start, error=_ray_failure(exc))))
        return out

    def cancel_all(self) -> list[str]:
        ids = []
        for ref, (job, _, _) in list(self.running.items()):
            self.ray.cancel(ref, force=True)  # kills the worker; the run's process dies with it (PDEATHSIG)
            ids.append(job.run_id)
        self.running.clear()
        return ids

    def close(self) -> None:
        if self.started_ray:
            self.ray.shutdown()

    def describe(self) -> str:
        gpus = f"{self.gpus_per_run} GPU(s) and " if self.gpus_per_run else ""
        return f"ray, {self._slots} at once, {gpus}{self.cpus_per_run} CPU(s) each"


def _ray_failure(exc: Exception) -> str:
    """One line for a run whose Ray task did not return: the worker died, the node died, the task was cancelled."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "died" in line.lower() or "crash" in line.lower()),
                  lines[0] if lines else "")
    return f"the Ray task did not finish ({type(exc).__name__}): {reason}"[:400]
