"""The report's table model: per-task tables in the seed's layout, built from a sweep's store.

The report reads only the sweep folder: the store (``sweep.sqlite``: status and each run's record) and the run
folders (``runs/<id>/metrics.jsonl`` for loss curves). Runs whose configs differ only in ``seed`` form one row;
their cells show mean ± sample standard deviation. Labels, directions, extra columns, the order of tables and
rows, and which 'before' numbers are a quantized base's all come from the method and task registries.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peftlab.config import defining_fields
from peftlab.errors import UserError
from peftlab.per_example import StageValues, read_stages
from peftlab.record import METRICS_FILE, RunRecord
from peftlab.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Interval,
    bootstrap_ci,
    mean_over,
    paired_bootstrap,
    statistic,
)
from peftlab.summary import (
    config_label,
    data_used,
    method_of,
    method_order,
    metric_spec,
    quantizes_base,
    table_metrics,
    task_of,
    task_order,
    training_type,
)
from peftlab.sweep.store import SweepStore

#: The cell shown for a speed column of a table whose runs span machines (unless ``--mixed-machines``).
BLANK_CELL = "n/a"
MEMORY_KINDS = {"cuda_max_reserved": "peak CUDA memory reserved by PyTorch during training",
                "cpu_peak_rss_train": "peak resident memory (RSS) of the process during training"}


def arrow(higher_is_better: bool | None) -> str:
    """'↑', '↓' or ''."""
    return "" if higher_is_better is None else ("↑" if higher_is_better else "↓")


@dataclass(frozen=True)
class FinishedRun:
    """A done run: its store row's record and its folder."""

    id: str
    record: RunRecord
    folder: Path
    wall_s: float | None
    definition: dict[str, Any] | None = None  # the sweep's fields for this run (its calibration row)

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    def stages(self) -> dict[str, StageValues] | None:
        """The run's per-example evaluation values (eval_examples.json) by stage, or None for an older run."""
        for folder in (self.folder, Path(self.record.run_dir) if self.record.run_dir else None):
            if folder is not None and folder.is_dir():
                found = read_stages(folder)
                if found is not None:
                    return found
        return None

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
        return list(self.record.metrics.history_tail or [])


@dataclass(frozen=True)
class Column:
    """A table column: header, how to read a number from results, how to format it, its direction."""

    key: str
    label: str
    get: Callable[[RunRecord], float | None]
    digits: Callable[[float], str]
    higher_is_better: bool | None = None
    spread: bool = True  # show ± std over seeds (off for values that the seed cannot change)
    machine_bound: bool = False  # a speed: comparable only between runs measured on one machine
    blank: str | None = None  # shown instead of every value (a speed column of a table that spans machines)
    change: Callable[[RunRecord], Any] | None = None  # a difference with its own interval (a benchmark's forgetting)

    @property
    def header(self) -> str:
        return f"{self.label} {arrow(self.higher_is_better)}".strip()


@dataclass(frozen=True)
class RowStats:
    """A row's intervals for the headline metric: the seed-mean's bootstrap CI and its difference from the
    reference row (paired bootstrap); None where the runs lack per-example values."""

    ci: Interval | None = None
    diff: Interval | None = None
    is_reference: bool = False


