"""`peftlab report`: per-task tables in the seed's layout, plots and a self-contained HTML page, from a sweep's store.

The report reads only the sweep folder: the store (``sweep.sqlite``: status and each run's results.json) and the run
folders (``runs/<id>/metrics.jsonl`` for loss curves). Runs whose configs differ only in ``seed`` form one row;
their cells show mean ± sample standard deviation.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import defining_fields
from peftlab.errors import UserError
from peftlab.record import METRICS_FILE, atomic_write_text
from peftlab.summary import data_used, lora_shape, training_type
from peftlab.sweep_store import SweepStore

#: Known task metrics: key -> (label, higher is better). Extra columns appear when runs report them.
METRICS: dict[str, tuple[str, bool]] = {
    "accuracy": ("Accuracy", True), "macro_f1": ("F1 (macro)", True), "f1": ("F1", True),
    "bleu": ("BLEU", True), "rougeL": ("ROUGE-L", True), "exact_match": ("Exact match", True),
    "perplexity": ("Perplexity", False),
}
TASK_ORDER = ("clm", "classification", "instruction")  # the seed's order of tables
METHOD_ORDER = ("full", "lora", "rslora", "dora", "pissa", "loraplus", "qlora", "ia3", "prefix")
MEMORY_KINDS = {"cuda_max_reserved": "peak CUDA memory reserved by PyTorch during training",
                "cpu_peak_rss_train": "peak resident memory (RSS) of the process during training"}


def arrow(higher_is_better: bool | None) -> str:
    """'↑', '↓' or ''."""
    return "" if higher_is_better is None else ("↑" if higher_is_better else "↓")


@dataclass(frozen=True)
class FinishedRun:
    """A done run: its store row's results and its folder."""

    id: str
    results: dict[str, Any]
    folder: Path
    wall_s: float | None

    @property
    def config(self) -> dict[str, Any]:
        return self.results["config"]

    def history(self) -> list[dict[str, Any]]:
        """metrics.jsonl rows (or the tail kept in results.json when the file is gone)."""
        path = self.folder / METRICS_FILE
        if path.is_file():
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
            return rows
        return list((self.results.get("metrics") or {}).get("history_tail") or [])


@dataclass(frozen=True)
class Column:
    """A table column: header, how to read a number from results, how to format it, its direction."""

    key: str
    label: str
    get: Callable[[dict[str, Any]], float | None]
    digits: Callable[[float], str]
    higher_is_better: bool | None = None
    spread: bool = True  # show ± std over seeds (off for values that the seed cannot change)

    @property
    def header(self) -> str:
        return f"{self.label} {arrow(self.higher_is_better)}".strip()


@dataclass
class ConfigGroup:
    """Runs whose configs differ only in seed: one table row."""

    runs: list[FinishedRun]

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0].results

    def values(self, column: Column) -> list[float]:
        out = []
        for run in self.runs:
            v = column.get(run.results)
            if isinstance(v, int | float) and math.isfinite(v):
                out.append(float(v))
        return out

    def mean_std(self, column: Column) -> tuple[float | None, float | None]:
        vals = self.values(column)
        if not vals:
            return None, None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)

    def label(self, with_model: bool) -> str:
        """'LoRA (8, 16)', with the model's short name when a table mixes models."""
        shape = lora_shape(self.first)
        text = training_type(self.first) + ("" if shape == "-" else f" {shape}")
        return f"{short_model(self.first['model']['name'])} {text}" if with_model else text


