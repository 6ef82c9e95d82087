"""Training-speed benchmark: peftlab vs HF Trainer + peft (the seed's stack) vs TRL SFTTrainer, same workload.

Workload (issue 7): smollm2-135m, WikiText-2 blocks of 128 tokens from the offline mirror, batch 4, gradient
accumulation 8, LoRA r 8 / alpha 16 / dropout 0.1 on q_proj,v_proj, lr 2e-4, a fixed number of optimizer steps.
The token blocks are built once, with peftlab's tokenization (tokenize_to_blocks through its block cache), and
every contender trains on exactly these blocks: the first steps x batch x accumulation training blocks, each
seen once (the order is each trainer's own shuffle). Every contender runs in a fresh process, one after the
other; the held-out loss is computed the same way for all (total NLL / predicted tokens over the same blocks, by
benchmarks/_common.py, not by peftlab), and peftlab also gets full fine-tuning and QLoRA rows.

    python benchmarks/bench_trainers.py --out bench-results                    # the full benchmark (CPU)
    python benchmarks/bench_trainers.py --out /tmp/b --model tiny-llama --steps 2 --grad-accum 2   # smoke test

Writes OUT/results.json (everything, raw per-step timings included) and OUT/results.md (the table), and prints
the table. Definitions of each figure are in benchmarks/_common.py.
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

import numpy as np
from _common import (
    array_digest,
    fmt,
    ratio,
    run_logged,
    summarise_steps,
    thread_env,
    workload_blocks,
    workload_flops,
    write_json,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FP32_CONTENDERS = ("peftlab-lora", "peftlab-lora-2proc", "hf-trainer-lora", "trl-sft-lora", "peftlab-full",
                   "peftlab-qlora")
BF16_SUFFIX = "-bf16"  # peftlab --precision bf16-mixed (QLoRA: bf16 compute); HF Trainer / TRL bf16=True
BF16_TRUE_SUFFIX = "-bf16true"  # peftlab --precision bf16-true (every weight and state in bf16)
BF16_CONTENDERS = ("peftlab-lora-bf16", "hf-trainer-lora-bf16", "trl-sft-lora-bf16", "peftlab-qlora-bf16",
                   "peftlab-full-bf16", "peftlab-lora-bf16true")
CONTENDERS = FP32_CONTENDERS + BF16_CONTENDERS
OURS_LORA = ("peftlab-lora", "peftlab-lora-2proc")  # one process with all threads; two processes of one share each
MULTI_PROCESS_SUFFIX = "-2proc"
BASELINES = ("hf-trainer-lora", "trl-sft-lora")


def is_bf16(name: str) -> bool:
    return name.endswith((BF16_SUFFIX, BF16_TRUE_SUFFIX))


def peftlab_precision(name: str) -> str:
    """The --precision of a peftlab contender."""
    return "bf16-true" if name.endswith(BF16_TRUE_SUFFIX) else "bf16-mixed" if is_bf16(name) else "fp32"


def method_of(name: str) -> str:
    """The method a contender trains: full, qlora or lora."""
    base = name.removesuffix(BF16_SUFFIX).removesuffix(BF16_TRUE_SUFFIX).removesuffix(MULTI_PROCESS_SUFFIX)
    return "full" if base.endswith("full") else "qlora" if base.endswith("qlora") else "lora"


def adapter_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The workload's adapter settings; each method takes those of them it has fields for."""
    return {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": args.target_modules}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, logs/)")
    p.add_argument("--model", default="smollm2-135m", help="peftlab model alias or folder (default smollm2-135m)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per contender (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender, interleaved (default 1)")
    p.add_argument("--contenders", default=",".join(FP32_CONTENDERS), help="comma-separated subset of " +
                   ", ".join(CONTENDERS) + " (default: the fp32 ones; 'all' for every one)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks for the eval loss (default 32)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads for every process, GEMM peak included (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gemm-sizes", default="1024,2048,4096", help="square sizes for the GEMM peak")
    p.add_argument("--gemm-repeats", type=int, default=3, help="timed matmuls per size (the best counts)")
    p.add_argument("--peftlab-extra", default="",
                   help="extra arguments for `peftlab train` (e.g. '--set compile=true')")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per contender process (default 3600)")
    args = p.parse_args(argv)
    args.contenders = list(CONTENDERS) if args.contenders == "all" else [
        c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    return args




def worker(kind: str, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "_contenders.py"), kind, *extra]


