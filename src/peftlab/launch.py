"""`peftlab train --processes N`: run the same command as N data-parallel processes, launched by torchrun.

The parent process validates the config and reads the raw data first (bad input still exits 2 with one line before
any process starts). It then runs torchrun's launcher as ``torch.distributed.run --standalone --nproc_per_node N
-m -- peftlab train ...``, with the same arguments minus ``--processes``: an argument list, never a shell string.
On CPU each process gets an equal share of the cores as its thread count, unless ``OMP_NUM_THREADS`` is already
set (gloo; see docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from peftlab.errors import UserError

LAUNCHED_ENV = "LOCAL_RANK"  # set by torchrun and accelerate in every process they start


def check_launch(processes: int) -> None:
    """Refuse a process count below 1, and --processes inside a process that a launcher already started."""
    if processes < 1:
        raise UserError(f"--processes {processes}: expected 1 or more")
    if LAUNCHED_ENV in os.environ:
        raise UserError("--processes: this process was already started by torchrun or accelerate launch; "
                        "drop --processes and let the launcher set the number of processes")


def strip_processes_flag(argv: Sequence[str]) -> list[str]:
    """The arguments without ``--processes N`` / ``--processes=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def threads_per_process(processes: int, cpu_count: int | None = None) -> int:
    """An equal share of the machine's cores for each process (at least one)."""
    cores = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else os.cpu_count() or 1)
    return max(1, cores // processes)


def torchrun_args(train_argv: Sequence[str], processes: int) -> list[str]:
    """torchrun's arguments for running ``peftlab train_argv`` on ``processes`` processes of this machine."""
    # "--" ends torchrun's own options: without it, argparse reads a train flag such as --r as an abbreviation of
    # torchrun's --rdzv-*/--role options and stops with "ambiguous option".
    return ["--standalone", "--nproc_per_node", str(processes), "-m", "--", "peftlab",
            *strip_processes_flag(train_argv)]


def torchrun_command(train_argv: Sequence[str], processes: int) -> list[str]:
    """The same as a command line: ``python -m torch.distributed.run ...``."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(train_argv, processes)]


def launch_train(train_argv: Sequence[str], processes: int, device_type: str) -> int:
    """Run ``peftlab train`` on several processes and return the first failed process's exit code (0 if none).

    torchrun runs in this process (its launcher API, not a shell): the ranks print their own output and errors, a
    rank's one-line error keeps its exit code (2 for bad input), and torchrun's own failure report is not added.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check_launch(processes)
    if device_type == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(processes)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = get_args_parser().parse_args(torchrun_args(train_argv, processes))
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # the ranks report their own errors
    try:
        run(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    finally:
        elastic_log.setLevel(level)
    return 0
