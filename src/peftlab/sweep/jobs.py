"""One run of a sweep as a job any executor can start: the command, its environment and files, and the code a
worker runs (start the run's process, wait for it, return its exit status). Workers never touch the store: they
write the run folder and the log, and return a :class:`JobResult` to the driver.

Everything here is plain data and module-level functions, so Ray and submitit can pickle a job to another process
or node.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Environment variables a run reads to record where it ran (``record.machine_info``).
EXECUTOR_ENV = "PEFTLAB_EXECUTOR"
#: A file the driver writes in the sweep folder; a worker that cannot read it does not share the folder.
VISIBILITY_FILE = ".sweep-token"


@dataclass(frozen=True)
class RunJob:
    """What a worker needs to start one run: all paths absolute, on the shared filesystem."""

    run_id: str
    #: Python's arguments (``-m peftlab train --config FILE``): the worker runs them with its own interpreter.
    python_args: tuple[str, ...]
    env: dict[str, str]
    log: Path
    run_dir: Path
    sweep_dir: Path
    token: str
    processes: int = 1
    threads: int | None = None


@dataclass(frozen=True)
class JobResult:
    """What a worker returns: the run's exit code (negative: killed by that signal), its wall time, where it ran;
    ``error`` when the run could not start or its worker died."""

    code: int | None
    wall_s: float | None
    host: str = field(default_factory=socket.gethostname)
    error: str | None = None


def die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: on Linux, the run's process gets SIGKILL when the process that started it dies (even by
    SIGKILL), so a killed sweep, Ray worker or SLURM job never leaves a run behind."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def hook() -> None:
        if libc is not None:
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return hook


def visibility_error(sweep_dir: Path, token: str) -> str | None:
    """None when this machine sees the driver's sweep folder (the token file it wrote), else the error."""
    try:
        seen = (sweep_dir / VISIBILITY_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        seen = None
    if seen == token:
        return None
    return (f"--output-dir {sweep_dir} is not visible from worker {socket.gethostname()} (its {VISIBILITY_FILE} is "
            f"{'missing' if seen is None else 'another sweep’s'}); put --output-dir on a filesystem every node shares")


def start_process(job: RunJob, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the run's process with its output in the log; the caller waits for it."""
    from peftlab.record import RunDir

    RunDir(job.run_dir).clear_outcome()
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **job.env, **(extra_env or {})}
    with open(job.log, "wb") as fh:
        return subprocess.Popen([sys.executable, *job.python_args], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent(os.getpid()))


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Ask a run to stop (SIGINT, as Ctrl-C would), then kill it if it has not stopped in ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_job(job: RunJob, extra_env: dict[str, str] | None = None) -> JobResult:
    """A worker's whole job (Ray task, SLURM array task): check the shared folder, run, wait, return the status.

    A SIGTERM (``scancel``, submitit's cancel, Ray's cancel) stops the run's process before the worker exits."""
    problem = visibility_error(job.sweep_dir, job.token)
    if problem is not None:
        return JobResult(None, None, error=problem)
    start = time.monotonic()
    proc = start_process(job, extra_env)

    def forward(signum, _frame) -> None:
        stop_process(proc)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} \
        if _is_main_thread() else {}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return JobResult(code, time.monotonic() - start)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
