"""The study's budget, measured on this machine: one short run per row of a sweep file, projected to the full runs.

A row is a run of the sweep with its seed axis removed (seeds cost the same). For each row, one `peftlab train`
process with the row's config, but ``--max-steps S``, evaluation capped at E examples and generation at G, and the
baseline evaluation on (so each process evaluates twice). From its results.json and metrics.jsonl:

- train: the seconds per optimizer step after the first, times the full run's steps (its steps per epoch are
  ``S / epochs_trained`` exactly, packing included), plus the first step;
- evaluation: ``eval_time_s`` per evaluated example, times the full run's evaluation size (``eval_subset`` or the
  whole split, from results.json's data counts), once after training, plus once per distinct (model, task, data,
  precision) for the shared baseline evaluation;
- generation (rows with ``generation_subset``): the first such row runs twice, with G and with 2G generations;
  the difference gives the seconds per generated example, applied to every generating row;
- the rest (process start, model load, writing files): wall time minus training and evaluation, as measured.

    python benchmarks/study_budget.py configs/study.yaml --out runs/bench/study-budget

Writes OUT/results.json and OUT/results.md and prints the projected time per row and for the whole sweep. The
projection assumes the machine is otherwise idle, as the study's own runs do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import run_logged

from peftlab.sweep.runner import CALIBRATION_FILE

REPO = Path(__file__).resolve().parents[1]


def rows_of(sweep_file: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The sweep's rows (first seed of each) and how many runs each row stands for."""
    from peftlab.sweep.spec import load_sweep

    spec = load_sweep(sweep_file)
    rows: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for run in spec.runs:
        key = json.dumps({k: v for k, v in run.fields.items() if k != "seed"}, sort_keys=True, default=str)
        if key not in rows:
            rows[key] = {"id": run.id, "fields": run.fields, "config": run.config}
        counts[key] = counts.get(key, 0) + 1
    out = list(rows.values())
    return out, {r["id"]: counts[k] for k, r in zip(rows, out, strict=True)}


def short_command(row: dict[str, Any], run_dir: Path, steps: int, eval_cap: int, generations: int | None) -> list[str]:
    cfg = row["config"]
    cmd = [sys.executable, "-m", "peftlab", "train"]
    fields = dict(row["fields"])
    fields.update({"max_steps": steps, "eval_subset": min(cfg.eval_subset or eval_cap, eval_cap),
                   "eval_before": True, "output_dir": str(run_dir), "overwrite": True})
    fields.pop("epochs", None)
    if generations is not None:
        fields["generation_subset"] = generations
    for key, value in fields.items():
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        cmd += ["--set", f"{key}={text}"]
    return cmd


def eval_counts(results: dict[str, Any]) -> tuple[int, int]:
    """(examples evaluated, examples in the whole evaluation split) from results.json's data counts."""
    info = results["data"]["eval"]
    used = next(v for k, v in info.items() if k.endswith("_used"))
    total = next(v for k, v in info.items() if k.endswith("_total"))
    return int(used), int(total)


def measure(row: dict[str, Any], out: Path, steps: int, eval_cap: int, generations: int | None,
            env: dict[str, str]) -> dict[str, Any]:
    name = row["id"].replace("/", "_") + ("" if generations is None else f"-g{generations}")
    run_dir = out / "runs" / name
    wall = run_logged(short_command(row, run_dir, steps, eval_cap, generations), out / "logs" / f"{name}.log",
                      env, 3600, REPO)
    results = json.loads((run_dir / "results.json").read_text())
    steps_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first = steps_rows[0]["train_time_s"]
    later = (steps_rows[-1]["train_time_s"] - first) / max(1, len(steps_rows) - 1)
    timing = results["timing"]
    used, total = eval_counts(results)
    return {"wall_s": wall, "first_step_s": first, "step_s": later, "load_s": timing["load_time_s"],
            "train_s": timing["train_time_s"], "eval_s": timing["eval_time_s"], "eval_used": used,
            "eval_total": total, "steps_per_epoch": steps / timing["epochs_trained"],
            "generations": generations, "precision": results["model"]["precision"],
            "train_subset": row["config"].train_subset}


