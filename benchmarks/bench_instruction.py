"""Instruction benchmark (issue 12): peftlab padded and packed vs HF Trainer + DataCollatorForSeq2Seq vs TRL
SFTTrainer (packing, padding-free), LoRA on alpaca-libre at the examples' real lengths.

Workload: smollm2-135m, the first --examples (512) examples of alpaca-libre train, encoded once with peftlab's own
instruction prompting (template, max_length truncation, response-only labels: prompt tokens -100, the response and
its EOS labelled); every contender trains on exactly these token ids and label masks, all of them once (one epoch;
--steps caps the optimizer steps for smoke tests), with the same micro-batch (--batch-size x --grad-accum), LoRA
r 8 / alpha 16 / dropout 0.1 on q_proj,v_proj, lr 2e-4 and precision. Packing changes how many micro-batches the
epoch takes, not the examples trained on. Every contender runs in a fresh process, one after the other.

- peftlab-padded: `peftlab train --task instruction` (right-padded micro-batches of --batch-size examples).
- peftlab-packed: the same with `--set packing=true` (next-fit rows of --max-length tokens, block-diagonal
  attention through restarting position ids).
- peftlab-packed-matched: packed, with the accumulation scaled by rows / examples (round(8 x 196 / 512) = 3 by
  default) so that it takes about as many optimizer steps of about as many examples as the padded contenders:
  packing alone makes fewer, larger steps, which changes the loss an epoch reaches, not only its speed.
- hf-trainer: HF Trainer + peft, DataCollatorForSeq2Seq padding each micro-batch to its longest example.
- trl-packed: TRL SFTTrainer, packing=True (best-fit decreasing rows of --max-length, trained padding-free).
- trl-padding-free: TRL SFTTrainer, padding_free=True without packing.

Figures: real tokens/s = non-padding tokens of the optimizer steps after the first / their time (the first step is
warm-up; benchmarks/_common.summarise_steps); padding = 1 - real tokens / tokens incl. padding over all steps;
response eval loss = total NLL over response tokens / response tokens on the first --eval-examples examples of
alpaca-libre test, computed in float32 outside every trainer (peftlab rows: the saved adapter on the fp32 base,
loaded with peft).

    python benchmarks/bench_instruction.py --out bench-instruction            # the full benchmark (CPU)
    python benchmarks/bench_instruction.py --out /tmp/ib --model tiny-llama --examples 16 --eval-examples 8 \\
        --batch-size 2 --grad-accum 2                                          # smoke test

Writes OUT/results.json (everything, raw per-step timings included) and OUT/results.md (the table), and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import fmt, ratio, run_logged, summarise_steps, thread_env, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONTENDERS = ("peftlab-padded", "peftlab-packed", "peftlab-packed-matched", "hf-trainer", "trl-packed",
              "trl-padding-free")
PACKED = ("peftlab-packed", "peftlab-packed-matched")
WORKER_KIND = {"hf-trainer": "hf", "trl-packed": "trl-packed", "trl-padding-free": "trl-padding-free"}
PEFTLAB_PRECISION = {"fp32": "fp32", "bf16": "bf16-mixed"}
DATASET = "alpaca-libre"


def default_precision() -> str:
    """bf16 where the CPU has native bf16 instructions (peftlab.precision.detect), else fp32."""
    from peftlab.precision import detect

    return "bf16" if detect("cpu").native_bf16 else "fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, logs/)")
    p.add_argument("--model", default="smollm2-135m", help="peftlab model alias or folder (default smollm2-135m)")
    p.add_argument("--examples", type=int, default=512, help="first N training examples (default 512)")
    p.add_argument("--eval-examples", type=int, default=64, help="first N test examples for the eval loss (64)")
    p.add_argument("--max-length", type=int, default=256,
                   help="peftlab max_length: truncation and packed row length (default 256, peftlab's default)")
    p.add_argument("--steps", type=int, default=None, help="cap on optimizer steps (default: one epoch)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " +
                   ", ".join(CONTENDERS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="fp32, or bf16 (peftlab bf16-mixed, HF/TRL bf16=True); default bf16 if the CPU has "
                        "avx512_bf16 or amx_bf16, else fp32")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for every process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--peftlab-extra", default="", help="extra arguments for both `peftlab train` runs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per contender process (default 3600)")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    return args




# --------------------------------------------------------------------------------------------------------------
# The workload: peftlab's own encoding, written once


def instruction_config(args: argparse.Namespace, packing: bool = False):
    from peftlab.configure import load_config

    return load_config(None, {"model": args.model, "task": "instruction", "method": "lora", "dataset": DATASET,
                              "max_length": args.max_length, "train_subset": args.examples,
                              "eval_subset": args.eval_examples, "packing": packing, "seed": args.seed,
                              "batch_size": args.batch_size, "grad_accum": args.grad_accum})


def encode_workload(args: argparse.Namespace) -> dict[str, Any]:
    """peftlab's InstructionTask load + prepare (the code `peftlab train` runs), on a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import peftlab.tasks.instruction  # noqa: F401  (registers the task)
    from peftlab.models import load_tokenizer, resolve_model_source
    from peftlab.tasks import get_task

    cfg = instruction_config(args, packing=True)
    task = get_task("instruction")(cfg)
    raw = task.load()
    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source, cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    data = task.prepare(raw, tokenizer, model)
    return {"data": data, "model_source": source, "info": task.info(data)}


