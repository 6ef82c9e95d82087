"""The GPU check's answers (benchmarks/gpu_check.sh, issue 24), rebuilt from whatever rows have finished: run after
every row, so that a run stopped by its time limit still leaves the answers it reached.

    python benchmarks/gpu_check_report.py WORK OUT

reads WORK/q1/<row>/ (`peftlab train` runs), WORK/q2/<row>/ (memory_scale.py results), WORK/q2-plan-<shape>.txt
(the 32-layer plans), WORK/q3/ (bench_trainers.py results) and WORK/fsdp/, and writes OUT/answers.md and
OUT/answers.json. A row that has not finished is listed as missing, never as passed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def loss_curve(run: Path) -> list[float]:
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def weights_changed(run: Path, base: Path) -> bool | None:
    """LoRA: some lora_B is non-zero (peft starts B at zero). Full: some saved weight differs from the base's."""
    from safetensors.torch import load_file

    adapter = run / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        tensors = load_file(adapter)
        return any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)
    saved = sorted((run / "model").glob("*.safetensors"))
    if not saved:
        return None
    base_tensors: dict = {}
    for f in sorted(Path(base).glob("*.safetensors")):
        base_tensors.update(load_file(f))
    for f in saved:
        for key, tensor in load_file(f).items():
            ref = base_tensors.get(key)
            if ref is not None and ref.shape == tensor.shape and not ref.to(tensor.dtype).equal(tensor):
                return True
    return False


def q1_row(run: Path) -> dict[str, Any]:
    """Does this method train on the GPU: loss falls, weights change, eval perplexity finite and below the base's."""
    results = read_json(run / "results.json")
    if results is None:
        return {"row": run.name, "finished": False}
    curve = loss_curve(run)
    before = (results["metrics"].get("before") or {}).get("perplexity")
    after = (results["metrics"].get("after") or {}).get("perplexity")
    changed = weights_changed(run, Path(results["model"]["source"]))
    checks = {"train loss falls": len(curve) >= 2 and curve[-1] < curve[0],
              "weights changed": bool(changed),
              "eval perplexity finite and below the base's": after is not None and before is not None
              and math.isfinite(after) and after < before}
    mem = results["memory"]["train"]
    return {"row": run.name, "finished": True, "method": results["method"]["name"],
            "precision": results["model"]["precision"], "loss_first": curve[0] if curve else None,
            "loss_last": curve[-1] if curve else None, "ppl_before": before, "ppl_after": after,
            "tokens_per_s": results["timing"].get("tokens_per_s"),
            "cuda_max_allocated_gb": mem.get("cuda_max_allocated_gb"),
            "cuda_max_reserved_gb": mem.get("cuda_max_reserved_gb"), "checks": checks,
            "pass": all(checks.values())}


def q2_rows(q2: Path) -> list[dict[str, Any]]:
    out = []
    for folder in sorted(p for p in q2.iterdir() if p.is_dir()) if q2.is_dir() else []:
        results = read_json(folder / "results.json")
        if results is None:
            out.append({"row": folder.name, "finished": False})
            continue
        for key, row in results["rows"].items():
            out.append({"row": folder.name, "finished": True, "run": key, "model": results["meta"]["model"],
                        "load_peak_gb": row.get("load_peak_gb"), "measured_gb": row["measured_peak_gb"],
                        "measured_kind": row["measured_kind"], "planned_gb": row["predicted_peak_gb"],
                        "error_pct": row["error_pct"]})
        for key, why in results["meta"].get("skipped", {}).items():
            out.append({"row": folder.name, "finished": True, "run": key, "skipped": why})
    return out


def q2_full_plans(work: Path) -> dict[str, str]:
    return {p.stem.removeprefix("q2-plan-"): p.read_text(encoding="utf-8").strip()
            for p in sorted(work.glob("q2-plan-*.txt"))}


