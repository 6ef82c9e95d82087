"""The seed-style result row: model | training type | (r, alpha) | time/epoch | metric | memory."""

from __future__ import annotations

from typing import Any

METRIC_LABELS = {"perplexity": "Perplexity", "accuracy": "Accuracy", "rougeL": "ROUGE-L", "macro_f1": "Macro-F1",
                 "bleu": "BLEU", "exact_match": "Exact match"}
#: Columns after Memory for a task's other metrics (each before → after), by task name.
EXTRA_METRICS = {"classification": ("macro_f1",), "instruction": ("perplexity", "bleu", "exact_match")}
LOWER_IS_BETTER = {"perplexity", "eval_loss"}
LORA_FAMILY = {"lora", "qlora", "dora", "rslora", "pissa", "loraplus"}


def training_type(results: dict[str, Any]) -> str:
    """'Full', 'LoRA', 'QLoRA'... as in the seed's tables."""
    names = {"full": "Full", "lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "rslora": "rsLoRA",
             "pissa": "PiSSA", "loraplus": "LoRA+", "ia3": "IA3", "prefix": "Prefix"}
    method = results["method"]["name"]
    return names.get(method, method)


def lora_shape(results: dict[str, Any]) -> str:
    """'(r, alpha)' for LoRA-family methods, '-' otherwise."""
    if results["method"]["name"] not in LORA_FAMILY:
        return "-"
    return f"({results['method']['r']}, {results['method']['alpha']:g})"


def format_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def format_result_row(results: dict[str, Any]) -> str:
    """A markdown header and row for one run, plus a line saying which data it used."""
    metric = results["task"]["metric"]
    before = (results["metrics"].get("before") or {}).get(metric)
    after = results["metrics"]["after"][metric]
    arrow = "↑" if results["task"]["higher_is_better"] else "↓"
    label = METRIC_LABELS.get(metric, metric)
    minutes = results["timing"]["time_per_epoch_s"] / 60 if results["timing"]["time_per_epoch_s"] else None
    memory = results["memory"]["headline_gb"]
    header = (f"| Model | Training Type | LoRA Config (r, alpha) | Time/Epoch (min) | {label} {arrow} "
              "(before → after) | Memory (GB) |")
    row = (f"| {results['model']['name']} | {training_type(results)} | {lora_shape(results)} | "
           f"{minutes:.2f} | {format_metric(before)} → {format_metric(after)} | "
           f"{memory:.2f} |" if minutes is not None and memory is not None else "")
    extras = [m for m in EXTRA_METRICS.get(results["task"]["name"], ()) if m in results["metrics"]["after"]]
    for name in extras:
        header += f" {METRIC_LABELS.get(name, name)} {'↓' if name in LOWER_IS_BETTER else '↑'} (before → after) |"
        if row:
            row += (f" {format_metric((results['metrics'].get('before') or {}).get(name))} → "
                    f"{format_metric(results['metrics']['after'][name])} |")
    notes = "; ".join(data_used(results) + list((results.get("data") or {}).get("notes", [])))
    return "\n".join([header, "|---|---|---|---|---|---|" + "---|" * len(extras), row, f"data: {notes}"])


def data_used(results: dict[str, Any]) -> list[str]:
    """'train: <source> (N of M blocks)' and the same for eval: which data (and subset) a run used."""
    data = results.get("data") or {}
    used = []
    for role in ("train", "eval"):
        part = data.get(role) or {}
        if part:
            unit = "blocks" if "blocks_used" in part else "examples"
            n_used = part.get("blocks_used", part.get("examples_used"))
            n_total = part.get("blocks_total", part.get("examples_total"))
            used.append(f"{role}: {part.get('source')} ({n_used} of {n_total} {unit})")
    return used