@dataclass
class ConfigGroup:
    """Runs whose configs differ only in seed: one table row."""

    runs: list[FinishedRun]
    stats: RowStats = field(default_factory=RowStats)

    @property
    def first(self) -> RunRecord:
        return self.runs[0].record

    def values(self, column: Column) -> list[float]:
        out = []
        for run in self.runs:
            v = column.get(run.record)
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
        shape = config_label(self.first)
        text = training_type(self.first) + ("" if shape == "-" else f" {shape}")
        return f"{short_model(str(self.first.model.name))} {text}" if with_model else text


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
    reference_label: str | None = None  # the reference row's label ('LoRA (8, 16)'), when every model has one

    def machines(self) -> list[str]:
        """The devices this table's runs were measured on (GPU name, else CPU model), sorted."""
        return sorted({host for g in self.groups for run in g.runs for host in [measured_on(run)] if host})

    @property
    def blanked(self) -> list[Column]:
        """The speed columns left blank because the runs span machines."""
        return [c for c in self.columns if c.blank is not None]

    def blank_machine_bound(self) -> None:
        """Blank the speed columns (their values compare only within one machine); the metric columns stay."""
        self.columns = [replace(c, get=_no_value, blank=BLANK_CELL) if c.machine_bound else c for c in self.columns]

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
        return len({g.first.model.name for g in self.groups}) > 1

    def by_model(self) -> list[list[ConfigGroup]]:
        """The rows of each model, models in name order."""
        names = sorted({str(g.first.model.name) for g in self.groups})
        return [[g for g in self.groups if str(g.first.model.name) == name] for name in names]

    @property
    def several_seeds(self) -> bool:
        return any(len(g.runs) > 1 for g in self.groups)

    def cells(self, group: ConfigGroup) -> list[str]:
        """The row's text cells, then each numeric column as 'mean ± std'."""
        first = group.first
        row = [str(first.model.name), training_type(first), config_label(first)]
        for column in self.columns:
            if column.change is not None and len(group.runs) == 1:  # one run: its change and paired interval
                row.append(format_difference(column.change(first), column.digits))
                continue
            mean, std = group.mean_std(column)
            row.append(column.blank or format_mean_std(mean, std if column.spread else None, column.digits))
            if column.key == self.metric:
                row += [format_interval(group.stats.ci, column.digits),
                        "reference" if group.stats.is_reference else format_difference(group.stats.diff,
                                                                                       column.digits)]
        if self.several_seeds:
            row.append(str(len(group.runs)))
        return row

    def headers(self) -> list[str]:
        heads = []
        for column in self.columns:
            heads.append(column.header)
            if column.key == self.metric:
                heads += ["95% CI", f"Δ vs {self.reference_label or 'reference'} (95% CI)"]
        return ["Model", "Training Type", "LoRA Config (r, alpha)"] + heads + (["Seeds"] if self.several_seeds
                                                                                else [])

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


def format_interval(ci: Interval | None, fmt: Callable[[float], str]) -> str:
    """'[13.20, 14.90]' or '-'."""
    return "-" if ci is None else f"[{fmt(ci.lo)}, {fmt(ci.hi)}]"


def format_difference(diff: Interval | None, fmt: Callable[[float], str]) -> str:
    """'-3.00 [-3.50, -2.50] *' (the mark when the interval excludes zero) or '-'."""
    if diff is None:
        return "-"
    return f"{fmt(diff.estimate):s} {format_interval(diff, fmt)}" + (" *" if diff.excludes_zero else "")


def _per_minute(seconds: float | None) -> float | None:
    return seconds / 60 if isinstance(seconds, int | float) else None


def _no_value(_record: RunRecord) -> None:
    return None


def measured_on(run: FinishedRun) -> str | None:
    """The device a run was measured on (GPU name, else CPU model), or None when its record does not say."""
    m = run.record.machine
    where = m.get("cuda_device") or m.get("cpu") or m.get("processor")
    return str(where) if where else None


def _metric_getter(key: str) -> Callable[[RunRecord], float | None]:
    return lambda r: r.metric(key)


def table_columns(record: RunRecord, runs: list[FinishedRun]) -> list[Column]:
    """The seed's columns, plus trainable %, tokens/s and the task's extra metrics that the runs report."""
    headline = metric_spec(record, record.task.metric or "")
    cols = [
        Column("time_per_epoch_min", "Time/Epoch (min)", lambda r: _per_minute(r.timing.time_per_epoch_s),
               fixed(2), False, machine_bound=True),
        Column(headline.key, headline.label, _metric_getter(headline.key), number, headline.higher_is_better),
        Column("memory_gb", "Memory (GB)", lambda r: r.memory.headline_gb, fixed(2), False),
        Column("trainable_percent", "Trainable %", lambda r: r.params.trainable_percent, percent, spread=False),
        Column("tokens_per_s", "Tokens/s", lambda r: r.timing.tokens_per_s, fixed(0), True, machine_bound=True),
    ]
    reported = {k for run in runs for k, v in run.record.metrics.after.items() if isinstance(v, int | float)}
    for key in table_metrics(record):
        if key != headline.key and key in reported:
            spec = metric_spec(record, key)
            cols.append(Column(key, spec.label, _metric_getter(key), number, spec.higher_is_better))
    return cols + benchmark_columns(runs)