def q3_summary(q3: Path) -> dict[str, Any] | None:
    report = read_json(q3 / "results.json")
    if report is None:
        return None
    rows = {name: {k: row.get(k) for k in ("tokens_per_s", "mfu", "achieved_gflops", "cuda_max_allocated_gb",
                                           "eval_loss", "precision")}
            for name, row in report["rows"].items()}
    gemm = {dtype: g["gflops"] for dtype, g in report["gemm"].items()}
    return {"rows": rows, "ratios": report["ratios"], "gemm_gflops_measured": gemm,
            "failures": report["failures"]}


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(answers: dict[str, Any]) -> str:
    lines = ["# GPU check: the three answers", "", f"Device: {answers['device']}", "",
             "## 1. Does each method train on a GPU?", "",
             "| row | loss first -> last | ppl base -> after | weights changed | max alloc / reserved GiB | tokens/s "
             "| pass |", "|---|---|---|---|---|---|---|"]
    for r in answers["q1"]:
        if not r["finished"]:
            lines.append(f"| {r['row']} | not finished | | | | | NO |")
            continue
        lines.append(f"| {r['row']} | {fmt(r['loss_first'])} -> {fmt(r['loss_last'])} | {fmt(r['ppl_before'], '.1f')}"
                     f" -> {fmt(r['ppl_after'], '.1f')} | {'yes' if r['checks']['weights changed'] else 'NO'} | "
                     f"{fmt(r['cuda_max_allocated_gb'], '.2f')} / {fmt(r['cuda_max_reserved_gb'], '.2f')} | "
                     f"{fmt(r['tokens_per_s'], '.0f')} | {'yes' if r['pass'] else 'NO'} |")
    lines += ["", "## 2. Memory against the planner at 7B width (few layers)", "",
              "| row | run | load peak GiB | training peak GiB | plan GiB | error |", "|---|---|---|---|---|---|"]
    for r in answers["q2"]:
        if not r["finished"]:
            lines.append(f"| {r['row']} | not finished | | | | |")
        elif "skipped" in r:
            lines.append(f"| {r['row']} | {r['run']}: skipped ({r['skipped']}) | | | | |")
        else:
            lines.append(f"| {r['row']} | {r['run']} | {fmt(r['load_peak_gb'], '.2f')} | {fmt(r['measured_gb'], '.2f')}"
                         f" ({r['measured_kind']}) | {fmt(r['planned_gb'], '.2f')} | {r['error_pct']:+.1f}% |")
    for shape, text in answers["q2_full_plans"].items():
        lines += ["", f"Planner at the full 32 layers, {shape} (beside the seed's claim):", "", "```", text, "```"]
    lines += ["", "## 3. Speed against HF Trainer (few-layer 7B width, micro-batch 8 x 2048)", ""]
    q3 = answers["q3"]
    if q3 is None:
        lines.append("not finished")
    else:
        lines += ["| contender | tokens/s | MFU (of the measured bf16 GEMM peak) | max alloc GiB | eval loss |",
                  "|---|---|---|---|---|"]
        for name, r in q3["rows"].items():
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {name} | {fmt(r['tokens_per_s'], '.0f')} | {mfu} | "
                         f"{fmt(r['cuda_max_allocated_gb'], '.2f')} | {fmt(r['eval_loss'], '.4f')} |")
        lines += ["", "GEMM peak measured in the same run (not the datasheet's): "
                  + ", ".join(f"{k} {v / 1000:.1f} TFLOP/s" for k, v in q3["gemm_gflops_measured"].items()),
                  *[f"- {k}: {fmt(v.get('tokens_per_s'), '.2f')}x tokens/s" for k, v in q3["ratios"].items()],
                  *[f"- failed: {k}: {v.splitlines()[0][:160]}" for k, v in q3["failures"].items()]]
    fsdp = answers["fsdp"]
    lines += ["", "## One-process FSDP2 smoke test", "",
              "not finished" if fsdp is None else
              f"full bf16-mixed through fully_shard: loss {fmt(fsdp['loss_first'])} -> {fmt(fsdp['loss_last'])}, "
              f"{'pass' if fsdp['pass'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def build(work: Path) -> dict[str, Any]:
    q1 = [q1_row(p) for p in sorted((work / "q1").iterdir()) if p.is_dir()] if (work / "q1").is_dir() else []
    fsdp = q1_row(work / "fsdp") if (work / "fsdp" / "results.json").is_file() else None
    device = (work / "device.txt").read_text(encoding="utf-8").strip() if (work / "device.txt").is_file() else "?"
    return {"device": device, "q1": q1, "q2": q2_rows(work / "q2"), "q2_full_plans": q2_full_plans(work),
            "q3": q3_summary(work / "q3"), "fsdp": fsdp}


def main(argv: list[str] | None = None) -> int:
    work, out = (Path(a) for a in (argv or sys.argv[1:])[:2])
    answers = build(work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.json").write_text(json.dumps(answers, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "answers.md").write_text(markdown(answers), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