def peftlab_command(args: argparse.Namespace, method: str, run_dir: Path, train_blocks: int,
                    processes: int = 1, precision: str = "fp32") -> list[str]:
    """`peftlab train` for the workload; on several processes the accumulation is divided so that the global
    batch (batch x accumulation x processes) stays the same."""
    if args.grad_accum % processes:
        raise ValueError(f"--grad-accum {args.grad_accum} does not divide among {processes} processes")
    cmd = [sys.executable, "-m", "peftlab", "train", "--model", args.model, "--method", method,
           "--dataset", "wikitext-2-raw-v1", "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.grad_accum // processes), "--processes", str(processes),
           "--lr", str(args.lr), "--max-steps", str(args.steps),
           "--train-subset", str(train_blocks), "--eval-subset", str(args.eval_blocks), "--seed", str(args.seed),
           "--device", args.device, "--precision", precision, "--output-dir", str(run_dir), "--overwrite",
           "--set", "eval_before=false", "--set", "max_new_tokens=1", "--set", "logging_steps=1"]
    from peftlab.methods import get_method

    fields = adapter_fields(args)
    for field in [f for f in fields if f in get_method(method).field_names()]:  # --r, --alpha, ...
        cmd += ["--" + field.replace("_", "-"), str(fields[field])]
    return cmd + shlex.split(args.peftlab_extra)


def run_peftlab(args: argparse.Namespace, name: str, tag: str, paths: dict[str, Path], env: dict[str, str],
                train_blocks: int) -> dict[str, Any]:
    """`peftlab train` in a fresh process, then an independent held-out evaluation of what it saved."""
    processes = 2 if name.endswith(MULTI_PROCESS_SUFFIX) else 1
    method = method_of(name)
    run_dir = args.out / "runs" / tag
    if processes > 1:  # the launcher gives each process its share of the cores
        env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    precision = peftlab_precision(name)
    wall = run_logged(peftlab_command(args, method, run_dir, train_blocks, processes, precision),
                      args.out / "logs" / f"{tag}.log", env, args.timeout, REPO)
    from peftlab.record import RunRecord  # the one reader of results.json

    results = RunRecord.read(run_dir).to_dict()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train_time_s" in r and "tokens" in r]  # training steps, not evaluation lines
    eval_out = args.out / "raw" / f"{tag}-eval.json"
    run_logged(worker("eval", "--run-dir", str(run_dir), "--model-source", str(paths["model_source"]),
                      "--eval-blocks", str(paths["eval"]), "--device", args.device, "--out", str(eval_out)),
               args.out / "logs" / f"{tag}-eval.log", env, args.timeout, REPO)
    held = json.loads(eval_out.read_text())["heldout"]
    mem = results["memory"]["train"]
    # On one machine the processes share its RAM: their peaks add up (an upper bound on the joint peak).
    rss = [p["cpu_peak_rss_gb"] for p in results["memory"].get("train_per_process", [mem])]
    return {"step_end_s": [r["train_time_s"] for r in rows], "tokens_cum": [r["tokens"] for r in rows],
            "processes": results["timing"]["processes"],
            "memory": {"peak_rss_gb": sum(rss) if None not in rss else None,
                       "cuda_max_allocated_gb": mem.get("cuda_max_allocated_gb"),
                       "cuda_max_reserved_gb": mem.get("cuda_max_reserved_gb")},
            "heldout": held, "own_eval_loss": (results["metrics"].get("after") or {}).get("eval_loss"),
            "trainable_params": results["params"]["trainable_params"],
            "torch_threads": results["machine"].get("torch_threads"), "dtype": results["model"]["dtype"],
            "precision": results["model"].get("precision"),
            "train_blocks": results["data"]["train"]["blocks_used"],
            "eval_blocks": results["data"]["eval"]["blocks_used"],
            "load_time_s": results["timing"]["load_time_s"], "process_wall_s": wall, "run_dir": str(run_dir)}