def example_rows(encoded) -> list[dict[str, list[int]]]:
    return [{"input_ids": list(e.ids), "labels": e.labels} for e in encoded]


def contender_grad_accum(args: argparse.Namespace, name: str, data) -> int:
    """--grad-accum, except for peftlab-packed-matched: scaled by rows / examples, so that its packed epoch takes
    about as many optimizer steps as a padded one."""
    if name != "peftlab-packed-matched":
        return args.grad_accum
    return max(1, round(args.grad_accum * len(data.rows) / len(data.train_enc)))


def peftlab_padding(args: argparse.Namespace, data, packed: bool, grad_accum: int) -> dict[str, int]:
    """Real tokens and tokens incl. padding of a peftlab run, from its data order (train.epoch_permutation and
    step_micro_batches: what `peftlab train` builds its micro-batches from; one process, one epoch)."""
    from peftlab.loop import epoch_permutation, step_micro_batches, steps_per_epoch

    lengths = [len(e.ids) for e in data.train_enc]
    units = [sum(lengths[j] for j in row) for row in data.rows] if packed else lengths
    n = len(units)
    steps = steps_per_epoch(n, args.batch_size, grad_accum, 1)
    if args.steps:
        steps = min(steps, args.steps)
    perm = epoch_permutation(n, args.seed, 0)
    real = padded = 0
    for step in range(steps):
        for micro in step_micro_batches(perm, step, args.batch_size, grad_accum, 1, 0):
            real += sum(units[i] for i in micro)
            padded += len(micro) * max(units[i] for i in micro)
    return {"real_tokens": real, "tokens_with_padding": padded, "train_rows": n}


# --------------------------------------------------------------------------------------------------------------
# Contenders


def worker(kind: str, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "_instruction_contenders.py"), kind, *extra]


def peftlab_command(args: argparse.Namespace, packed: bool, grad_accum: int, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "peftlab", "train", "--task", "instruction", "--model", args.model,
           "--method", "lora", "--dataset", DATASET, "--max-length", str(args.max_length),
           "--batch-size", str(args.batch_size), "--grad-accum", str(grad_accum), "--lr", str(args.lr),
           "--epochs", "1", "--train-subset", str(args.examples), "--eval-subset", str(args.eval_examples),
           "--seed", str(args.seed), "--device", args.device, "--precision", PEFTLAB_PRECISION[args.precision],
           "--r", str(args.r), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
           "--target-modules", args.target_modules, "--output-dir", str(run_dir), "--overwrite",
           "--set", "eval_before=false", "--set", "max_new_tokens=1", "--set", "generation_subset=1",
           "--set", "logging_steps=1", "--set", f"packing={'true' if packed else 'false'}"]
    if args.steps:
        cmd += ["--max-steps", str(args.steps)]
    return cmd + shlex.split(args.peftlab_extra)


