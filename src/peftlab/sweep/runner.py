"""Running a sweep: each pending run in its own process, recorded in the store; the dry-run preview; estimates."""

from __future__ import annotations

import json
import re
import secrets
import signal
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab.baseline import CACHE_ENV as BASELINE_CACHE_ENV
from peftlab.config import RunConfig
from peftlab.errors import UserError
from peftlab.record import SWEEP_WALL_FILE, FailedRecord, RunRecord, atomic_write_text
from peftlab.sweep.executor import Executor, ExecutorOptions, build_executor
from peftlab.sweep.jobs import VISIBILITY_FILE, JobResult, RunJob
from peftlab.sweep.spec import LAUNCH_FIELDS, SweepRun, SweepSpec, load_sweep
from peftlab.sweep.store import SweepStore, now_iso

#: Rough estimate when no similar run has finished yet: overhead (load + evaluation) plus training tokens at an
#: assumed speed. Tokens per example: the task's ``tokens_per_example(cfg)``; examples: max_steps x batch, else
#: train_subset, else the dataset's known size. Unknown models: 20 tokens/s on CPU, 2000 on CUDA.
ROUGH_OVERHEAD_S = 30.0
ROUGH_TOKENS_PER_S = {"tiny-llama": 400.0, "tiny-mistral": 400.0, "smollm2-135m": 200.0, "minilm-l6": 1500.0}
#: Training-set sizes of the named datasets (hub copies), for rough estimates of runs without a subset.
KNOWN_TRAIN_SIZE = {"wikitext-2-raw-v1": ("tokens", 2_400_000), "sst2": ("examples", 67_349),
                    "alpaca-libre": ("examples", 2_802), "tatsu-lab/alpaca": ("examples", 52_002)}
#: Fields compared to find the most similar finished run, whose measured time then estimates a pending run.
SIMILARITY_FIELDS = ("dataset", "method", "r", "train_subset", "eval_subset", "max_steps", "epochs", "block_size",
                     "max_length", "batch_size", "grad_accum", "generation_subset", "max_new_tokens")


