"""Memory benchmark at ~1.1B parameters: the planner against measured training-phase peaks on a random-initialised
Llama shaped like TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632), for LoRA (8, 16),
QLoRA (8, 16) and full fine-tuning.

Each method trains in its own fresh process through benchmarks/memory_methods.py's functions (the same
`peftlab train` command, WikiText-2 blocks of 128 tokens, batch 4, no accumulation, a few optimizer steps, and the
same allocator setting, ``MALLOC_MMAP_THRESHOLD_=131072``, so that CPU RSS follows the memory in use), one after
the other; each row compares the training-phase peak (CPU: peak RSS; CUDA: max allocated) with `peftlab plan` for
the same config.

The model is built once from its config with seed 0 and saved as a local model folder (safetensors, config.json
and the SmolLM2 tokenizer) under ``$PEFTLAB_CACHE`` (default ~/.cache/peftlab)/bench-models, written atomically.
Its vocabulary is the SmolLM2 tokenizer's 49,152 entries, not TinyLlama's 32,000 (the offline setup has no Llama
tokenizer, and a 32,000-entry embedding would meet token ids beyond it), so it has 1.17 B parameters instead of
1.10 B; the planner reads the same config.json, so the comparison is unaffected. The weights are random, so the
perplexities are reported, not checked.

Precision is per method (``--precision METHOD=PRECISION``, default fp32 for all three). Full fine-tuning in fp32
plans at ~20 GiB here (weights, gradients and two AdamW states at 4 bytes each); bf16-mixed does not lower that
(fp32 master weights plus autocast's bf16 copies), so it is an option, not the default. A method whose plan is above
``--limit-gib`` (default 24, the machine's memory) is skipped and listed as such rather than run.

    python benchmarks/memory_scale.py --out bench-memory-scale                 # the benchmark (lead's run)
    python benchmarks/memory_scale.py --out bench-memory-scale --methods lora,qlora --precision lora=bf16-mixed
    python benchmarks/memory_scale.py --out /tmp/ms --plan-only                # the plans only (no model built)
    python benchmarks/memory_scale.py --out /tmp/ms --scale tiny --steps 2     # smoke test (about a minute)

Writes OUT/results.json (every figure, the commands, the plans) and OUT/results.md, prints the table, and exits 1
if a check fails: every prediction within 15 % of its measurement, and QLoRA's peak < LoRA's < full's when all
three ran at one precision.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import random_llama_config, random_llama_dir_built_apart
from memory_methods import (
    METHODS,
    PRECISIONS,
    TOLERANCE,
    allocator_note,
    format_table,
    run_method,
    summarise,
    write_results,
)

from peftlab.methods import get_method

#: TinyLlama-1.1B's shape (vocabulary aside, see the module docstring), and a tiny one for smoke tests.
SCALES = {
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": False},
}
SEED = 0


def parse_precisions(items: list[str], methods: list[str]) -> dict[str, str]:
    """``METHOD=PRECISION`` items over the fp32 default."""
    out = dict.fromkeys(methods, "fp32")
    for item in items:
        method, sep, precision = item.partition("=")
        if not sep or method not in METHODS or precision not in PRECISIONS:
            raise SystemExit(f"--precision {item!r}: expected METHOD=PRECISION with METHOD one of "
                             f"{', '.join(METHODS)} and PRECISION one of {', '.join(PRECISIONS)}")
        out[method] = precision
    return out


def planned_gib(model_dir: Path, method: str, args: argparse.Namespace, precision: str) -> float:
    """`peftlab plan` for the run about to start (one process)."""
    from peftlab.configure import load_config
    from peftlab.plan.memory import GIB, plan_for_config

    fields = {"model": str(model_dir), "method": method, "block_size": args.block_size,
              "batch_size": args.batch_size, "grad_accum": 1, "device": args.device, "precision": precision}
    if {"r", "alpha"} <= get_method(method).field_names():  # a rank and its scaling: the seed's (8, 16)
        fields.update(r=8, alpha=16)
    return plan_for_config(load_config(None, fields), processes=1).peak_bytes / GIB


def checks(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Every prediction within the tolerance; the methods' order when all three ran at one precision."""
    out = {f"{key}: prediction within {TOLERANCE:.0%}": abs(row["error_pct"]) <= 100 * TOLERANCE
           for key, row in rows.items()}
    by_method = {row["method"]: row for row in rows.values()}
    if set(by_method) == set(METHODS) and len({row["precision"] for row in rows.values()}) == 1:
        peak = {m: by_method[m]["measured_peak_gb"] for m in METHODS}
        out["qlora < lora < full (training-phase peak)"] = peak["qlora"] < peak["lora"] < peak["full"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, runs/ and logs/")
    parser.add_argument("--scale", choices=sorted(SCALES), default="1.1b", help="model shape (default 1.1b)")
    parser.add_argument("--hidden", type=int, help="override the hidden size (heads keep their count)")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--methods", default="lora,qlora,full", help="comma-separated subset of full,lora,qlora")
    parser.add_argument("--precision", action="append", default=[], metavar="METHOD=PRECISION",
                        help="a method's precision, fp32 or bf16-mixed (default fp32 for every method)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per method (default 3)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-subset", type=int, default=4, help="evaluation blocks (default 4)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--limit-gib", type=float, default=24.0,
                        help="skip a method whose planned peak is above this (default 24)")
    parser.add_argument("--plan-only", action="store_true", help="print each method's plan; build and train nothing")
    parser.add_argument("--default-allocator", action="store_true",
                        help="do not set MALLOC_MMAP_THRESHOLD_ for the training processes")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    precisions = parse_precisions(args.precision, methods)
    shape = dict(SCALES[args.scale])
    if args.hidden:
        shape["hidden_size"] = args.hidden
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plan_only:  # the planner needs the shapes only
        (out / "model-config").mkdir(exist_ok=True)
        random_llama_config(shape).to_json_file(out / "model-config" / "config.json")
        for method in methods:
            print(f"{method} {precisions[method]}: planned "
                  f"{planned_gib(out / 'model-config', method, args, precisions[method]):.3f} GiB")
        return 0
    print(f"model: random-init Llama {shape} (seed {SEED}) ...", file=sys.stderr, flush=True)
    model_dir = random_llama_dir_built_apart(shape, SEED)
    args.model = str(model_dir)  # memory_methods.train_command reads the model from here
    runs, rows, skipped = {}, {}, {}
    for method in methods:
        precision = precisions[method]
        key = f"{method} {precision}"
        planned = planned_gib(model_dir, method, args, precision)
        if planned > args.limit_gib:
            skipped[key] = f"planned {planned:.2f} GiB > --limit-gib {args.limit_gib:g}"
            print(f"skipping {key}: {skipped[key]}", file=sys.stderr, flush=True)
            continue
        print(f"training {key} (planned {planned:.2f} GiB) ...", file=sys.stderr, flush=True)
        runs[key] = run_method(method, args, out, precision)
        rows[key] = summarise(method, runs[key], precision)
    if not rows:
        raise SystemExit("every method was skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    params = next(iter(rows.values()))["plan"]["counts"]["total_params"]
    meta = {"model": f"random-init Llama ({params / 1e9:.2f} B parameters, {model_dir.name})",
            "model_dir": str(model_dir), "model_config": config, "seed": SEED, "device": args.device,
            "block_size": args.block_size, "batch_size": args.batch_size, "steps": args.steps,
            "allocator": allocator_note(args),
            "skipped": skipped, "checks": checks(rows)}
    table = format_table(rows, meta)
    if skipped:
        table += "\n\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return write_results(out, meta, rows, runs, table)


if __name__ == "__main__":
    sys.exit(main())
