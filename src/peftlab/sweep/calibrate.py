"""A sweep's time on this machine, measured: one short run per row, projected to the full runs
(``peftlab sweep SWEEP.yaml --calibrate --output-dir DIR``).

A row is a run of the sweep with its seed removed (:func:`~peftlab.sweep.runner.row_key`: seeds cost the same). For
each row, one ``peftlab train`` process with the row's config, but ``max_steps`` S, evaluation capped at E examples,
generation at G, and the baseline evaluation on (so each process evaluates twice). From its record and its
metrics.jsonl:

- train: the seconds per optimizer step after the first, times the full run's steps (its steps per epoch are
  ``S / epochs_trained`` exactly, packing included), plus the first step;
- evaluation: ``eval_time_s`` per evaluated example, times the full run's evaluation size (``eval_subset`` or the
  whole split, from the record's data counts), once after training, plus once per distinct (model, task, data,
  precision) for the shared baseline evaluation;
- generation (rows with ``generation_subset``): the first such row runs twice, with G and with 2G generations;
  the difference gives the seconds per generated example, applied to every generating row;
- the rest (process start, model load, writing files): wall time minus training and evaluation, as measured.

Writes ``DIR/calibration.json`` (each row's projected seconds, what ``--dry-run`` and the sweep's ETA read, plus the
measurements and the projection) and ``DIR/calibration.md`` (the table); the short runs and their logs go to
``DIR/calibration/``. A row measured there before is not measured again: delete that folder to measure afresh.
The projection assumes the machine is otherwise idle, as the sweep's own runs do.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from peftlab.baseline import CACHE_ENV as BASELINE_CACHE_ENV
from peftlab.config import RunConfig
from peftlab.errors import UserError
from peftlab.record import METRICS_FILE, RunRecord, atomic_write_text
from peftlab.sweep.runner import (
    CALIBRATION_FILE,
    failure_message,
    format_duration,
    output_tail,
    row_key,
    run_command,
    sweep_is_running,
)
from peftlab.sweep.spec import LAUNCH_FIELDS, SweepRun, load_sweep

#: The short runs' folder inside the sweep folder, and the measurements kept there for a rerun.
WORK_DIR = "calibration"
MEASURED_FILE = "measured.json"
TABLE_FILE = "calibration.md"


@dataclass(frozen=True)
class ShortRun:
    """How long each short run is: optimizer steps, evaluation examples, generations (G; 2G once)."""

    steps: int = 4
    eval_cap: int = 16
    generations: int = 2


@dataclass(frozen=True)
class Row:
    """One row of a sweep: its first seed's run, and how many runs (seeds) it stands for."""

    key: str
    run: SweepRun
    runs: int

    @property
    def config(self) -> RunConfig:
        return self.run.config


def sweep_rows(runs: list[SweepRun]) -> list[Row]:
    """The sweep's rows in run order (the first seed of each), with their run counts."""
    first: dict[str, SweepRun] = {}
    counts: dict[str, int] = {}
    for run in runs:
        key = row_key(run.fields)
        first.setdefault(key, run)
        counts[key] = counts.get(key, 0) + 1
    return [Row(key, run, counts[key]) for key, run in first.items()]


# --- one short run --------------------------------------------------------------------------------------------
def short_fields(row: Row, run_dir: Path, short: ShortRun, generations: int | None) -> dict[str, Any]:
    """The row's config fields, cut short: S steps, E evaluation examples, G generations, the baseline on."""
    fields = {k: v for k, v in row.run.fields.items() if k != "epochs" and k not in LAUNCH_FIELDS}
    fields.update({"max_steps": short.steps, "eval_before": True, "output_dir": str(run_dir), "overwrite": True,
                   "eval_subset": min(row.config.eval_subset or short.eval_cap, short.eval_cap)})
    if generations is not None:
        fields["generation_subset"] = generations
    return fields