# --- the store against the spec ------------------------------------------------------------------------------
def check_store_matches(store: SweepStore, spec: SweepSpec) -> None:
    """Refuse a store written by a different sweep definition, saying which runs differ."""
    stored = store.get_meta("fingerprint")
    if stored is None or stored == spec.fingerprint:
        return
    old = {r.id: r.definition for r in store.rows()}
    new = {r.id: r.fields for r in spec.runs}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if json.dumps(old[k], sort_keys=True, default=str)
                     != json.dumps(new[k], sort_keys=True, default=str))
    diff = "; ".join(f"{what}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                     for what, ids in (("added", added), ("removed", removed), ("changed", changed)) if ids)
    raise UserError(f"{store.path} was written by a different sweep definition (fingerprint {stored}, this file "
                    f"gives {spec.fingerprint}; {diff or 'run order differs'}); use a new --output-dir")


def run_dir(out: Path, run_id: str) -> Path:
    """Where a run writes its files."""
    return out / "runs" / run_id


# --- time estimates --------------------------------------------------------------------------------------------
def rough_seconds(cfg: RunConfig) -> float | None:
    """A rough run time from the config alone (see ROUGH_* and KNOWN_TRAIN_SIZE); None when the training size is
    unknown."""
    from peftlab.tasks import TASKS

    per_example = TASKS[cfg.task].tokens_per_example(cfg)
    if cfg.max_steps:
        tokens = cfg.max_steps * cfg.batch_size * cfg.grad_accum * per_example
    elif cfg.train_subset:
        tokens = cfg.train_subset * cfg.epochs * per_example
    elif cfg.dataset in KNOWN_TRAIN_SIZE:
        unit, size = KNOWN_TRAIN_SIZE[cfg.dataset]
        tokens = size * cfg.epochs * (1 if unit == "tokens" else per_example)
    else:
        return None
    rate = ROUGH_TOKENS_PER_S.get(cfg.model)
    if rate is None:
        import torch

        rate = 2000.0 if torch.cuda.is_available() and cfg.device != "cpu" else 20.0
    return ROUGH_OVERHEAD_S + tokens / rate


#: A sweep folder's calibration: each row's run time projected from a short measured run on this machine
#: (``peftlab sweep SWEEP.yaml --calibrate --output-dir SWEEP_DIR`` writes it: :mod:`peftlab.sweep.calibrate`).
CALIBRATION_FILE = "calibration.json"


def row_key(fields: dict[str, Any]) -> str:
    """A run's row in a calibration: its sweep fields without the seed (seeds cost the same)."""
    return json.dumps({k: v for k, v in fields.items() if k != "seed"}, sort_keys=True, default=str)


def read_calibration(out: Path, shipped: Path | None = None) -> dict[str, float]:
    """Row key -> projected seconds from ``out/calibration.json``, else from ``shipped`` (the sweep file's
    ``calibration:``); empty when there is neither."""
    path = Path(out) / CALIBRATION_FILE
    if not path.is_file():
        if shipped is None:
            return {}
        path = Path(shipped)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        return {row_key(r["fields"]): float(r["seconds"]) for r in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a calibration file ({exc}); delete it or rerun "
                        "`peftlab sweep SWEEP.yaml --calibrate`") from None


def adopt_calibration(out: Path, shipped: Path | None) -> None:
    """Copy the sweep file's calibration into the sweep folder when it has none, so that the folder records what
    its estimates came from (the report compares them with the measured times)."""
    target = Path(out) / CALIBRATION_FILE
    if shipped is not None and not target.exists():
        read_calibration(out, shipped)  # a malformed file fails here, before it is adopted
        atomic_write_text(target, Path(shipped).read_text(encoding="utf-8"))


def estimate_seconds(cfg: RunConfig, finished: list[tuple[dict[str, Any], float, str]],
                     calibrated: float | None = None, row: str | None = None) -> tuple[float | None, str]:
    """(seconds, how), the first that applies: the mean measured time of finished runs of the same row (``row``:
    :func:`row_key`, i.e. other seeds), the row's calibrated projection, the measured time of the most similar
    finished run (same model and task, then the most fields of SIMILARITY_FIELDS in common; the mean over ties),
    :func:`rough_seconds`."""
    same_row = [wall for _, wall, key in finished if row is not None and key == row]
    if same_row:
        return statistics.fmean(same_row), "measured"
    if calibrated is not None:
        return calibrated, "calibrated"
    dumped = cfg.model_dump(mode="json")
    best, times = -1, []
    for config, wall, _ in finished:
        if config.get("model") != dumped["model"] or config.get("task") != dumped["task"]:
            continue
        score = sum(config.get(k) == dumped.get(k) for k in SIMILARITY_FIELDS)  # method fields may be absent
        if score > best:
            best, times = score, [wall]
        elif score == best:
            times.append(wall)
    if times:
        return statistics.fmean(times), "measured"
    return rough_seconds(cfg), "rough"


def _finished_times(store: SweepStore | None) -> list[tuple[dict[str, Any], float, str]]:
    """(config, wall seconds, row key) of every finished run in the store."""
    if store is None:
        return []
    return [(r.record().config, r.wall_s, row_key(r.definition)) for r in store.rows()
            if r.status == "done" and r.results and r.wall_s is not None]


# --- dry run ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreviewLine:
    """One run in a dry-run listing."""

    id: str
    status: str  # status in the store; 'new' without a row, 'interrupted' for 'running' with no sweep alive
    action: str  # 'run' | 'skip'
    estimate_s: float | None
    estimate_kind: str  # 'measured' | 'calibrated' | 'rough' | 'done'
    fields: dict[str, Any]


@dataclass(frozen=True)
class SweepPreview:
    """What a sweep would do now (``peftlab sweep --dry-run``)."""

    spec: SweepSpec
    output_dir: Path
    lines: list[PreviewLine]
    #: Runs at once (the executor's slots): the estimate is the makespan on that many slots.
    slots: int = 1

    @property
    def to_run(self) -> list[PreviewLine]:
        return [line for line in self.lines if line.action == "run"]

    @property
    def estimate_s(self) -> float:
        return parallel_seconds([line.estimate_s for line in self.to_run if line.estimate_s is not None], self.slots)

    @property
    def unknown_estimates(self) -> int:
        return sum(line.estimate_s is None for line in self.to_run)


def _todo(status: str, retry_failed: bool) -> bool:
    return status in ("new", "queued", "running", "interrupted") or (status == "failed" and retry_failed)


def preview_sweep(sweep_file: str | Path, output_dir: str | Path, retry_failed: bool = False,
                  slots: int = 1) -> SweepPreview:
    """Expand and validate the sweep and say what a run would do on ``slots`` runs at once, writing nothing."""
    spec = load_sweep(sweep_file)
    out = Path(output_dir)
    store = SweepStore.open(out, create=False, read_only=True) if (out / "sweep.sqlite").is_file() else None
    try:
        if store is not None:
            check_store_matches(store, spec)
        status = {r.id: r.status for r in store.rows()} if store else {}
        if not sweep_is_running(out):  # a row left 'running' by a sweep that was killed
            status = {k: "interrupted" if v == "running" else v for k, v in status.items()}
        finished = _finished_times(store)
        calibration = read_calibration(out, spec.calibration)
        lines = []
        for run in spec.runs:
            st = status.get(run.id, "new")
            if _todo(st, retry_failed):
                key = row_key(run.fields)
                seconds, kind = estimate_seconds(run.config, finished, calibration.get(key), key)
                lines.append(PreviewLine(run.id, st, "run", seconds, kind, run.fields))
            else:
                lines.append(PreviewLine(run.id, st, "skip", None, "done", run.fields))
    finally:
        if store is not None:
            store.close()
    return SweepPreview(spec, out, lines, slots)


# --- running --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """A progress event for the CLI to show: a run started or ended, or the sweep started or ended."""

    event: str  # 'sweep_start' | 'run_start' | 'run_end' | 'sweep_end'
    total: int
    done: int
    failed: int
    left: int
    elapsed_s: float
    eta_s: float | None
    run_id: str | None = None
    status: str | None = None
    detail: str = ""
    run_wall_s: float | None = None
    running: int = 0  # runs running now (several with a parallel executor)


@dataclass
class SweepOutcome:
    """What a sweep invocation did."""

    output_dir: Path
    total: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def sweep_is_running(out: Path) -> bool:
    """Whether a `peftlab sweep` process holds the folder's lock now."""
    import fcntl

    if not (out / "sweep.lock").is_file():
        return False
    with open(out / "sweep.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


@contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """One sweep process per output folder (the lock goes away with the process, even on SIGKILL)."""
    import fcntl

    fh = open(out / "sweep.lock", "a+")  # noqa: SIM115
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `peftlab sweep` is running on {out}; wait for it to finish or stop it") from None
        yield
    finally:
        fh.close()


def output_tail(log: Path, lines: int = 20) -> str:
    """The last lines of a run's output, without progress-bar redraws."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    parts = [p.rstrip() for p in re.split(r"[\r\n]+", text)]
    return "\n".join([p for p in parts if p.strip()][-lines:])


def failure_message(rdir: Path, returncode: int, tail: str) -> str:
    """The error of a failed run: failed.json's error, else the signal, else the last error line of its output."""
    failed = FailedRecord.read(rdir)
    if failed is not None and failed.error:
        return failed.error
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else \
            f"signal {-returncode}"
        hint = " (often the system running out of memory)" if returncode == -signal.SIGKILL else ""
        return f"the run's process was killed by {name}{hint}"
    lines = tail.splitlines()
    for line in reversed(lines):
        if line.startswith("peftlab: error:"):
            return line.removeprefix("peftlab: error:").strip()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line.strip()
    return f"exited with code {returncode}" + (f": {lines[-1].strip()}" if lines else " and no output")


def headline(record: RunRecord) -> str:
    """'perplexity 17.31' for a progress line."""
    value = record.headline()
    return f"{record.task.metric} {value:.4g}" if value is not None else ""


def _adoptable(rdir: Path, run: SweepRun) -> RunRecord | None:
    """The record of an interrupted run that actually finished with this run's config, else None."""
    from peftlab.config import defining_fields

    record = RunRecord.read_if_valid(rdir)
    if record is None:
        return None
    expected = run.config.model_dump(mode="json")
    if record.status == "done" and defining_fields(record.config) == defining_fields(expected):
        return record
    return None


def _kept_wall_s(rdir: Path) -> float | None:
    """The wall time a report kept beside an adopted run's results, else None (a run that finished when its sweep
    died has no measured wall time)."""
    try:
        wall = json.loads((rdir / SWEEP_WALL_FILE).read_text(encoding="utf-8"))["wall_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(wall) if isinstance(wall, (int, float)) and wall >= 0 else None


def _write_run_config(out: Path, run: SweepRun, threads: int | None) -> Path:
    path = out / "configs" / f"{run.id}.yaml"
    data = {**{k: v for k, v in run.fields.items() if k not in LAUNCH_FIELDS},
            "output_dir": str(run_dir(out, run.id).resolve()), "overwrite": True}
    if threads is not None and run.config.threads is None:  # the executor's share of the cores, set explicitly
        data["threads"] = threads
    data.setdefault("tracking_project", out.name)  # --- ecosystem: a sweep's runs share one tracker project
    atomic_write_text(path, f"# generated by `peftlab sweep` for run {run.id}\n"
                      + yaml.safe_dump(data, sort_keys=False))
    return path


def run_command(config_path: Path, processes: int = 1) -> list[str]:
    """The argument list that trains one run (never a shell string)."""
    extra = ["--processes", str(processes)] if processes > 1 else []
    return [sys.executable, "-m", "peftlab", "train", "--config", str(config_path), *extra]


def _job(out: Path, run: SweepRun, executor: Executor, token: str) -> RunJob:
    """The run as a job any executor can start: absolute paths on the shared folder, the sweep's environment."""
    out = out.resolve()
    threads = executor.threads_for(run.processes)
    config_path = _write_run_config(out, run, threads)
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           BASELINE_CACHE_ENV: str(out / "baselines")}  # runs of the sweep share their baseline evaluations
    if threads is not None:  # torchrun's ranks and libraries outside torch use the same share
        env["OMP_NUM_THREADS"] = str(threads)
    python_args = tuple(run_command(config_path, run.processes)[1:])  # each worker starts its own Python
    return RunJob(run.id, python_args, env, out / "logs" / f"{run.id}.log",
                  run_dir(out, run.id), out, token, run.processes, threads)


def _record_result(out: Path, run_id: str, result: JobResult, store: SweepStore) -> tuple[str, str]:
    """Store what a worker returned: done with the record, or failed with the reason. Returns (status, detail)."""
    rdir = run_dir(out, run_id)
    log = out / "logs" / f"{run_id}.log"
    tail = output_tail(log)
    code, wall = result.code, result.wall_s
    if result.error is not None:
        store.mark_failed(run_id, result.error, wall, code, tail)
        return "failed", result.error
    if code == 0 and RunRecord.exists(rdir):
        try:
            record = RunRecord.read(rdir)
        except UserError as exc:  # cut short or unreadable: the run failed, say why
            store.mark_failed(run_id, str(exc), wall, code, tail)
            return "failed", str(exc)
        store.mark_done(run_id, record, wall, code)
        return "done", headline(record)
    assert code is not None
    error = failure_message(rdir, code, tail) if code != 0 else "exited with code 0 but wrote no results.json"
    store.mark_failed(run_id, error, wall, code, tail)
    return "failed", error


def run_sweep(sweep_file: str | Path, output_dir: str | Path, retry_failed: bool = False,
              on_progress: Callable[[Progress], None] | None = None, executor: Executor | None = None) -> SweepOutcome:
    """Run every pending run of a sweep on ``executor`` (default: local, one at a time), recording each in the
    store. Only this process writes the store; the executor's workers write run folders and return statuses."""
    spec = load_sweep(sweep_file)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {str(out)!r} is a file; choose a folder")
    executor = executor or build_executor("local", ExecutorOptions(parallel=1))
    out.mkdir(parents=True, exist_ok=True)
    notify = on_progress or (lambda _p: None)
    try:
        with _exclusive_lock(out):
            token = secrets.token_hex(8)
            atomic_write_text(out / VISIBILITY_FILE, token)
            executor.start(out.resolve(), token)
            store = SweepStore.open(out)
            try:
                check_store_matches(store, spec)
                store.set_meta({"fingerprint": spec.fingerprint, "name": spec.name, "description": spec.description,
                                "sweep_file": str(spec.path.resolve()), "updated": now_iso()})
                store.add_runs([(r.id, r.fields) for r in spec.runs])
                store.requeue_interrupted()
                adopt_calibration(out, spec.calibration)
                return _run_pending(out, spec, store, retry_failed, notify, executor, token)
            finally:
                store.close()
    finally:
        executor.close()


def _run_pending(out: Path, spec: SweepSpec, store: SweepStore, retry_failed: bool,
                 notify: Callable[[Progress], None], executor: Executor, token: str) -> SweepOutcome:
    status = {r.id: r.status for r in store.rows()}
    todo = [r for r in spec.runs if _todo(status[r.id], retry_failed)]
    todo_ids = {r.id for r in todo}
    outcome = SweepOutcome(out, len(spec.runs), skipped=[r.id for r in spec.runs if r.id not in todo_ids])
    started = time.monotonic()

    def progress(event: str, **kw: Any) -> Progress:
        counts = store.counts()
        pending = [r for r in todo if store.row(r.id).status in ("queued", "running")]
        finished = _finished_times(store)
        calibration = read_calibration(out, spec.calibration)
        estimates = [estimate_seconds(r.config, finished, calibration.get(row_key(r.fields)), row_key(r.fields))[0]
                     for r in pending]
        eta = None if any(e is None for e in estimates) else parallel_seconds(estimates, executor.slots)
        return Progress(event, len(spec.runs), counts["done"], counts["failed"], len(pending),
                        time.monotonic() - started, eta, running=counts["running"], **kw)

    def finish(run_id: str, result: JobResult) -> None:
        state, detail = _record_result(out, run_id, result, store)
        outcome.ran.append(run_id)
        if state == "failed":
            outcome.failed[run_id] = detail
        notify(progress("run_end", run_id=run_id, status=state, detail=detail, run_wall_s=result.wall_s))

    notify(progress("sweep_start", detail=executor.describe()))
    queue = deque(todo)
    jobs: dict[str, RunJob] = {}
    in_flight: set[str] = set()
    try:
        while queue or in_flight:
            while queue:
                run = queue[0]
                if run.id not in jobs and _adopt(out, run, store, outcome, notify, progress):
                    queue.popleft()
                    continue
                job = jobs.get(run.id) or jobs.setdefault(run.id, _job(out, run, executor, token))
                if not executor.has_room(job):
                    break
                queue.popleft()
                notify(progress("run_start", run_id=run.id))
                store.mark_running(run.id, executor.submit(job))
                in_flight.add(run.id)
            for run_id, result in executor.wait(timeout_s=1.0):
                in_flight.discard(run_id)
                finish(run_id, result)
    except BaseException:  # Ctrl-C or any error in the sweep: stop the runs, put them back in the queue
        executor.cancel_all()
        for run_id in in_flight:
            store.mark_queued(run_id, "interrupted: the sweep was stopped while this run was running")
        raise
    outcome.counts = store.counts()
    outcome.failed.update({r.id: r.error or "" for r in store.rows() if r.status == "failed"})
    notify(progress("sweep_end"))
    return outcome


def _adopt(out: Path, run: SweepRun, store: SweepStore, outcome: SweepOutcome, notify: Callable[[Progress], None],
           progress: Callable[..., Progress]) -> bool:
    """Record a run that had already finished (its sweep died after it wrote results.json) without rerunning it."""
    rdir = run_dir(out, run.id)
    adopted = _adoptable(rdir, run)
    if adopted is None:
        return False
    store.mark_done(run.id, adopted, _kept_wall_s(rdir), None,
                    note="adopted: the run had finished when the sweep stopped")
    outcome.ran.append(run.id)
    notify(progress("run_end", run_id=run.id, status="done", detail="(finished before the sweep stopped)"))
    return True


def parallel_seconds(estimates: list[float], slots: int) -> float:
    """The makespan of runs on ``slots`` slots: their total divided by the slots, but never below the longest."""
    if not estimates:
        return 0.0
    return max(sum(estimates) / max(1, min(slots, len(estimates))), max(estimates))


# --- presentation helpers (strings only; the CLI prints them) ----------------------------------------------
def format_duration(seconds: float | None) -> str:
    """'1h02m', '3m05s', '42s', or '?'."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_progress(p: Progress) -> str:
    """One progress line for the terminal."""
    state = f"{p.done} done, {p.failed} failed, {p.left} left of {p.total} · ETA {format_duration(p.eta_s)}"
    if p.event == "sweep_start":
        return f"sweep ({p.detail}): {state}" if p.detail else f"sweep: {state}"
    if p.event == "run_start":
        return f"[{p.done + p.failed + p.running + 1}/{p.total}] {p.run_id}: running"
    if p.event == "run_end":
        took = f" in {format_duration(p.run_wall_s)}" if p.run_wall_s is not None else ""
        return f"[{p.done + p.failed}/{p.total}] {p.run_id}: {p.status}{took} {p.detail}".rstrip() + f" · {state}"
    return f"sweep finished in {format_duration(p.elapsed_s)}: {p.done} done, {p.failed} failed of {p.total}"


#: tqdm's own {remaining} is left out: the postfix carries the sweep's estimate instead.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]"


class ProgressBar:
    """``on_progress`` for the CLI: one tqdm bar over the runs to do (on stderr), whose ETA is the sweep's own
    estimate (measured times of similar finished runs, else the rough one) rather than tqdm's rate, with each
    progress line printed above it (on stdout)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, p: Progress) -> None:
        from tqdm.auto import tqdm

        if p.event == "sweep_start":
            self.bar = tqdm(total=p.left, desc="sweep", unit="run", dynamic_ncols=True, file=sys.stderr,
                            disable=not self.enabled, bar_format=BAR_FORMAT)
        line = format_progress(p)
        if self.bar is None:
            print(line, flush=True)
            return
        if p.event == "run_end":
            self.bar.update(1)
        self.bar.set_postfix_str(f"ETA {format_duration(p.eta_s)}", refresh=True)
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()
        if p.event == "sweep_end":
            self.bar.close()
            self.bar = None


def format_preview(preview: SweepPreview) -> str:
    """The dry-run listing: each run, its status and estimate, then the total."""
    width = max(len(line.id) for line in preview.lines)
    rows = [f"sweep {preview.spec.name!r}: {len(preview.lines)} runs, fingerprint {preview.spec.fingerprint}, "
            f"output {preview.output_dir}"]
    for line in preview.lines:
        est = (f"~{format_duration(line.estimate_s)} ({line.estimate_kind})" if line.action == "run" else "")
        rows.append(f"  {line.id:<{width}}  {line.status:<11}  {line.action:<4}  {est}".rstrip())
    known = len(preview.to_run) - preview.unknown_estimates
    estimate = f"estimated {format_duration(preview.estimate_s)}" if known else "no estimate"
    if known and preview.slots > 1:
        estimate += f" on {preview.slots} runs at once"
    if preview.unknown_estimates:
        estimate += (f"{' + ' if known else ''} {preview.unknown_estimates} run(s) with unknown training size (set "
                     "train_subset or max_steps)").replace("  ", " ")
    rows.append(f"{len(preview.to_run)} to run, {len(preview.lines) - len(preview.to_run)} to skip; {estimate}")
    return "\n".join(rows)