BENCHMARK_COLUMN = "benchmark:"


def benchmark_metric(runs: list[FinishedRun], name: str) -> str:
    """The accuracy a benchmark's column shows: acc_norm where lm-eval gives it (length-normalised), else acc."""
    for run in runs:
        change = (run.record.benchmarks or {}).get(name)
        if change is not None and change.forgetting:
            return "acc_norm" if "acc_norm" in change.forgetting else "acc"
    return "acc"


def benchmark_names(runs: list[FinishedRun]) -> list[str]:
    """The benchmarks the runs scored before and after: shipped ones in their order, then others by name."""
    from peftlab.evals.suite import SHIPPED

    names = {n for run in runs for n, b in (run.record.benchmarks or {}).items() if b.forgetting}
    return [n for n in SHIPPED if n in names] + sorted(names - set(SHIPPED))


def benchmark_columns(runs: list[FinishedRun]) -> list[Column]:
    """One column per benchmark: the change of its accuracy from the base (after - before) with its interval."""
    cols = []
    for name in benchmark_names(runs):
        metric = benchmark_metric(runs, name)

        def change(record: RunRecord, name=name, metric=metric):
            return record.benchmark_change(name, metric)

        def estimate(record: RunRecord, change=change) -> float | None:
            found = change(record)
            return found.estimate if found is not None else None

        cols.append(Column(f"{BENCHMARK_COLUMN}{name}", f"{name} Δ{metric}", estimate, signed(3), True,
                           change=change))
    return cols


def signed(decimals: int) -> Callable[[float], str]:
    return lambda v: f"{v:+.{decimals}f}"


def _group_key(record: RunRecord) -> str:
    return json.dumps({k: v for k, v in defining_fields(record.config).items() if k != "seed"}, sort_keys=True,
                      default=str)


def _sortable(value: Any) -> tuple:
    """Numbers in numeric order, anything else by its text (a field's values within one method)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, json.dumps(value, sort_keys=True, default=str))


def _sort_key(group: ConfigGroup) -> tuple:
    first = group.first
    fields = tuple((k, _sortable(v)) for k, v in first.method.fields.items())
    return (str(first.model.name), method_order(first), str(first.method.name), fields, group.runs[0].id)


def build_tables(runs: list[FinishedRun], mixed_machines: bool = False) -> list[TaskTable]:
    """One table per (task, dataset), rows grouped over seeds; tables in task order, rows in method order.

    A table whose runs were measured on more than one machine gets its speed columns (time per epoch, tokens/s)
    blanked, since they compare only within one machine; ``mixed_machines`` keeps them."""
    by_task: dict[tuple[str, str], list[FinishedRun]] = {}
    for run in runs:
        by_task.setdefault((str(run.record.task.name), str(run.config.get("dataset"))), []).append(run)
    tables = []
    for (task, dataset), members in sorted(by_task.items(), key=lambda kv: (task_order(kv[0][0]), kv[0])):
        first = members[0].record
        groups: dict[str, list[FinishedRun]] = {}
        for run in sorted(members, key=lambda r: (r.config.get("seed"), r.id)):
            groups.setdefault(_group_key(run.record), []).append(run)
        table = TaskTable(task, dataset, str(first.task.metric), bool(first.task.higher_is_better),
                          table_columns(first, members),
                          sorted((ConfigGroup(g) for g in groups.values()), key=_sort_key))
        if len(table.machines()) > 1 and not mixed_machines:
            table.blank_machine_bound()
        attach_stats(table)
        table.notes = table_notes(table)
        tables.append(table)
    return tables


# --- intervals from per-example values -------------------------------------------------------------------------
def _eval_identity(record: RunRecord) -> str:
    """Which evaluation examples a run used (source, fingerprint, count): pairs need the same ones."""
    part = record.data.eval
    return json.dumps(part.model_dump(mode="json") if part is not None else None, sort_keys=True, default=str)


def _seed_stats(runs: list[FinishedRun], spec, stage: str) -> tuple[list, int, str] | None:
    """Each run's resampled statistic of the metric at ``stage``, the number of units, and the evaluation identity;
    None when a run lacks per-example values or the runs were not evaluated on the same examples."""
    rule = spec.statistic
    if rule is None:
        return None
    stats, sizes, identities = [], set(), set()
    for run in runs:
        stages = _stages(run)
        entry = stages.get(stage) if stages else None
        columns = entry.values.groups.get(rule.unit) if entry is not None else None
        if columns is None or not all(c in columns for c in rule.columns):
            return None
        stats.append(statistic(rule.kind, columns, rule.columns, entry.values.classes))
        sizes.add(entry.size(rule.unit))
        identities.add(_eval_identity(run.record))
    if len(sizes) != 1 or len(identities) != 1:
        return None
    return stats, sizes.pop(), identities.pop()


_STAGES: dict[Path, dict[str, StageValues] | None] = {}


def _stages(run: FinishedRun) -> dict[str, StageValues] | None:
    """A run's stages, read once per report."""
    if run.folder not in _STAGES:
        _STAGES[run.folder] = run.stages()
    return _STAGES[run.folder]


