"""Memory benchmark: full fine-tuning of a ~300M random-initialised Llama on 2 processes, DDP against FSDP at the
same global batch, each process's measured training-phase peak beside the planner's per-process plan.

The model (hidden 1024, 24 layers, 16 heads, 4 KV heads, MLP 2816, tied embeddings, the SmolLM2 tokenizer's
49,152-entry vocabulary: 0.32 B parameters) is built once with seed 0 and saved under ``$PEFTLAB_CACHE`` (default
~/.cache/peftlab)/bench-models, written atomically (benchmarks/_common.py's ``random_llama_dir``). Each strategy
trains in its own `peftlab train --processes 2 --strategy ddp|fsdp` (benchmarks/memory_methods.py's command and
allocator setting: WikiText-2 blocks of 128 tokens, batch 4 per process, no accumulation, a few optimizer steps).
Measured: the largest per-process peak in results.json ``memory.train_per_process`` (CUDA: max allocated; CPU:
peak RSS). Planned: `peftlab plan --processes 2 --strategy ...` for the run's own config (the CUDA context
excluded on CUDA, as max allocated excludes it).

    python benchmarks/memory_fsdp.py --out bench-memory-fsdp                      # the benchmark (2 GPUs)
    python benchmarks/memory_fsdp.py --out /tmp/mf --plan-only                    # the per-process plans only
    python benchmarks/memory_fsdp.py --out /tmp/mf --strategies ddp --model tiny-llama --device cpu \\
        --precision fp32 --steps 2 --eval-subset 4                                # smoke test (DDP half, CPU)

Writes OUT/results.json (every figure, the commands, the plans) and OUT/results.md, prints the table, and exits 1
if a check fails: FSDP's per-process peak at most 0.65 x DDP's, and FSDP's plan within 15 % of its measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import random_llama_config, random_llama_dir_built_apart
from memory_methods import TOLERANCE, allocator_note, run_method, write_results

SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
         "num_key_value_heads": 4, "tie_word_embeddings": True}
SEED = 0
PROCESSES = 2
STRATEGIES = ("ddp", "fsdp")
FSDP_OVER_DDP = 0.65  # the largest FSDP/DDP ratio of per-process peaks that passes


def run_config(results: dict[str, Any]):
    from peftlab.configure import config_from_saved

    return config_from_saved(results["config"], "results.json")


def per_process_peak_gb(results: dict[str, Any]) -> tuple[float, str, list[float]]:
    """The largest training-phase peak over the processes (CUDA max allocated, else CPU peak RSS), and each."""
    memory = results["memory"]
    cuda = results["model"]["device"].startswith("cuda")
    key = "cuda_max_allocated_gb" if cuda else "cpu_peak_rss_gb"
    each = [p[key] for p in memory.get("train_per_process") or [] if p.get(key) is not None]
    if not each:  # an older record: rank 0's own figure
        each = [memory["train"][key]]
    return max(each), key.removesuffix("_gb"), each


def per_process_plan(cfg, processes: int) -> dict[str, Any]:
    """The planner's per-process plan of a run config on ``processes`` processes (``compared_gb``: what the
    measurement holds: without the CUDA context on CUDA)."""
    from peftlab.plan.memory import plan_for_config, plan_input_from_config

    plan = plan_for_config(cfg, processes=processes).as_dict()
    cuda = plan_input_from_config(cfg, processes=processes).device == "cuda"
    plan["compared_gb"] = plan["peak_gb"] - (plan["components_gb"]["runtime"] if cuda else 0.0)
    return plan


def plan_only(model: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The per-process plans of both strategies without training."""
    from peftlab.configure import load_config

    out = {}
    for strategy in args.strategies:
        cfg = load_config(None, {"model": model, "method": "full", "block_size": args.block_size,
                                 "batch_size": args.batch_size, "grad_accum": 1, "device": args.device,
                                 "precision": args.precision, "strategy": strategy})
        out[strategy] = per_process_plan(cfg, PROCESSES)
    return out


