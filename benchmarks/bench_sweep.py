"""Sweep makespan benchmark: the same sweep of short LoRA runs serially, with ``--executor local --parallel 2`` and
with ``--executor ray`` on 2 slots, in one invocation.

- The sweep: ``--runs`` LoRA runs (r 8, alpha 16) of ``--model`` on WikiText-2, seeds 1..runs, ``--steps``
  optimizer steps of ``--batch-size`` blocks of ``--block-size`` tokens, evaluated on ``--eval-blocks`` held-out
  blocks; no baseline evaluation (``eval_before: false``), so that no mode gains from a shared baseline cache.
- serial: ``--executor local --parallel 1``: one run at a time with every core as its torch threads.
- local-2: ``--executor local --parallel 2``: two runs at once, each with cores / 2 torch threads (one each on a
  2-core machine).
- ray-2: ``--executor ray --parallel 2``: a local Ray instance, one task per run with cores / 2 CPUs.
- makespan: the wall time of the whole ``peftlab sweep`` command (start-up of Python, and of Ray for ray-2,
  included); also the span from the first run's start to the last run's end in the store.
- identical metrics: each run's ``metrics`` section of results.json (final train loss, eval loss, perplexity)
  compared for equality with the serial sweep's.

The model conversion and the token-block cache are warmed once before the first mode, so no mode pays for them.

    python benchmarks/bench_sweep.py --out docs/results/bench-sweep                 # smollm2-135m, 4 runs
    python benchmarks/bench_sweep.py --out /tmp/bench-sweep --model tiny-llama --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

MODES = {"serial": ["--executor", "local", "--parallel", "1"],
         "local-2": ["--executor", "local", "--parallel", "2"],
         "ray-2": ["--executor", "ray", "--parallel", "2"]}


def sweep_definition(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": "bench-sweep",
            "base": {"model": args.model, "task": "clm", "method": "lora", "r": 8, "alpha": 16,
                     "block_size": args.block_size, "batch_size": args.batch_size, "grad_accum": 1,
                     "max_steps": args.steps, "train_subset": args.steps * args.batch_size,
                     "eval_subset": args.eval_blocks, "eval_before": False, "max_new_tokens": 8},
            "grid": {"seed": list(range(1, args.runs + 1))}}


def warm_caches(model: str, block_size: int) -> None:
    """Convert the model and tokenize the data once, outside every timed sweep."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import workload_blocks

    from peftlab.models import resolve_model_source

    resolve_model_source(model)
    workload_blocks(model, block_size, 1, 1)


def run_mode(sweep_file: Path, out: Path, flags: list[str]) -> dict[str, Any]:
    """One ``peftlab sweep`` invocation: its wall time, and each run's status, span and metrics from the store."""
    from peftlab.sweep.store import SweepStore

    log = out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as fh:
        code = subprocess.run([sys.executable, "-m", "peftlab", "sweep", str(sweep_file), "--output-dir", str(out),
                               *flags], stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    store = SweepStore.open(out, create=False, read_only=True)
    try:
        rows = store.rows()
    finally:
        store.close()
    stamps = [(dt.datetime.fromisoformat(r.started_at), dt.datetime.fromisoformat(r.finished_at)) for r in rows
              if r.started_at and r.finished_at]
    span = (max(e for _, e in stamps) - min(s for s, _ in stamps)).total_seconds() if stamps else None
    return {"flags": flags, "exit_code": code, "makespan_s": wall, "runs_span_s": span, "log": str(log),
            "runs": {r.id: {"status": r.status, "wall_s": r.wall_s, "error": r.error,
                            "metrics": (r.results or {}).get("metrics"),
                            "torch_threads": (r.results or {}).get("machine", {}).get("torch_threads"),
                            "executor": (r.results or {}).get("machine", {}).get("executor")} for r in rows}}


def compare(results: dict[str, Any]) -> None:
    """Ratios to serial and per-run metric equality, added in place."""
    serial = results["modes"]["serial"]
    for mode in results["modes"].values():
        mode["ratio_to_serial"] = mode["makespan_s"] / serial["makespan_s"]
        mode["metrics_identical"] = {
            rid: run["metrics"] is not None and run["metrics"] == serial["runs"][rid]["metrics"]
            for rid, run in mode["runs"].items()}


def markdown(results: dict[str, Any]) -> str:
    rows = ["| mode | flags | makespan | runs' span | ratio to serial | torch threads per run | all runs done | "
            "metrics identical to serial |", "|---|---|---|---|---|---|---|---|"]
    for name, mode in results["modes"].items():
        runs = mode["runs"].values()
        threads = sorted({str(r["torch_threads"]) for r in runs})
        done = all(r["status"] == "done" for r in runs)
        same = sum(mode["metrics_identical"].values())
        span = f"{mode['runs_span_s']:.1f} s" if mode["runs_span_s"] is not None else "-"
        rows.append(f"| {name} | `{' '.join(mode['flags'])}` | {mode['makespan_s']:.1f} s | {span} | "
                    f"{mode['ratio_to_serial']:.2f}x | {', '.join(threads)} | {'yes' if done else 'no'} | "
                    f"{same}/{len(mode['metrics_identical'])} |")
    m = results["machine"]
    return "\n".join([
        "# Sweep makespan: serial against two runs at once", "",
        f"{results['sweep']['grid']['seed'][-1]} LoRA runs of {results['sweep']['base']['model']}, "
        f"{results['sweep']['base']['max_steps']} steps each; machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['platform']}.", "", f"Command: `{results['command']}`", "", *rows, ""])


def machine() -> dict[str, Any]:
    from peftlab.precision import cpu_model_name

    return {"cpu": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and the sweep folders")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "serial" not in modes or set(modes) - set(MODES):
        parser.error(f"--modes: a comma list of {', '.join(MODES)} that includes serial")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    definition = sweep_definition(args)
    sweep_file = out / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(definition, sort_keys=False), encoding="utf-8")
    warm_caches(args.model, args.block_size)
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "sweep": definition,
                               "machine": machine(), "modes": {}}
    for name in modes:
        folder = out / "sweeps" / name
        if folder.exists():
            raise SystemExit(f"{folder} exists from an earlier invocation; choose a new --out")
        results["modes"][name] = run_mode(sweep_file, folder, MODES[name])
        print(f"{name}: {results['modes'][name]['makespan_s']:.1f} s", flush=True)
    compare(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