def _reference(groups: list[ConfigGroup]) -> ConfigGroup | None:
    """The group whose method ranks best as the reference (ties: the first in table order)."""
    ranked = []
    for group in groups:
        method = method_of(group.first)
        rank = method.reference_rank(group.first.method.fields) if method is not None else None
        if rank is not None:
            ranked.append((rank, len(ranked), group))
    return min(ranked, key=lambda t: t[:2])[2] if ranked else None


def attach_stats(table: TaskTable, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> None:
    """Each row's CI of the headline metric (seeds pooled: the mean of the seeds' statistics on shared resamples)
    and its paired difference from the reference row of its model."""
    _STAGES.clear()
    spec = metric_spec(table.groups[0].first, table.metric)
    labels = set()
    for groups in table.by_model():
        ref = _reference(groups)
        labels.add(ref.label(False) if ref is not None else None)
        ref_stats = _seed_stats(ref.runs, spec, "after") if ref is not None else None
        for group in groups:
            own = _seed_stats(group.runs, spec, "after")
            ci = bootstrap_ci(mean_over(own[0]), own[1], resamples, seed) if own else None
            diff = None
            if own and ref_stats and group is not ref and own[1:] == ref_stats[1:]:
                diff = paired_bootstrap(mean_over(ref_stats[0]), mean_over(own[0]), own[1], resamples, seed)
            group.stats = RowStats(ci, diff, group is ref)
    table.reference_label = labels.pop() if len(labels) == 1 else None


def baseline_interval(runs: list[FinishedRun], spec, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> tuple[Interval, int, str] | None:
    """The CI of the base model's metric over its distinct baseline evaluations (a shared one counts once), the
    number of evaluated units and their name; None without per-example values."""
    distinct: dict[str, FinishedRun] = {}
    for run in runs:
        distinct.setdefault(run.record.baseline_key() or run.id, run)
    found = _seed_stats(list(distinct.values()), spec, "before")
    if found is None:
        return None
    return bootstrap_ci(mean_over(found[0]), found[1], resamples, seed), found[1], spec.statistic.unit


def benchmark_notes(table: TaskTable) -> list[str]:
    """What each benchmark column measures, on how many items, and how its interval is made."""
    from peftlab.evals.suite import CHANCE, MEASURES

    runs = [run.record for g in table.groups for run in g.runs]
    columns = [c for c in table.columns if c.change is not None]
    if not columns:
        return []
    parts = []
    for column in columns:
        name = column.key.removeprefix(BENCHMARK_COLUMN)
        items = sorted({r.benchmarks[name].items for r in runs if name in (r.benchmarks or {})} - {None})
        what = MEASURES.get(name, "an lm-eval task")
        chance = f", chance {CHANCE[name]:.0%}" if name in CHANCE else ""
        parts.append(f"{name} ({what}{chance}; {'/'.join(map(str, items))} items)")
    return [f"Benchmarks (lm-evaluation-harness, zero-shot, each answer choice scored by its log-likelihood): "
            f"{'; '.join(parts)}. A benchmark's cell is its accuracy after training minus before (acc_norm: "
            "normalised by the answer's length), with a paired bootstrap 95% interval over its items "
            f"({DEFAULT_RESAMPLES} resamples); * marks a change beyond noise (a negative one: forgetting)."]


def _data_line(record: RunRecord) -> str:
    return "; ".join(data_used(record))


def _generates(record: RunRecord) -> bool:
    """Whether the task declares metrics measured on generations (then the report says on how many)."""
    task = task_of(record)
    return task is not None and any(spec.generated for spec in task.metrics)


def table_notes(table: TaskTable) -> list[str]:
    """Data used (subsets), data notes, what memory and time mean, baselines and seeds."""
    notes = []
    runs = [run for g in table.groups for run in g.runs]
    data_lines = sorted({_data_line(r.record) for r in runs} - {""})
    for line in data_lines:
        notes.append(f"Data: {line}.")
    for note in sorted({n for r in runs for n in r.record.data.notes}):
        notes.append(f"Data note: {note}.")
    gen = sorted({(r.config.get("generation_subset"), r.config.get("max_new_tokens")) for r in runs
                  if _generates(r.record)}, key=str)
    for subset, tokens in gen:
        notes.append(f"Generation metrics: {subset or 'all'} evaluation examples, up to {tokens} new tokens.")
    kinds = sorted({r.record.memory.headline_kind for r in runs} - {None})
    notes += [f"Memory: {MEMORY_KINDS.get(k, k)}." for k in kinds]
    notes.append("Time/Epoch: training time per pass over the training data actually used (evaluation excluded).")
    if table.blanked:
        notes.append(f"{' and '.join(c.label for c in table.blanked)}: left blank ({BLANK_CELL}), since this "
                     f"table's runs were measured on {len(table.machines())} machines "
                     f"({'; '.join(table.machines())}) and speeds compare only within one; "
                     "`peftlab report --mixed-machines` shows them.")
    label = table.metric_column.header
    for model in sorted({str(g.first.model.name) for g in table.groups}):
        for quantized in (False, True):
            vals = [v for r in runs if str(r.record.model.name) == model and quantizes_base(r.record) == quantized
                    for v in [r.record.metric(table.metric, "before")] if v is not None]
            if vals:
                base = "4-bit base" if quantized else "base model"
                members = [r for r in runs if str(r.record.model.name) == model
                           and quantizes_base(r.record) == quantized]
                found = baseline_interval(members, metric_spec(members[0].record, table.metric))
                ci = "" if found is None else (f" (95% CI {format_interval(found[0], number)} over {found[1]} "
                                                f"{found[2]})")
                notes.append(f"Before training ({base} {model}, same evaluation data): {label} "
                             f"{number(statistics.fmean(vals))}{ci}.")
    if table.several_seeds:
        notes.append("Cells over several seeds show mean ± sample standard deviation; Seeds counts the runs.")
    ref = table.reference_label or "the reference row of the same model"
    notes.append(f"95% CI: percentile bootstrap over the evaluation examples ({DEFAULT_RESAMPLES} resamples, seed "
                 f"{DEFAULT_SEED}; seeds pooled: every seed resampled with the same indices). Δ: the row's "
                 f"{table.metric_column.label} minus {ref}'s, with a paired bootstrap (both rows on the same "
                 "resampled examples); * marks an interval that excludes zero. '-': no per-example values.")
    notes += benchmark_notes(table)
    best = table.best_group()
    if best is not None and len(table.groups) > 1:
        notes.append(f"Best {table.metric_column.label} ({'higher' if table.higher_is_better else 'lower'} is "
                     f"better): {best.label(table.several_models)}.")
    return notes


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
    finished = [FinishedRun(r.id, r.record(), folder / "runs" / r.id, r.wall_s, r.definition)
                for r in rows if r.status == "done" and r.results]
    if not finished:
        state = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs"
        raise UserError(f"{store.path} has no finished runs ({state}); run `peftlab sweep` first")
    failed = [(r.id, r.error or "") for r in rows if r.status == "failed"]
    return SweepRecords(folder, name, description, finished, failed, counts)