def run_baseline(args: argparse.Namespace, name: str, tag: str, paths: dict[str, Path],
                 env: dict[str, str]) -> dict[str, Any]:
    kind = "hf" if name.startswith("hf") else "trl"
    out = args.out / "raw" / f"{tag}.json"
    cmd = worker(kind, "--model-source", str(paths["model_source"]), "--train-blocks", str(paths["train"]),
                 "--eval-blocks", str(paths["eval"]), "--device", args.device,
                 "--dtype", "bfloat16" if args.device == "cuda" else "float32", "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--lr", str(args.lr),
                 "--r", str(args.r), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
                 "--target-modules", args.target_modules, "--seed", str(args.seed), "--out", str(out),
                 *(["--bf16"] if is_bf16(name) else []))
    wall = run_logged(cmd, args.out / "logs" / f"{tag}.log", env, args.timeout, REPO)
    return {**json.loads(out.read_text()), "process_wall_s": wall}


def measure_gemm(args: argparse.Namespace, env: dict[str, str], tag: str, dtype: str) -> dict[str, Any]:
    out = args.out / "raw" / f"gemm-{tag}-{dtype}.json"
    run_logged(worker("gemm", "--sizes", args.gemm_sizes, "--repeats", str(args.gemm_repeats), "--device",
                      args.device, "--dtype", dtype, "--out", str(out)),
               args.out / "logs" / f"gemm-{tag}-{dtype}.log", env, args.timeout, REPO)
    return json.loads(out.read_text())


def aggregate(name: str, runs: list[dict[str, Any]], flops: float, peak_gflops: float) -> dict[str, Any]:
    """One table row from a contender's runs: medians over repeats, spreads over all post-warm-up steps."""
    summaries = [summarise_steps(r["step_end_s"], r["tokens_cum"]) for r in runs]
    speeds = [s["tokens_per_s"] for s in summaries if s["tokens_per_s"]]
    steady = [t for s in summaries for t in (s["step_time_s"][1:] or s["step_time_s"])]
    tokens_per_s = statistics.median(speeds) if speeds else None
    achieved = flops * tokens_per_s / 1e9 if tokens_per_s else None
    first = runs[0]
    return {
        "contender": name,
        "method": method_of(name),
        "precision": peftlab_precision(name) if name.startswith("peftlab") else "bf16" if is_bf16(name) else "fp32",
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_runs": speeds,
        "step_time_median_s": statistics.median(steady) if steady else None,
        "step_time_min_s": min(steady) if steady else None,
        "step_time_max_s": max(steady) if steady else None,
        "steps_timed": len(steady),
        "peak_rss_gb": max((r["memory"].get("peak_rss_gb") or 0.0) for r in runs) or None,
        "cuda_max_allocated_gb": first["memory"].get("cuda_max_allocated_gb"),
        "cuda_max_reserved_gb": first["memory"].get("cuda_max_reserved_gb"),
        "eval_loss": first["heldout"]["eval_loss"],
        "eval_loss_runs": [r["heldout"]["eval_loss"] for r in runs],
        "eval_tokens": first["heldout"]["eval_tokens"],
        "own_eval_loss": first.get("own_eval_loss"),
        "flops_per_token": flops,
        "achieved_gflops": achieved,
        "mfu": achieved / peak_gflops if achieved else None,
        "torch_threads": first.get("torch_threads"),
        "trainable_params": first.get("trainable_params"),
        "tokens_trained": summaries[0]["tokens"],
        "runs": [{**s, "raw": r} for s, r in zip(summaries, runs, strict=True)],
    }




#: Issue 12's targets for peftlab LoRA bf16-mixed: (other row, at least this many times its tokens/s).
BF16_SPEED_TARGETS = (("peftlab-lora", 1.9), ("hf-trainer-lora-bf16", 1.2), ("trl-sft-lora-bf16", 1.6))