@dataclass
class TaskTable:
    """One task (and dataset): its columns, rows of config groups, and notes on data and measurement."""

    task: str
    dataset: str
    metric: str
    higher_is_better: bool
    columns: list[Column]
    groups: list[ConfigGroup]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.task} on {self.dataset}"

    @property
    def slug(self) -> str:
        return slug(f"{self.task}-{self.dataset}")

    @property
    def metric_column(self) -> Column:
        return next(c for c in self.columns if c.key == self.metric)

    @property
    def several_models(self) -> bool:
        return len({g.first["model"]["name"] for g in self.groups}) > 1

    @property
    def several_seeds(self) -> bool:
        return any(len(g.runs) > 1 for g in self.groups)

    def cells(self, group: ConfigGroup) -> list[str]:
        """The row's text cells, then each numeric column as 'mean ± std'."""
        first = group.first
        row = [first["model"]["name"], training_type(first), lora_shape(first)]
        for column in self.columns:
            mean, std = group.mean_std(column)
            row.append(format_mean_std(mean, std if column.spread else None, column.digits))
        if self.several_seeds:
            row.append(str(len(group.runs)))
        return row

    def headers(self) -> list[str]:
        return (["Model", "Training Type", "LoRA Config (r, alpha)"] + [c.header for c in self.columns]
                + (["Seeds"] if self.several_seeds else []))

    def best_group(self) -> ConfigGroup | None:
        """The row with the best headline mean (respecting the metric's direction)."""
        scored = [(g.mean_std(self.metric_column)[0], g) for g in self.groups]
        scored = [(m, g) for m, g in scored if m is not None]
        if not scored:
            return None
        pick = max if self.higher_is_better else min
        return pick(scored, key=lambda mg: mg[0])[1]


def slug(text: str) -> str:
    """A file-name-safe version of text."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "table"


def short_model(name: str) -> str:
    """The last path component of a model id (mistralai/Mistral-7B-v0.1 -> Mistral-7B-v0.1)."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def number(value: float) -> str:
    """Digits by magnitude: 47109.5, 17.31, 0.8125."""
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.4f}"


def fixed(decimals: int) -> Callable[[float], str]:
    """A formatter with a fixed number of decimals."""
    return lambda v: f"{v:.{decimals}f}"


def percent(value: float) -> str:
    """Trainable percent: 100, 0.111, 0.00553."""
    return f"{value:.3g}"


def format_mean_std(mean: float | None, std: float | None, fmt: Callable[[float], str]) -> str:
    """'0.8125', '0.8125 ± 0.0125' (the std with the mean's decimals) or '-'."""
    if mean is None:
        return "-"
    text = fmt(mean)
    if std is None:
        return text
    decimals = len(text.split(".", 1)[1]) if "." in text and "e" not in text else 0
    return f"{text} ± {std:.{decimals}f}"


