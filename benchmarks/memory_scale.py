"""Memory benchmark at 1.1B and 7B parameters: the planner against measured load and training-phase peaks on a
random-initialised Llama shaped like TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632), like
Llama-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11008) or like Mistral-7B (the same with 8 KV heads and MLP
14336), for LoRA (8, 16), QLoRA (8, 16) and full fine-tuning.

The 7B shapes (issue 24) are built and stored in bf16 (never materialised in fp32: 27 GB), train in bf16-mixed by
default, and their table adds `peftlab plan` at the real models' 32,000-entry vocabulary and the seed's claimed GB.
Full fine-tuning at 7B plans far above this machine's memory, so it is planned, not run (``--limit-gib``). One 7B
LoRA run needs about 15 GiB: run it alone on the machine.

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
    python benchmarks/memory_scale.py --out docs/results/memory-7b/llama-2-7b --scale llama-2-7b --steps 2 \
        --methods lora,qlora,full --eval-subset 2                                # 7B (the lead's run, alone)
    python benchmarks/memory_scale.py --out /tmp/m7 --scale llama-2-7b --layers 2 --steps 2   # 7B width, 2 layers

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
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False},
    "mistral-7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
}
#: The 7B shapes: built in bf16, trained in bf16-mixed unless --precision says otherwise, compared with the seed's
#: table (its model name there) and planned at the real model's vocabulary too.
SEVEN_B = {"llama-2-7b": "Llama-2-7B", "mistral-7b": "Mistral-7B-v0.1"}
REAL_VOCAB = 32000
SEED = 0


def parse_precisions(items: list[str], methods: list[str], default: str = "fp32") -> dict[str, str]:
    """``METHOD=PRECISION`` items over the default."""
    out = dict.fromkeys(methods, default)
    for item in items:
        method, sep, precision = item.partition("=")
        if not sep or method not in METHODS or precision not in PRECISIONS:
            raise SystemExit(f"--precision {item!r}: expected METHOD=PRECISION with METHOD one of "
                             f"{', '.join(METHODS)} and PRECISION one of {', '.join(PRECISIONS)}")
        out[method] = precision
    return out


def seed_claim_gb(scale: str, method: str) -> float | None:
    """The seed's claimed GB for this 7B model and method (LoRA at r 8), None where it claimed nothing."""
    from peftlab.plan.seed_table import SEED_CLAIM_ROWS

    name = SEVEN_B.get(scale)
    for model, m, r, claim in SEED_CLAIM_ROWS:
        if model == name and m == method and r in (None, 8):
            return claim.gb
    return None


def real_vocab_plans(shape: dict[str, Any], out: Path, methods: list[str], args: argparse.Namespace,
                     precisions: dict[str, str]) -> dict[str, float]:
    """`peftlab plan` per method for the same shape at the real models' 32,000-entry vocabulary."""
    folder = out / "model-config-vocab32000"
    folder.mkdir(parents=True, exist_ok=True)
    config = random_llama_config(shape)
    config.vocab_size = REAL_VOCAB
    config.to_json_file(folder / "config.json")
    return {m: planned_gib(folder, m, args, precisions[m]) for m in methods}


def seven_b_lines(scale: str, rows: dict[str, dict[str, Any]], planned: dict[str, float],
                  real_vocab: dict[str, float], skipped: dict[str, str], precisions: dict[str, str]) -> list[str]:
    """The 7B table: load and training peaks beside the plans (this vocabulary and 32,000) and the seed's claim."""
    lines = ["", f"{SEVEN_B[scale]} shape: measured against `peftlab plan` and the seed's claim (GiB; the seed's "
             "claims are GB)", "",
             "| Method | Load peak | Training peak | Plan (49,152 vocab) | Error | Plan (32,000 vocab) | Seed claim |",
             "|---|---|---|---|---|---|---|"]
    by_method = {row["method"]: row for row in rows.values()}
    for method, plan in planned.items():
        row = by_method.get(method)
        claim = seed_claim_gb(scale, method)
        measured = (f"{row['load_peak_gb']:.2f} | {row['measured_peak_gb']:.2f}" if row
                    else "not run | " + skipped.get(f"{method} {precisions[method]}", "-"))
        error = f"{row['error_pct']:+.1f}%" if row else "-"
        lines.append(f"| {method} {precisions[method]} | {measured} | {plan:.2f} | {error} | "
                     f"{real_vocab[method]:.2f} | {'-' if claim is None else f'{claim:g} GB'} |")
    return lines


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
    parser.add_argument("--build-only", action="store_true",
                        help="build the model (if not cached) and print its folder; train nothing")
    parser.add_argument("--build-dtype", choices=["float32", "bfloat16"],
                        help="dtype the random model is built and stored in (default: bfloat16 for the 7B shapes, "
                        "else float32)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="do not set MALLOC_MMAP_THRESHOLD_ for the training processes")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    precisions = parse_precisions(args.precision, methods, "bf16-mixed" if args.scale in SEVEN_B else "fp32")
    build_dtype = args.build_dtype or ("bfloat16" if args.scale in SEVEN_B else "float32")
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
            claim = seed_claim_gb(args.scale, method)
            print(f"{method} {precisions[method]}: planned "
                  f"{planned_gib(out / 'model-config', method, args, precisions[method]):.3f} GiB"
                  + (f" (the seed claimed {claim:g} GB)" if claim is not None else ""))
        return 0
    print(f"model: random-init Llama {shape} (seed {SEED}) ...", file=sys.stderr, flush=True)
    model_dir = random_llama_dir_built_apart(shape, SEED, build_dtype)
    if args.build_only:
        print(model_dir)
        return 0
    args.model = str(model_dir)  # memory_methods.train_command reads the model from here
    runs, rows, skipped, plans = {}, {}, {}, {}
    for method in methods:
        precision = precisions[method]
        key = f"{method} {precision}"
        planned = plans[method] = planned_gib(model_dir, method, args, precision)
        if planned > args.limit_gib:
            skipped[key] = f"planned {planned:.2f} GiB > --limit-gib {args.limit_gib:g}"
            print(f"skipping {key}: {skipped[key]}", file=sys.stderr, flush=True)
            continue
        print(f"training {key} (planned {planned:.2f} GiB) ...", file=sys.stderr, flush=True)
        runs[key] = run_method(method, args, out, precision)
        rows[key] = summarise(method, runs[key], precision)
    real_vocab = real_vocab_plans(shape, out, methods, args, precisions) if args.scale in SEVEN_B else {}
    if not rows:
        raise SystemExit("every method was skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    params = next(iter(rows.values()))["plan"]["counts"]["total_params"]
    meta = {"model": f"random-init Llama ({params / 1e9:.2f} B parameters, {model_dir.name})",
            "model_dir": str(model_dir), "model_config": config, "seed": SEED, "device": args.device,
            "block_size": args.block_size, "batch_size": args.batch_size, "steps": args.steps,
            "allocator": allocator_note(args), "build_dtype": build_dtype, "planned_gib": plans,
            "planned_gib_vocab32000": real_vocab,
            "seed_claimed_gb": {m: seed_claim_gb(args.scale, m) for m in methods} if real_vocab else {},
            "skipped": skipped, "checks": checks(rows)}
    table = format_table(rows, meta)
    if skipped:
        table += "\n\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
    if real_vocab:
        table += "\n".join(seven_b_lines(args.scale, rows, plans, real_vocab, skipped, precisions))
    return write_results(out, meta, rows, runs, table)


if __name__ == "__main__":
    sys.exit(main())