def step_times(run_dir: Path) -> tuple[float, float]:
    """(seconds of the first optimizer step, mean seconds of each later one) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    times = [r["train_time_s"] for r in rows if "loss" in r and "train_time_s" in r]
    if not times:
        raise UserError(f"{run_dir / METRICS_FILE}: no training steps were logged; rerun with logging_steps: 1")
    return times[0], (times[-1] - times[0]) / max(1, len(times) - 1)


def measurement(record: RunRecord, wall_s: float, run_dir: Path, short: ShortRun, row: Row,
                generations: int | None) -> dict[str, Any]:
    """What projecting a row needs from its short run's record."""
    timing, evaluated = record.timing, record.data.eval
    timed = timing.epochs_trained and None not in (timing.train_time_s, timing.eval_time_s)
    if evaluated is None or not evaluated.used or not timed:
        raise UserError(f"{run_dir}: the short run's record lacks its evaluation counts or times; it cannot be "
                        "projected")
    first, later = step_times(run_dir)
    return {"wall_s": wall_s, "first_step_s": first, "step_s": later, "load_s": timing.load_time_s,
            "train_s": timing.train_time_s, "eval_s": timing.eval_time_s, "eval_used": evaluated.used,
            "eval_total": evaluated.total, "steps_per_epoch": short.steps / timing.epochs_trained,
            "generations": generations, "precision": record.model.precision,
            "train_subset": row.config.train_subset}


def measure(row: Row, work: Path, short: ShortRun, generations: int | None, env: dict[str, str]) -> dict[str, Any]:
    """Train a row's short run in its own process and read its record."""
    name = row.run.id.replace("/", "_") + ("" if generations is None else f"-g{generations}")
    run_dir, config = work / "runs" / name, work / "configs" / f"{name}.yaml"
    atomic_write_text(config, f"# generated by `peftlab sweep --calibrate` for row {row.run.id}\n"
                      + yaml.safe_dump(short_fields(row, run_dir, short, generations), sort_keys=False))
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # a fresh baseline cache per short run: each measures its own baseline evaluation, which the projection
    # counts (rows that share a baseline would otherwise find it cached and seem to evaluate once)
    env = {**env, BASELINE_CACHE_ENV: str(work / "baselines" / f"{name}-{time.time_ns()}")}
    start = time.monotonic()
    with open(log, "wb") as fh:
        code = subprocess.run(run_command(config), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env, check=False).returncode
    wall = time.monotonic() - start
    record = RunRecord.read_if_valid(run_dir)
    if code != 0 or record is None:
        raise UserError(f"calibration: the short run of {row.run.id} failed: "
                        f"{failure_message(run_dir, code, output_tail(log))} (log: {log})")
    return measurement(record, wall, run_dir, short, row, generations)


# --- projection -----------------------------------------------------------------------------------------------
def project(cfg: RunConfig, m: dict[str, Any], gen_s: float, generations: int) -> dict[str, float]:
    """A row's full run from its short run's measurement ``m``: train, evaluation and the rest, in seconds."""
    per_epoch = m["steps_per_epoch"]
    if cfg.train_subset and m.get("train_subset"):  # a kept measurement, re-projected onto a new training size
        per_epoch *= cfg.train_subset / m["train_subset"]
    total_steps = cfg.max_steps or round(per_epoch * cfg.epochs)
    train = m["first_step_s"] + m["step_s"] * (total_steps - 1)
    generated = generations if cfg.generation_subset else 0
    per_eval_example = max(0.0, m["eval_s"] / 2 - generated * gen_s) / m["eval_used"]
    eval_n = min(cfg.eval_subset or m["eval_total"], m["eval_total"])
    evaluation = per_eval_example * eval_n + (cfg.generation_subset or 0) * gen_s
    rest = m["wall_s"] - m["train_s"] - m["eval_s"]
    return {"train_s": train, "eval_s": evaluation, "rest_s": rest, "steps": total_steps,
            "run_s": train + evaluation + rest}


def baseline_key(cfg: RunConfig, precision: str | None) -> str:
    """Runs with the same key share one baseline evaluation (the sweep's baseline cache)."""
    return json.dumps([cfg.model, cfg.task, cfg.dataset, precision, cfg.eval_subset])