def _dig(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _per_minute(seconds: Any) -> float | None:
    return seconds / 60 if isinstance(seconds, int | float) else None


def _metric_getter(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: _dig(r, "metrics", "after", key)


def table_columns(metric: str, higher_is_better: bool, runs: list[FinishedRun]) -> list[Column]:
    """The seed's columns, plus trainable %, tokens/s and any extra task metrics the runs report."""
    label = METRICS.get(metric, (metric, higher_is_better))[0]
    cols = [
        Column("time_per_epoch_min", "Time/Epoch (min)", lambda r: _per_minute(_dig(r, "timing", "time_per_epoch_s")),
               fixed(2), False),
        Column(metric, label, _metric_getter(metric), number, higher_is_better),
        Column("memory_gb", "Memory (GB)", lambda r: _dig(r, "memory", "headline_gb"), fixed(2), False),
        Column("trainable_percent", "Trainable %", lambda r: _dig(r, "params", "trainable_percent"), percent,
               spread=False),
        Column("tokens_per_s", "Tokens/s", lambda r: _dig(r, "timing", "tokens_per_s"), fixed(0), True),
    ]
    reported = {k for run in runs for k, v in (_dig(run.results, "metrics", "after") or {}).items()
                if isinstance(v, int | float)}
    for key, (name, better) in METRICS.items():
        if key != metric and key in reported:
            cols.append(Column(key, name, _metric_getter(key), number, better))
    return cols


def _group_key(results: dict[str, Any]) -> str:
    config = results["config"]
    return json.dumps({k: v for k, v in defining_fields(config).items() if k != "seed"}, sort_keys=True, default=str)


def _sort_key(group: ConfigGroup) -> tuple:
    first = group.first
    method = first["method"]["name"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (first["model"]["name"], rank, first["method"].get("r") or 0, first["method"].get("alpha") or 0,
            group.runs[0].id)


def build_tables(runs: list[FinishedRun]) -> list[TaskTable]:
    """One table per (task, dataset), rows grouped over seeds, in a stable order."""
    by_task: dict[tuple[str, str], list[FinishedRun]] = {}
    for run in runs:
        by_task.setdefault((run.results["task"]["name"], str(run.config.get("dataset"))), []).append(run)
    tables = []
    def order(key: tuple[str, str]) -> tuple:
        return (TASK_ORDER.index(key[0]) if key[0] in TASK_ORDER else len(TASK_ORDER), key)

    for (task, dataset), members in sorted(by_task.items(), key=lambda kv: order(kv[0])):
        info = members[0].results["task"]
        groups: dict[str, list[FinishedRun]] = {}
        for run in sorted(members, key=lambda r: (r.config.get("seed"), r.id)):
            groups.setdefault(_group_key(run.results), []).append(run)
        table = TaskTable(task, dataset, info["metric"], bool(info["higher_is_better"]),
                          table_columns(info["metric"], bool(info["higher_is_better"]), members),
                          sorted((ConfigGroup(g) for g in groups.values()), key=_sort_key))
        table.notes = table_notes(table)
        tables.append(table)
    return tables


def _data_line(results: dict[str, Any]) -> str:
    return "; ".join(data_used(results))


def table_notes(table: TaskTable) -> list[str]:
    """Data used (subsets), data notes, what memory and time mean, baselines and seeds."""
    notes = []
    runs = [run for g in table.groups for run in g.runs]
    data_lines = sorted({_data_line(r.results) for r in runs} - {""})
    for line in data_lines:
        notes.append(f"Data: {line}.")
    for note in sorted({n for r in runs for n in (_dig(r.results, "data", "notes") or [])}):
        notes.append(f"Data note: {note}.")
    gen = sorted({(c.get("generation_subset"), c.get("max_new_tokens")) for c in (r.config for r in runs)
                  if table.task == "instruction"}, key=str)
    for subset, tokens in gen:
        notes.append(f"Generation metrics: {subset or 'all'} evaluation examples, up to {tokens} new tokens.")
    kinds = sorted({_dig(r.results, "memory", "headline_kind") for r in runs} - {None})
    notes += [f"Memory: {MEMORY_KINDS.get(k, k)}." for k in kinds]
    notes.append("Time/Epoch: training time per pass over the training data actually used (evaluation excluded).")
    label = table.metric_column.header
    for model in sorted({g.first["model"]["name"] for g in table.groups}):
        for quantized in (False, True):
            vals = [v for r in runs if r.results["model"]["name"] == model
                    and (r.results["method"]["name"] == "qlora") == quantized
                    for v in [_dig(r.results, "metrics", "before", table.metric)] if isinstance(v, int | float)]
            if vals:
                base = "4-bit base" if quantized else "base model"
                notes.append(f"Before training ({base} {model}, same evaluation data): {label} "
                             f"{number(statistics.fmean(vals))}.")
    if table.several_seeds:
        notes.append("Cells over several seeds show mean ± sample standard deviation; Seeds counts the runs.")
    best = table.best_group()
    if best is not None and len(table.groups) > 1:
        notes.append(f"Best {table.metric_column.label} ({'higher' if table.higher_is_better else 'lower'} is "
                     f"better): {best.label(table.several_models)}.")
    return notes


def markdown_table(table: TaskTable) -> str:
    """The table as GitHub markdown; the best headline value in bold."""
    headers = table.headers()
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    best = table.best_group()
    metric_at = 3 + [c.key for c in table.columns].index(table.metric)
    for group in table.groups:
        cells = table.cells(group)
        if group is best and len(table.groups) > 1:
            cells[metric_at] = f"**{cells[metric_at]}**"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# --- reading the sweep folder ---------------------------------------------------------------------------------
@dataclass
class SweepRecords:
    """What the report reads: done runs, failed runs, and the sweep's name."""

    folder: Path
    name: str
    description: str
    finished: list[FinishedRun]
    failed: list[tuple[str, str]]
    counts: dict[str, int]


def read_sweep(folder: str | Path) -> SweepRecords:
    """Read the store; a store without finished runs is a one-line error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass the --output-dir of a `peftlab sweep` run")
    store = SweepStore.open(folder, create=False, read_only=True)
    try:
        rows = store.rows()
        counts = store.counts()
        name, description = store.get_meta("name") or folder.name, store.get_meta("description") or ""
    finally:
        store.close()
    finished = [FinishedRun(r.id, r.results, folder / "runs" / r.id, r.wall_s)
                for r in rows if r.status == "done" and r.results]
    if not finished:
        state = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs"
        raise UserError(f"{store.path} has no finished runs ({state}); run `peftlab sweep` first")
    failed = [(r.id, r.error or "") for r in rows if r.status == "failed"]
    return SweepRecords(folder, name, description, finished, failed, counts)


# --- writing ----------------------------------------------------------------------------------------------------
@dataclass
class ReportFiles:
    """The files a report wrote."""

    folder: Path
    markdown: Path
    html: Path
    tables: list[Path]
    plots: list[Path]

    def summary_lines(self) -> list[tuple[str, str]]:
        """(what, path) pairs for the CLI."""
        return ([("report", str(self.markdown)), ("html", str(self.html))]
                + [("table", str(p)) for p in self.tables]
                + [("plot", str(p)) for p in self.plots if p.suffix == ".png"])


def write_report(sweep_dir: str | Path, output_dir: str | Path | None = None) -> ReportFiles:
    """Write report.md, report.html, tables/<task>.md and plots/*.png|svg for a sweep folder."""
    from peftlab.report_html import render_html
    from peftlab.report_plots import plot_table

    records = read_sweep(sweep_dir)
    out = Path(output_dir) if output_dir else records.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records.finished)
    table_files, plots = [], {}
    for table in tables:
        path = out / "tables" / f"{table.slug}.md"
        atomic_write_text(path, f"### {table.title}\n\n{markdown_table(table)}\n\n"
                          + "\n".join(f"- {n}" for n in table.notes) + "\n")
        table_files.append(path)
        plots[table.slug] = plot_table(table, out / "plots")
    md = out / "report.md"
    atomic_write_text(md, render_markdown(records, tables, plots, out))
    html_path = out / "report.html"
    atomic_write_text(html_path, render_html(records, tables, plots))
    return ReportFiles(out, md, html_path, table_files,
                       [p for kinds in plots.values() for pair in kinds.values() for p in pair])


def render_markdown(records: SweepRecords, tables: list[TaskTable], plots: dict[str, dict[str, tuple[Path, Path]]],
                    out: Path) -> str:
    """report.md: a section per task with its table, notes and plots (linked PNGs)."""
    lines = [f"# Sweep report: {records.name}", ""]
    if records.description:
        lines += [records.description, ""]
    lines += [f"{records.counts.get('done', 0)} runs done, {records.counts.get('failed', 0)} failed, "
              f"{records.counts.get('queued', 0) + records.counts.get('running', 0)} not finished. Every number is "
              "measured by peftlab and read from the sweep store.", ""]
    for table in tables:
        lines += [f"## {table.title}", "", markdown_table(table), ""]
        lines += [f"- {n}" for n in table.notes] + [""]
        for kind, (png, _svg) in plots[table.slug].items():
            lines.append(f"![{table.title}: {kind}]({png.relative_to(out).as_posix()})")
        lines.append("")
    if records.failed:
        lines += ["## Failed runs", "", "| Run | Error |", "|---|---|"]
        lines += [f"| {rid} | {err.replace('|', '/')} |" for rid, err in records.failed] + [""]
    return "\n".join(lines)
