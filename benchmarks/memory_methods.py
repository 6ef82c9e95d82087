"""Memory benchmark: full fine-tuning, LoRA (8,16) and QLoRA (8,16) on smollm2-135m, measured and predicted, in fp32
and bf16-mixed (``--precisions``).

Each method trains in its own fresh process (`peftlab train`, WikiText-2 blocks of 128 tokens from the offline
mirror, batch 4, no accumulation, a few optimizer steps), one after the other. The table gives the training-phase
peak memory (CPU: peak RSS with VmHWM reset after loading and the baseline evaluation; CUDA: max allocated),
tokens/s, perplexity before and after, `peftlab plan`'s prediction for the same config and its error.

    python benchmarks/memory_methods.py --out bench-memory     # the benchmark (10-15 min on a shared 2-core CPU)
    python benchmarks/memory_methods.py --out /tmp/m --model tiny-llama --steps 2 --eval-subset 4   # smoke test

CPU allocator: glibc keeps freed heap pages, so without care a process's RSS grows over the first steps by
whatever the heap fragments to (17-75 % on smollm2-135m), a figure no planner can predict. The training
processes therefore run with ``MALLOC_MMAP_THRESHOLD_=131072``: allocations of 128 KiB or more (every
activation) are mmapped and returned to the OS when freed, so RSS follows the memory actually in use.
``--default-allocator`` measures with glibc's defaults instead (the predictions then run low by that slack).

Writes OUT/results.json (every figure, the commands, the plans) and OUT/results.md, prints the table, and exits 1
if a done-when check fails: QLoRA's peak < LoRA's < full's, perplexity falls for all three, and every prediction
within 15 % of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peftlab.methods import get_method

METHODS = ("full", "lora", "qlora")
LR = {"full": 2e-4, "lora": 1e-3, "qlora": 1e-3}  # full: the seed's default; adapters learn faster at 1e-3
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TOLERANCE = 0.15


PRECISIONS = ("fp32", "bf16-mixed")


def train_command(method: str, args: argparse.Namespace, run_dir: Path, precision: str = "fp32") -> list[str]:
    """The `peftlab train` argument list for one method (no shell)."""
    cmd = [sys.executable, "-m", "peftlab", "train", "--model", args.model, "--method", method,
           "--dataset", "wikitext-2-raw-v1", "--block-size", str(args.block_size), "--batch-size",
           str(args.batch_size), "--grad-accum", "1", "--max-steps", str(args.steps), "--train-subset",
           str(args.steps * args.batch_size), "--eval-subset", str(args.eval_subset), "--lr", str(LR[method]),
           "--device", args.device, "--precision", precision, "--output-dir", str(run_dir), "--overwrite",
           "--set", "max_new_tokens=8"]
    if {"r", "alpha"} <= get_method(method).field_names():  # a rank and its scaling: the seed's (8, 16)
        cmd += ["--r", "8", "--alpha", "16"]
    return cmd


def run_method(method: str, args: argparse.Namespace, out: Path, precision: str = "fp32",
               extra: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """Train one method in a fresh process (``extra``: more `peftlab train` flags, ``name``: the run's folder and
    log name); return its results.json and what was run."""
    name = name or f"{method}-{precision}"
    run_dir = out / "runs" / name
    cmd = train_command(method, args, run_dir, precision) + list(extra or [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if not args.default_allocator:
        env.update(ALLOCATOR_ENV)
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: `peftlab train` failed (exit {proc.returncode}); see {log}")
    from peftlab.record import RunRecord  # the one reader of results.json

    results = RunRecord.read(run_dir).to_dict()
    return {"command": cmd, "wall_s": time.perf_counter() - start, "log": str(log), "results": results}


def measured_peak_gb(results: dict[str, Any]) -> tuple[float, str]:
    """The training-phase peak: CPU peak RSS, or CUDA max allocated."""
    train = results["memory"]["train"]
    if results["model"]["device"].startswith("cuda"):
        return train["cuda_max_allocated_gb"], "cuda_max_allocated"
    return train["cpu_peak_rss_gb"], "cpu_peak_rss_train"


def predict(results: dict[str, Any]) -> dict[str, Any]:
    """`peftlab plan` for the run's own config (shapes only, no weights loaded)."""
    from peftlab.configure import config_from_saved
    from peftlab.plan.memory import GIB, plan_for_config

    cfg = config_from_saved(results["config"], "results.json")
    plan = plan_for_config(cfg).as_dict()
    if results["model"]["device"].startswith("cuda"):  # max_allocated excludes the CUDA context
        plan["compared_gb"] = plan["peak_gb"] - plan["components_gb"]["runtime"]
    else:
        plan["compared_gb"] = plan["peak_gb"]
    plan["gib"] = GIB
    return plan