def bf16_checks(rows: dict[str, dict[str, Any]], ratios: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's done-when checks for the bf16 rows (where the rows exist), adding their ratios."""
    checks: list[dict[str, Any]] = []
    ours = rows.get("peftlab-lora-bf16")
    if ours:
        for other, need in BF16_SPEED_TARGETS:
            if rows.get(other):
                value = ratio(ours["tokens_per_s"], rows[other]["tokens_per_s"])
                ratios[f"peftlab-lora-bf16 / {other}"] = {
                    "tokens_per_s": value, "peak_rss": ratio(ours["peak_rss_gb"], rows[other]["peak_rss_gb"]),
                    "eval_loss_rel_diff": ratio(ours["eval_loss"] - rows[other]["eval_loss"],
                                                rows[other]["eval_loss"])}
                if value is not None:
                    checks.append({"check": f"tokens/s peftlab-lora-bf16 >= {need:g}x {other}", "value": value,
                                   "pass": value >= need})
        if ours["mfu"] is not None:
            checks.append({"check": "peftlab-lora-bf16 MFU >= 55% of the bf16 GEMM peak", "value": ours["mfu"],
                           "pass": ours["mfu"] >= 0.55})
        q = rows.get("peftlab-qlora-bf16")
        if q:
            value = ratios["peftlab-qlora-bf16 / peftlab-lora-bf16"] = {
                "tokens_per_s": ratio(q["tokens_per_s"], ours["tokens_per_s"])}
            if value["tokens_per_s"] is not None:
                checks.append({"check": "peftlab-qlora-bf16 >= 0.8x peftlab-lora-bf16 tokens/s",
                               "value": value["tokens_per_s"], "pass": value["tokens_per_s"] >= 0.8})
    for name, row in rows.items():  # every bf16 row's eval loss against its fp32 twin's
        twin = rows.get(name.removesuffix(BF16_SUFFIX).removesuffix(BF16_TRUE_SUFFIX)) if is_bf16(name) else None
        if twin:
            diff = ratio(row["eval_loss"] - twin["eval_loss"], twin["eval_loss"])
            checks.append({"check": f"eval loss {name} within 1% of {twin['contender']}", "value": diff,
                           "pass": abs(diff) <= 0.01})
    return checks


def comparisons(rows: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ratios of each peftlab LoRA row to each contender, and issue 7's done-when checks (where the rows exist)."""
    ratios: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    for name in OURS_LORA:
        ours = rows.get(name)
        if not ours:
            continue
        for base in BASELINES:
            other = rows.get(base)
            if not other:
                continue
            r = ratios[f"{name} / {base}"] = {
                "tokens_per_s": ratio(ours["tokens_per_s"], other["tokens_per_s"]),
                "step_time_speedup": ratio(other["step_time_median_s"], ours["step_time_median_s"]),
                "peak_rss": ratio(ours["peak_rss_gb"], other["peak_rss_gb"]),
                "eval_loss_rel_diff": ratio(ours["eval_loss"] - other["eval_loss"], other["eval_loss"]),
            }
            key = "HF Trainer" if base.startswith("hf") else "TRL"
            if r["tokens_per_s"] is not None:
                need = 1.3 if key == "HF Trainer" else 1.0
                checks.append({"check": f"tokens/s {name} {'>=' if need > 1 else '>'} {need:g}x {key}",
                               "value": r["tokens_per_s"],
                               "pass": r["tokens_per_s"] >= need if need > 1 else r["tokens_per_s"] > need})
            checks.append({"check": f"eval loss {name} within 1% of {key}", "value": r["eval_loss_rel_diff"],
                           "pass": abs(r["eval_loss_rel_diff"]) <= 0.01})
        if ours["mfu"] is not None:
            checks.append({"check": f"{name} MFU >= 60% of GEMM peak", "value": ours["mfu"],
                           "pass": ours["mfu"] >= 0.6})
    checks += bf16_checks(rows, ratios)
    ours = rows.get("peftlab-lora")
    if ours:
        for other in ("peftlab-qlora", "peftlab-full"):
            if rows.get(other):
                ratios[f"{other} / peftlab-lora"] = {"tokens_per_s": ratio(rows[other]["tokens_per_s"],
                                                                           ours["tokens_per_s"])}
        q = ratios.get("peftlab-qlora / peftlab-lora")
        if q and q["tokens_per_s"] is not None:
            checks.append({"check": "QLoRA >= 0.8x LoRA tokens/s", "value": q["tokens_per_s"],
                           "pass": q["tokens_per_s"] >= 0.8})
    return ratios, checks


def bf16_capability(device: str) -> str:
    """Whether this device computes bf16 natively (peftlab's own detection), for the report's footer."""
    from peftlab.precision import NATIVE_BF16_FLAGS, detect

    native = detect(device).native_bf16
    return native or f"no native bf16 ({' / '.join(NATIVE_BF16_FLAGS)} absent): emulated, slower than fp32"




def own_eval_gap(report: dict[str, Any]) -> float | None:
    """Largest |peftlab's own eval loss - the independent one| over the peftlab rows (a cross-check)."""
    gaps = [abs(r["own_eval_loss"] - r["eval_loss"]) for r in report["rows"].values() if r.get("own_eval_loss")]
    return max(gaps) if gaps else None


def markdown(report: dict[str, Any]) -> str:
    cuda = report["settings"]["device"] == "cuda"
    mem_head = "peak alloc / reserved (GB)" if cuda else "train peak RSS (GB)"
    lines = [f"| contender | tokens/s | s/step median (min-max) | {mem_head} | eval loss | MFU | GFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"].values():
        mem = (f"{fmt(row['cuda_max_allocated_gb'], '.2f')} / {fmt(row['cuda_max_reserved_gb'], '.2f')}" if cuda
               else fmt(row["peak_rss_gb"], ".2f"))
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"| {row['contender']} | {fmt(row['tokens_per_s'], '.1f')} | "
                     f"{fmt(row['step_time_median_s'], '.2f')} ({fmt(row['step_time_min_s'], '.2f')}-"
                     f"{fmt(row['step_time_max_s'], '.2f')}) | {mem} | {fmt(row['eval_loss'], '.4f')} | {mfu} | "
                     f"{fmt(row['achieved_gflops'], '.1f')} |")
    for name, err in report["failures"].items():
        lines.append(f"| {name} | failed: {err.splitlines()[0][:80]} | | | | | |")
    if report["ratios"]:
        lines += ["", "| ratio | tokens/s | step-time speedup | peak memory | eval loss rel. diff |",
                  "|---|---|---|---|---|"]
        for name, r in report["ratios"].items():
            diff = r.get("eval_loss_rel_diff")
            lines.append(f"| {name} | {fmt(r.get('tokens_per_s'), '.2f')}x | "
                         f"{fmt(r.get('step_time_speedup'), '.2f')}x | {fmt(r.get('peak_rss'), '.2f')}x | "
                         f"{'-' if diff is None else f'{100 * diff:+.2f}%'} |".replace("-x", "-"))
    if report["checks"]:
        lines += ["", "| issue 7 check | value | pass |", "|---|---|---|"]
        for c in report["checks"]:
            lines.append(f"| {c['check']} | {c['value']:.3f} | {'yes' if c['pass'] else 'NO'} |")
    g, s, shape = report["gemm"], report["settings"], report["flops"]["shape"]
    counted = report["flops"]["methods"].values()
    lines += ["", f"- Command: `{report['command']}`",
              f"- Workload: {s['model']}, blocks of {s['block_size']}, batch {s['batch_size']} x accumulation "
              f"{s['grad_accum']}, {s['steps']} optimizer steps ({report['data']['train_blocks']} training blocks, "
              f"each once), LoRA r {s['r']} / alpha {s['alpha']:g} / dropout {s['dropout']} on {s['target_modules']}, "
              f"lr {s['lr']}, {s['repeats']} run(s) per contender, device {s['device']}.",
              f"- Data: {report['data']['train_source']} -> {report['data']['eval_source']} "
              f"({report['data']['eval_blocks']} held-out blocks); token blocks sha256 {report['data']['train_sha']} / "
              f"{report['data']['eval_sha']}.",
              *[f"- GEMM peak ({dtype} matmul, {g[dtype]['torch_threads']} threads): {g[dtype]['gflops']:.1f} "
                f"GFLOP/s (before {report['gemm_before'][dtype]['gflops']:.1f}, after "
                f"{report['gemm_after'][dtype]['gflops']:.1f}; the higher is used for the MFU of the "
                f"{'bf16' if dtype == 'bfloat16' else 'fp32'} rows)." for dtype in sorted(g)],
              f"- CPU: {report['machine'].get('cpu') or '?'}; bf16: {report['bf16']}.",
              "- FLOPs/token, as each method counts them: "
              + "; ".join(f"{m['display_name']} {m['formula']}" + (f" (N_trainable = {m['n_trainable']:,})"
                                                                      if "N_trainable" in m["formula"] else "")
                          for m in counted)
              + f"; N = {shape['n_matmul']:,} matmul weights (LM head included), L = {shape['layers']}, "
              f"T = {s['block_size']}, d_attn = {shape['d_attn']}.",
              *([f"- peftlab-lora-2proc: `peftlab train --processes 2 --grad-accum {s['grad_accum'] // 2}`, two "
                 "data-parallel processes with an equal share of the cores each (gloo), the same global batch; its "
                 "peak RSS is the sum of both processes' peaks."] if "peftlab-lora-2proc" in report["rows"] else []),
              "- tokens/s and s/step exclude the first (warm-up) step; eval loss = total NLL / predicted tokens on "
              "the same held-out blocks, computed outside peftlab for every row"
              + (f" (peftlab's own figure differs by at most {own:.1e})." if (own := own_eval_gap(report)) is not None
                 else "."),
              f"- Machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.environ.get("PEFTLAB_DATA_DIR") and (REPO.parent / "shared" / "datasets").is_dir():
        os.environ["PEFTLAB_DATA_DIR"] = str(REPO.parent / "shared" / "datasets")
    env = thread_env(args.threads)
    os.environ.update({k: v for k, v in env.items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    args.out.mkdir(parents=True, exist_ok=True)
    from peftlab.models import resolve_model_source
    from peftlab.record import machine_info, package_versions

    train_blocks = args.steps * args.batch_size * args.grad_accum
    data = workload_blocks(args.model, args.block_size, train_blocks, args.eval_blocks)
    paths = {"train": args.out / "blocks" / "train.npy", "eval": args.out / "blocks" / "eval.npy",
             "model_source": Path(resolve_model_source(args.model))}
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    np.save(paths["train"], data["train"])
    np.save(paths["eval"], data["eval"])
    flops = workload_flops(str(paths["model_source"]), args.block_size,
                           {method_of(name): adapter_fields(args) for name in args.contenders})
    print(f"workload: {train_blocks} training blocks, {len(data['eval'])} held-out blocks; "
          f"N={flops['shape']['n_matmul']:,}", file=sys.stderr)

    # The GEMM peak of each precision in play, measured before and after the contenders (the higher counts); the
    # MFU of a row is taken against its own precision's peak.
    dtypes = sorted({"bfloat16" if is_bf16(name) else "float32" for name in args.contenders})
    gemm_before = {dtype: measure_gemm(args, env, "before", dtype) for dtype in dtypes}
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in args.contenders}
    failures: dict[str, str] = {}
    for rep in range(args.repeats):
        for name in args.contenders:
            if name in failures:
                continue
            tag = f"{name}-rep{rep}"
            t0 = time.perf_counter()
            try:
                if name.startswith("peftlab"):
                    result = run_peftlab(args, name, tag, paths, env, train_blocks)
                else:
                    result = run_baseline(args, name, tag, paths, env)
            except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
                failures[name] = str(exc)
                print(f"[{tag}] FAILED: {exc}", file=sys.stderr)
                continue
            raw[name].append(result)
            s = summarise_steps(result["step_end_s"], result["tokens_cum"])
            print(f"[{tag}] {fmt(s['tokens_per_s'], '.1f')} tok/s, {fmt(s['step_time_median_s'], '.2f')} s/step, "
                  f"eval loss {result['heldout']['eval_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    gemm_after = {dtype: measure_gemm(args, env, "after", dtype) for dtype in dtypes}
    gemm = {dtype: max(gemm_before[dtype], gemm_after[dtype], key=lambda g: g["gflops"]) for dtype in dtypes}

    rows = {}
    for name, runs in raw.items():
        if runs:
            per_token = flops["methods"][method_of(name)]["per_token"]
            rows[name] = aggregate(name, runs, per_token, gemm["bfloat16" if is_bf16(name) else "float32"]["gflops"])
    ratios, checks = comparisons(rows)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"train_source": data["train_source"], "eval_source": data["eval_source"], "note": data["note"],
                 "train_blocks": int(len(data["train"])), "eval_blocks": int(len(data["eval"])),
                 "train_sha": array_digest(data["train"]), "eval_sha": array_digest(data["eval"])},
        "flops": flops,
        "gemm": gemm, "gemm_before": gemm_before, "gemm_after": gemm_after,
        "rows": rows, "ratios": ratios, "checks": checks, "failures": failures,
        "machine": machine_info(), "versions": package_versions(), "bf16": bf16_capability(args.device),
    }
    table = markdown(report)
    write_json(args.out / "results.json", report)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