def calibration_rows(rows: list[Row], measured: dict[str, dict[str, Any]], gen_s: float,
                     generations: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """(calibration rows: fields and seconds per run, projection table, total seconds of the sweep). Each shared
    baseline evaluation is charged to the first row that needs it, spread over that row's runs."""
    calibration, table, baselines = [], [], {}
    for row in rows:
        p = project(row.config, measured[row.key], gen_s, generations)
        key = baseline_key(row.config, measured[row.key]["precision"])
        baseline = 0.0 if key in baselines else p["eval_s"]
        baselines.setdefault(key, p["eval_s"])
        table.append({"row": row.run.id, "runs": row.runs, **p, "total_s": row.runs * p["run_s"]})
        calibration.append({"fields": {k: v for k, v in row.run.fields.items() if k != "seed"},
                            "seconds": p["run_s"] + baseline / row.runs})
    total = sum(t["total_s"] for t in table) + sum(baselines.values())
    return calibration, table, total


def format_table(table: list[dict[str, Any]], total_s: float, gen_s: float) -> str:
    """The projection as a Markdown table and a summary line."""
    lines = ["| Row | Runs | Steps | Train (min) | Eval (min) | Other (min) | Per run (min) | All runs (min) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['row']} | {t['runs']} | {t['steps']} | {t['train_s'] / 60:.1f} | {t['eval_s'] / 60:.1f} "
              f"| {t['rest_s'] / 60:.1f} | {t['run_s'] / 60:.1f} | {t['total_s'] / 60:.1f} |" for t in table]
    runs = sum(t["runs"] for t in table)
    return "\n".join(lines) + (f"\n\nProjected: {format_duration(total_s)} for {runs} runs, shared baseline "
                               f"evaluations included; generation {gen_s:.2f} s per example.\n")


# --- the whole sweep ------------------------------------------------------------------------------------------
def _kept(work: Path) -> tuple[dict[str, dict[str, Any]], float]:
    """Measurements of an earlier calibration in this folder (row key -> measurement) and its generation rate."""
    path = work / MEASURED_FILE
    if not path.is_file():
        return {}, 0.0
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        return dict(kept["measured"]), float(kept["generation_s"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); delete {work} to measure every row again") from None


def measure_rows(rows: list[Row], work: Path, short: ShortRun,
                 say: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], float]:
    """Each row's measurement (kept ones reused) and the seconds per generated example; saved after each row."""
    measured, gen_s = _kept(work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for row in rows:
        if row.key in measured:
            continue
        generating = bool(row.config.generation_subset)
        say(f"calibrating {row.run.id} ...")
        measured[row.key] = measure(row, work, short, short.generations if generating else None, env)
        if generating and not gen_s:
            again = measure(row, work, short, 2 * short.generations, env)
            gen_s = max(0.0, (again["eval_s"] - measured[row.key]["eval_s"]) / 2 / short.generations)
        atomic_write_text(work / MEASURED_FILE, json.dumps({"measured": measured, "generation_s": gen_s}, indent=2))
    return measured, gen_s


def calibrate_sweep(sweep_file: str | Path, output_dir: str | Path, short: ShortRun | None = None,
                    say: Callable[[str], None] = print) -> Path:
    """Measure a sweep's rows on this machine and write ``output_dir/calibration.json``; returns its path."""
    from peftlab.precision import cpu_model_name

    short = short or ShortRun()
    spec = load_sweep(sweep_file)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {str(out)!r} is a file; choose a folder")
    if sweep_is_running(out):
        raise UserError(f"a `peftlab sweep` is running on {out}; calibrate when it has finished (its runs would "
                        "skew the measured times)")
    rows = sweep_rows(spec.runs)
    measured, gen_s = measure_rows(rows, out / WORK_DIR, short, say)
    calibration, table, total = calibration_rows(rows, measured, gen_s, short.generations)
    text = format_table(table, total, gen_s)
    atomic_write_text(out / TABLE_FILE, text)
    target = out / CALIBRATION_FILE
    atomic_write_text(target, json.dumps(
        {"measured_on": cpu_model_name(), "sweep_file": str(sweep_file), "short_run": asdict(short),
         "command": f"peftlab sweep {sweep_file} --calibrate --output-dir {out}", "rows": calibration,
         "projected": table, "generation_s": gen_s, "total_s": total}, indent=2, default=str) + "\n")
    say(text)
    return target


def cli_calibrate(sweep_file: str, output_dir: str) -> int:
    """``peftlab sweep SWEEP.yaml --calibrate``: calibrate, then say where the estimates now come from."""
    path = calibrate_sweep(sweep_file, output_dir)
    print(f"wrote {path}; `peftlab sweep {sweep_file} --dry-run --output-dir {output_dir}` now estimates from it")
    return 0