def checks(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    out = {}
    if "ddp" in rows and "fsdp" in rows:
        ratio = rows["fsdp"]["measured_peak_gb"] / rows["ddp"]["measured_peak_gb"]
        out[f"fsdp per-process peak <= {FSDP_OVER_DDP} x ddp's (measured {ratio:.2f} x)"] = ratio <= FSDP_OVER_DDP
    if "fsdp" in rows:
        out[f"fsdp plan within {TOLERANCE:.0%} of its measurement"] = abs(rows["fsdp"]["error_pct"]) <= 100 * TOLERANCE
    return out


def format_table(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"{meta['model']}, full fine-tuning, {meta['device']} {meta['precision']}, {PROCESSES} processes, "
             f"WikiText-2 blocks of {meta['block_size']}, batch {meta['batch_size']} per process (global "
             f"{meta['batch_size'] * PROCESSES}), {meta['steps']} optimizer steps, allocator: {meta['allocator']}", "",
             "| Strategy | Per-process peak (GiB) | Each process (GiB) | Planned per process (GiB) | Error | "
             "Tokens/s |", "|---|---|---|---|---|---|"]
    for strategy, r in rows.items():
        each = ", ".join(f"{x:.3f}" for x in r["each_process_gb"])
        lines.append(f"| {strategy.upper()} | {r['measured_peak_gb']:.3f} | {each} | {r['predicted_peak_gb']:.3f} | "
                     f"{r['error_pct']:+.1f}% | {r['tokens_per_s']:.1f} |")
    lines += ["", "Planned components per process (GiB): " + "; ".join(
        f"{s}: " + ", ".join(f"{r['plan'].get('labels', {}).get(k, k)} {v:.3f}"
                             for k, v in r["plan"]["components_gb"].items() if v >= 0.0005)
        for s, r in rows.items())]
    lines += ["", "Checks:"] + ([f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in meta["checks"].items()]
                                or ["- none apply (they need the fsdp run)"])
    kind = next(iter(rows.values()))["measured_kind"]
    lines += ["", f"Measured: the largest {kind} over the processes (results.json memory.train_per_process); "
              "tokens/s are wall-clock (indicative only)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, runs/ and logs/")
    parser.add_argument("--model", help="a model name or folder instead of the ~300M random-init Llama")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of ddp,fsdp")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per strategy (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="per process (default 4)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-subset", type=int, default=4, help="evaluation blocks (default 4)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-mixed", choices=["fp32", "bf16-mixed"])
    parser.add_argument("--plan-only", action="store_true", help="print the per-process plans; train nothing")
    parser.add_argument("--default-allocator", action="store_true",
                        help="do not set MALLOC_MMAP_THRESHOLD_ for the training processes")
    args = parser.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not args.strategies or any(s not in STRATEGIES for s in args.strategies):
        parser.error(f"--strategies: choose from {', '.join(STRATEGIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None and args.plan_only:  # the planner needs the shapes only
        (out / "model-config").mkdir(exist_ok=True)
        random_llama_config(SHAPE).to_json_file(out / "model-config" / "config.json")
        args.model = str(out / "model-config")
    elif args.model is None:
        print(f"model: random-init Llama {SHAPE} (seed {SEED}) ...", file=sys.stderr, flush=True)
        args.model = str(random_llama_dir_built_apart(SHAPE, SEED))  # memory_methods.train_command reads it from here
    if args.plan_only:
        plans = plan_only(args.model, args)
        for strategy, plan in plans.items():
            print(f"{strategy}: {plan['peak_gb']:.3f} GiB per process ({plan['compared_gb']:.3f} GiB compared)")
        (out / "plans.json").write_text(json.dumps(plans, indent=2, default=str) + "\n", encoding="utf-8")
        return 0
    runs, rows = {}, {}
    # every process trains on its own batch_size blocks per step: the subset covers all processes' steps
    subset = str(args.steps * args.batch_size * PROCESSES)
    for strategy in args.strategies:
        print(f"training full, {strategy} on {PROCESSES} processes ...", file=sys.stderr, flush=True)
        extra = ["--processes", str(PROCESSES), "--strategy", strategy, "--train-subset", subset]
        run = runs[strategy] = run_method("full", args, out, args.precision, extra=extra, name=f"full-{strategy}")
        results = run["results"]
        measured, kind, each = per_process_peak_gb(results)
        plan = per_process_plan(run_config(results), PROCESSES)
        rows[strategy] = {"strategy": strategy, "measured_peak_gb": measured, "measured_kind": kind,
                          "each_process_gb": each, "predicted_peak_gb": plan["compared_gb"],
                          "error_pct": 100 * (plan["compared_gb"] - measured) / measured,
                          "tokens_per_s": results["timing"]["tokens_per_s"],
                          "processes": results["timing"].get("processes"), "plan": plan,
                          "estimate_in_results": results["memory"].get("estimate")}
    params = next(iter(rows.values()))["plan"]["counts"]["total_params"]
    meta = {"model": f"{Path(args.model).name} ({params / 1e9:.2f} B parameters)", "model_dir": args.model,
            "seed": SEED, "device": args.device, "precision": args.precision, "block_size": args.block_size,
            "batch_size": args.batch_size, "steps": args.steps, "processes": PROCESSES,
            "allocator": allocator_note(args)}
    meta["checks"] = checks(rows)
    return write_results(out, meta, rows, runs, format_table(rows, meta))


if __name__ == "__main__":
    sys.exit(main())