def run_peftlab(args: argparse.Namespace, name: str, paths: dict[str, Path], env: dict[str, str],
                data) -> dict[str, Any]:
    """`peftlab train` in a fresh process, then the response eval loss of its adapter in another."""
    packed = name in PACKED
    grad_accum = contender_grad_accum(args, name, data)
    run_dir = args.out / "runs" / name
    wall = run_logged(peftlab_command(args, packed, grad_accum, run_dir), args.out / "logs" / f"{name}.log", env,
                      args.timeout, REPO)
    from peftlab.record import RunRecord  # the one reader of results.json

    results = RunRecord.read(run_dir).to_dict()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train_time_s" in r and "tokens" in r]
    eval_out = args.out / "raw" / f"{name}-eval.json"
    run_logged(worker("eval", "--run-dir", str(run_dir), "--model-source", str(paths["model_source"]),
                      "--eval", str(paths["eval"]), "--device", args.device,
                      "--eval-batch-size", str(args.eval_batch_size), "--out", str(eval_out)),
               args.out / "logs" / f"{name}-eval.log", env, args.timeout, REPO)
    held = json.loads(eval_out.read_text())["heldout"]
    padding = peftlab_padding(args, data, packed, grad_accum)
    if rows and rows[-1]["tokens"] != padding["real_tokens"]:
        print(f"[{name}] note: metrics.jsonl counts {rows[-1]['tokens']} tokens, the data order "
              f"{padding['real_tokens']}", file=sys.stderr)
    return {"step_end_s": [r["train_time_s"] for r in rows], "tokens_cum": [r["tokens"] for r in rows],
            "memory": {"peak_rss_gb": results["memory"]["train"].get("cpu_peak_rss_gb"),
                       "cuda_max_allocated_gb": results["memory"]["train"].get("cuda_max_allocated_gb")},
            "heldout": held, "own_eval_loss": (results["metrics"].get("after") or {}).get("eval_loss"),
            "trainable_params": results["params"]["trainable_params"],
            "torch_threads": results["machine"].get("torch_threads"), "precision": results.get("precision"),
            "load_time_s": results["timing"]["load_time_s"], "process_wall_s": wall, "run_dir": str(run_dir),
            "grad_accum": grad_accum, **padding}


def run_baseline(args: argparse.Namespace, name: str, paths: dict[str, Path], env: dict[str, str]) -> dict[str, Any]:
    out = args.out / "raw" / f"{name}.json"
    cmd = worker(WORKER_KIND[name], "--model-source", str(paths["model_source"]), "--train", str(paths["train"]),
                 "--eval", str(paths["eval"]), "--device", args.device, "--precision", args.precision,
                 "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                 "--eval-batch-size", str(args.eval_batch_size), "--max-length", str(args.max_length),
                 "--lr", str(args.lr), "--r", str(args.r), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
                 "--target-modules", args.target_modules, "--seed", str(args.seed), "--out", str(out))
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    wall = run_logged(cmd, args.out / "logs" / f"{name}.log", env, args.timeout, REPO)
    return {**json.loads(out.read_text()), "process_wall_s": wall, "grad_accum": args.grad_accum}


# --------------------------------------------------------------------------------------------------------------
# Report


def row_of(name: str, run: dict[str, Any]) -> dict[str, Any]:
    s = summarise_steps(run["step_end_s"], run["tokens_cum"])
    steady = s["step_time_s"][1:] or s["step_time_s"]
    padded = run.get("tokens_with_padding")
    return {
        "contender": name,
        "real_tokens_per_s": s["tokens_per_s"],
        "real_tokens": s["tokens"],
        "tokens_with_padding": padded,
        "padding_fraction": 1 - run["real_tokens"] / padded if padded else None,
        "steps": s["steps"],
        "grad_accum": run.get("grad_accum"),
        "step_time_median_s": statistics.median(steady) if steady else None,
        "step_time_min_s": min(steady) if steady else None,
        "step_time_max_s": max(steady) if steady else None,
        "peak_rss_gb": run["memory"].get("peak_rss_gb"),
        "eval_loss": run["heldout"]["eval_loss"],
        "eval_tokens": run["heldout"]["eval_tokens"],
        "own_eval_loss": run.get("own_eval_loss"),
        "train_rows": run.get("train_rows"),
        "label_tokens": run.get("label_tokens"),
        "summary": s,
        "raw": run,
    }