def summarise(method: str, run: dict[str, Any], precision: str = "fp32") -> dict[str, Any]:
    """One table row."""
    results = run["results"]
    measured, kind = measured_peak_gb(results)
    plan = predict(results)
    before, after = results["metrics"]["before"]["perplexity"], results["metrics"]["after"]["perplexity"]
    return {"method": method, "precision": precision, "measured_peak_gb": measured, "measured_kind": kind,
            "load_peak_gb": results["memory"]["load"].get("cpu_peak_rss_gb"),
            "tokens_per_s": results["timing"]["tokens_per_s"], "optimizer_steps": results["timing"]["optimizer_steps"],
            "ppl_before": before, "ppl_after": after, "trainable_params": results["params"]["trainable_params"],
            "predicted_peak_gb": plan["compared_gb"], "error_pct": 100 * (plan["compared_gb"] - measured) / measured,
            "plan": plan, "estimate_in_results": results["memory"].get("estimate")}


def checks(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The issue's done-when conditions."""
    out = {}
    for precision in PRECISIONS:
        keys = {m: f"{m} {precision}" for m in METHODS}
        if all(k in rows for k in keys.values()):
            peak = {m: rows[k]["measured_peak_gb"] for m, k in keys.items()}
            out[f"{precision}: qlora < lora < full (training-phase peak)"] = peak["qlora"] < peak["lora"] < peak["full"]
    for m, row in rows.items():
        out[f"{m}: perplexity falls"] = row["ppl_after"] < row["ppl_before"]
        out[f"{m}: prediction within {TOLERANCE:.0%}"] = abs(row["error_pct"]) <= 100 * TOLERANCE
    return out


def format_table(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table plus the checks."""
    lines = [f"{meta['model']}, {meta['device']}, WikiText-2 blocks of {meta['block_size']}, batch "
             f"{meta['batch_size']}, {meta['steps']} optimizer steps, allocator: {meta['allocator']}", "",
             "| Method | Training-phase peak (GiB) | Predicted (GiB) | Error | Tokens/s | Perplexity before -> after |"
             " Trainable params |", "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        method = get_method(r["method"])
        shape = f" {method.config_label({'r': 8, 'alpha': 16})}" if method.shows_rank else ""
        label = f"{method.display_name}{shape} {r['precision']}"
        lines.append(f"| {label} | {r['measured_peak_gb']:.3f} | {r['predicted_peak_gb']:.3f} | "
                     f"{r['error_pct']:+.1f}% | {r['tokens_per_s']:.1f} | {r['ppl_before']:.2f} -> "
                     f"{r['ppl_after']:.2f} | {r['trainable_params']:,} |")
    lines += ["", "Predicted components (GiB): " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["plan"]["components_gb"].items() if v >= 0.0005)
        for m, r in rows.items())]
    lines += ["", "Checks:"] + [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in meta["checks"].items()]
    lines += ["", f"Measured: {rows[next(iter(rows))]['measured_kind']} from each run's results.json; tokens/s "
              "are wall-clock on a shared machine (indicative only)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, runs/ and logs/")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per method (default 4)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-subset", type=int, default=16, help="evaluation blocks (default 16)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precisions", default="fp32,bf16-mixed", help="comma-separated subset of fp32,bf16-mixed")
    parser.add_argument("--default-allocator", action="store_true",
                        help="do not set MALLOC_MMAP_THRESHOLD_ for the training processes")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if any(x not in PRECISIONS for x in precisions):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
    runs, rows = {}, {}
    for precision in precisions:
        for method in methods:
            key = f"{method} {precision}"
            print(f"training {key} ...", file=sys.stderr, flush=True)
            runs[key] = run_method(method, args, out, precision)
            rows[key] = summarise(method, runs[key], precision)
    meta = {"model": args.model, "device": args.device, "block_size": args.block_size, "batch_size": args.batch_size,
            "steps": args.steps, "allocator": allocator_note(args)}
    meta["checks"] = checks(rows)
    return write_results(out, meta, rows, runs, format_table(rows, meta))


def allocator_note(args: argparse.Namespace) -> str:
    """How the training processes' allocator was set (the tables' footnote)."""
    return "glibc defaults" if args.default_allocator else \
        "MALLOC_MMAP_THRESHOLD_=131072 (large allocations returned to the OS on free)"


def write_results(out: Path, meta: dict[str, Any], rows: dict[str, Any], runs: dict[str, Any], table: str) -> int:
    """Write OUT/results.json (meta, rows, the runs without their full results) and OUT/results.md, print the
    table, and return the exit code: 1 if a check failed."""
    payload = {"meta": meta, "rows": rows,
               "runs": {m: {k: v for k, v in r.items() if k != "results"} for m, r in runs.items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0 if all(meta["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