def project(row: dict[str, Any], m: dict[str, Any], gen_s: float, generations_cal: int) -> dict[str, float]:
    cfg = row["config"]
    per_epoch = m["steps_per_epoch"]
    if cfg.train_subset and m.get("train_subset"):  # a reused measurement, re-projected onto a new training size
        per_epoch *= cfg.train_subset / m["train_subset"]
    total_steps = cfg.max_steps or round(per_epoch * cfg.epochs)
    train = m["first_step_s"] + m["step_s"] * (total_steps - 1)
    gens_cal = generations_cal if cfg.generation_subset else 0
    per_eval_example = max(0.0, m["eval_s"] / 2 - gens_cal * gen_s) / m["eval_used"]
    eval_n = min(cfg.eval_subset or m["eval_total"], m["eval_total"])
    evaluation = per_eval_example * eval_n + (cfg.generation_subset or 0) * gen_s
    rest = m["wall_s"] - m["train_s"] - m["eval_s"]
    return {"train_s": train, "eval_s": evaluation, "rest_s": rest, "steps": total_steps,
            "run_s": train + evaluation + rest}


def main() -> int:
    from peftlab.baseline import CACHE_ENV as BASELINE_ENV

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each short run (default 4)")
    parser.add_argument("--eval-cap", type=int, default=16, help="evaluation examples of each short run")
    parser.add_argument("--generations", type=int, default=2, help="generations of the short runs (G)")
    parser.add_argument("--reuse", type=Path, metavar="RESULTS_JSON",
                        help="reuse the short runs of an earlier results.json (by row id; the rows' per-step and "
                        "per-example times), re-projecting them onto the sweep file's current sizes")
    parser.add_argument("--sweep-dir", type=Path, help="also write the calibration into this sweep output folder, "
                        "where `peftlab sweep --dry-run` and the sweep's ETA read it")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # a fresh cache: every short run measures its own baseline evaluation
           BASELINE_ENV: str(args.out / "baselines" / str(time.time_ns()))}
    rows, counts = rows_of(args.sweep_file)
    measured: dict[str, dict[str, Any]] = {}
    gen_s = 0.0
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        measured, gen_s = {k: v for k, v in earlier["measured"].items()}, earlier["generation_s"]
    for row in rows:
        if row["id"] in measured:
            continue
        generating = bool(row["config"].generation_subset)
        print(f"measuring {row['id']} ...", flush=True)
        measured[row["id"]] = measure(row, args.out, args.steps, args.eval_cap,
                                      args.generations if generating else None, env)
        if generating and not gen_s:
            again = measure(row, args.out, args.steps, args.eval_cap, 2 * args.generations, env)
            gen_s = max(0.0, (again["eval_s"] - measured[row["id"]]["eval_s"]) / 2 / args.generations)
    from peftlab.precision import cpu_model_name

    table, total = [], 0.0
    baselines: dict[str, float] = {}
    calibration = []
    for row in rows:
        p = project(row, measured[row["id"]], gen_s, args.generations)
        cfg = row["config"]
        key = json.dumps([cfg.model, cfg.task, cfg.dataset, measured[row["id"]]["precision"], cfg.eval_subset])
        runs = counts[row["id"]]
        # one shared baseline evaluation per base model, data and precision: charged to the first row that needs it
        baseline = p["eval_s"] if key not in baselines else 0.0
        baselines.setdefault(key, p["eval_s"])
        table.append({"row": row["id"], "runs": runs, **p, "total_s": runs * p["run_s"]})
        calibration.append({"fields": {k: v for k, v in row["fields"].items() if k != "seed"},
                            "seconds": p["run_s"] + baseline / runs})
        total += runs * p["run_s"]
    total += sum(baselines.values())
    lines = ["| Row | Runs | Steps | Train (min) | Eval (min) | Other (min) | Per run (min) | All runs (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['row']} | {t['runs']} | {t['steps']} | {t['train_s'] / 60:.1f} | {t['eval_s'] / 60:.1f} "
                     f"| {t['rest_s'] / 60:.1f} | {t['run_s'] / 60:.1f} | {t['total_s'] / 60:.1f} |")
    summary = (f"Projected: {total / 3600:.2f} h for {sum(counts.values())} runs, including "
               f"{len(baselines)} shared baseline evaluations ({sum(baselines.values()) / 60:.1f} min); "
               f"generation {gen_s:.2f} s per example.")
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"measured": measured, "projected": table,
                                                       "generation_s": gen_s, "total_s": total}, indent=2))
    calibration_text = json.dumps({"measured_on": cpu_model_name(), "sweep_file": str(args.sweep_file),
                                   "command": " ".join(sys.argv), "rows": calibration}, indent=2, default=str)
    for folder in filter(None, (args.out, args.sweep_dir)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CALIBRATION_FILE).write_text(calibration_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