def comparisons(rows: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each packed peftlab row / hf-trainer and / trl-packed, and the issue's done-when checks (where the rows
    exist)."""
    ratios: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    targets = (("hf-trainer", 1.5, "HF Trainer"), ("trl-packed", 1.0, "TRL packed"))
    for name, base, need, label in [(name, *target) for name in PACKED if name in rows for target in targets]:
        ours, other = rows[name], rows.get(base)
        if not other:
            continue
        r = ratios[f"{name} / {base}"] = {
            "real_tokens_per_s": ratio(ours["real_tokens_per_s"], other["real_tokens_per_s"]),
            "step_time_speedup": ratio(other["step_time_median_s"], ours["step_time_median_s"]),
            "peak_rss": ratio(ours["peak_rss_gb"], other["peak_rss_gb"]),
            "eval_loss_rel_diff": ratio(ours["eval_loss"] - other["eval_loss"], other["eval_loss"]),
        }
        if r["real_tokens_per_s"] is not None:
            checks.append({"check": f"real tokens/s {name} >= {need:g}x {label}",
                           "value": r["real_tokens_per_s"], "pass": r["real_tokens_per_s"] >= need})
        checks.append({"check": f"response eval loss {name} within 1% of {label}",
                       "value": r["eval_loss_rel_diff"], "pass": abs(r["eval_loss_rel_diff"]) <= 0.01})
    return ratios, checks




def cpu_description() -> dict[str, Any]:
    """The CPU's model name and its bf16-related flags."""
    from peftlab.precision import cpu_model_name, detect

    bf16 = sorted(f for f in detect("cpu").cpu_flags if "bf16" in f)
    return {"model_name": cpu_model_name() or "unknown", "bf16_flags": bf16, "cores": os.cpu_count()}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| contender | real tokens/s | padding | tokens incl. padding | s/step median (min-max) | steps "
             "(accumulation) | peak RSS (GB) | response eval loss |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"].values():
        pad = "-" if row["padding_fraction"] is None else f"{100 * row['padding_fraction']:.1f}%"
        lines.append(f"| {row['contender']} | {fmt(row['real_tokens_per_s'], '.1f')} | {pad} | "
                     f"{row['tokens_with_padding'] if row['tokens_with_padding'] is not None else '-'} | "
                     f"{fmt(row['step_time_median_s'], '.2f')} ({fmt(row['step_time_min_s'], '.2f')}-"
                     f"{fmt(row['step_time_max_s'], '.2f')}) | {row['steps']} ({row.get('grad_accum') or '-'}) | "
                     f"{fmt(row['peak_rss_gb'], '.2f')} | "
                     f"{fmt(row['eval_loss'], '.4f')} |")
    for name, err in report["failures"].items():
        lines.append(f"| {name} | failed: {err.splitlines()[0][:100]} | | | | | | |")
    if report["ratios"]:
        lines += ["", "| ratio | real tokens/s | step-time speedup | peak RSS | eval loss rel. diff |",
                  "|---|---|---|---|---|"]
        for name, r in report["ratios"].items():
            diff = r["eval_loss_rel_diff"]
            lines.append(f"| {name} | {fmt(r['real_tokens_per_s'], '.2f')}x | {fmt(r['step_time_speedup'], '.2f')}x"
                         f" | {fmt(r['peak_rss'], '.2f')}x | {'-' if diff is None else f'{100 * diff:+.2f}%'} |"
                         .replace("-x", "-"))
    if report["checks"]:
        lines += ["", "| issue 12 check | value | pass |", "|---|---|---|"]
        for c in report["checks"]:
            lines.append(f"| {c['check']} | {c['value']:+.4f} | {'yes' if c['pass'] else 'NO'} |"
                         if "loss" in c["check"] else
                         f"| {c['check']} | {c['value']:.3f}x | {'yes' if c['pass'] else 'NO'} |")
    s, d, cpu = report["settings"], report["data"], report["cpu"]
    own = [abs(r["own_eval_loss"] - r["eval_loss"]) for r in report["rows"].values() if r.get("own_eval_loss")]
    counted = {r["contender"]: r["label_tokens"] for r in report["rows"].values() if r.get("label_tokens") is not None}
    lines += ["", f"- Command: `{report['command']}`",
              f"- Workload: {s['model']} LoRA r {s['r']} / alpha {s['alpha']:g} / dropout {s['dropout']} on "
              f"{s['target_modules']}, lr {s['lr']}, micro-batch {s['batch_size']} x accumulation {s['grad_accum']}, "
              f"precision {s['precision']} (peftlab {PEFTLAB_PRECISION[s['precision']]}, HF/TRL "
              f"bf16={s['precision'] == 'bf16'}), "
              + (f"at most {s['steps']} optimizer step(s) (a smoke-test cap: packed contenders then train on more "
                 "examples than padded ones, so the budgets differ)" if s["steps"] else
                 "one epoch (every example once, for every contender)") + f", device {s['device']}.",
              f"- Data: {d['train_examples']} training examples of {d['train_source']} ({d['train_tokens']} tokens, "
              f"{d['train_label_tokens']} labelled; lengths {d['length_min']}-{d['length_max']}, mean "
              f"{d['length_mean']:.1f}), prompt template {d['template']}, max_length {s['max_length']}; "
              f"{d['eval_examples']} eval examples of {d['eval_source']}; peftlab's packing makes "
              f"{d['peftlab_packed_rows']} rows. All contenders train on the same encoded examples"
              + (" (labelled tokens counted in the HF/TRL micro-batches: "
                 + ", ".join(f"{k} {v}" for k, v in counted.items()) + ")." if counted else "."),
              "- real tokens/s and s/step exclude the first (warm-up) optimizer step (with one step, the whole run); "
              "padding = 1 - real tokens / tokens incl. padding, over all steps; response eval loss = total NLL over "
              "response tokens / response tokens, float32, computed outside every trainer"
              + (f" (peftlab's own figure differs by at most {max(own):.1e})." if own else "."),
              f"- CPU: {cpu['model_name']} ({cpu['cores']} cores), bf16 flags: "
              f"{', '.join(cpu['bf16_flags']) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.environ.get("PEFTLAB_DATA_DIR") and (REPO.parent / "shared" / "datasets").is_dir():
        os.environ["PEFTLAB_DATA_DIR"] = str(REPO.parent / "shared" / "datasets")
    args.precision = args.precision or default_precision()
    env = thread_env(args.threads)
    os.environ.update({k: v for k, v in env.items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    args.out.mkdir(parents=True, exist_ok=True)
    from peftlab.record import machine_info, package_versions

    work = encode_workload(args)
    data = work["data"]
    paths = {"train": args.out / "data" / "train.json", "eval": args.out / "data" / "eval.json",
             "model_source": Path(work["model_source"])}
    write_json(paths["train"], {"pad_id": data.pad_id, "examples": example_rows(data.train_enc)})
    write_json(paths["eval"], {"pad_id": data.pad_id, "examples": example_rows(data.eval_enc)})
    lengths = [len(e.ids) for e in data.train_enc]
    info = {"train_examples": len(data.train_enc), "eval_examples": len(data.eval_enc),
            "train_source": data.raw.splits.train.source, "eval_source": data.raw.splits.eval.source,
            "train_tokens": sum(lengths), "train_label_tokens": sum(len(e.ids) - e.prompt_len for e in data.train_enc),
            "length_min": min(lengths), "length_max": max(lengths), "length_mean": sum(lengths) / len(lengths),
            "template": data.template, "peftlab_packed_rows": len(data.rows), "notes": list(data.notes)}
    print(f"workload: {info['train_examples']} training examples ({info['train_tokens']} tokens), "
          f"{info['eval_examples']} eval examples, precision {args.precision}", file=sys.stderr)

    raw: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for name in args.contenders:
        t0 = time.perf_counter()
        try:
            if name.startswith("peftlab"):
                result = run_peftlab(args, name, paths, env, data)
            else:
                result = run_baseline(args, name, paths, env)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
            failures[name] = str(exc)
            print(f"[{name}] FAILED: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        raw[name] = result
        s = summarise_steps(result["step_end_s"], result["tokens_cum"])
        print(f"[{name}] {fmt(s['tokens_per_s'], '.1f')} real tok/s, eval loss {result['heldout']['eval_loss']:.4f}"
              f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    rows = {name: row_of(name, run) for name, run in raw.items()}
    ratios, checks = comparisons(rows)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": info, "rows": rows, "ratios": ratios, "checks": checks, "failures": failures,
        "cpu": cpu_description(), "machine": machine_info(), "versions": package_versions(),
    }
    table = markdown(report)
    write_json(args.out / "results.json", report)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
