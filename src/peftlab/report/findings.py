"""What a report's tables say, in sentences computed from their numbers only.

Per table and model: which rows move each interval-bearing metric beyond their own base model's 95% interval, how
much of full fine-tuning's gain each adapter row recovers, the rows ordered by memory, time per epoch relative to
full fine-tuning, and which differences from the reference row are significant. For the sweep: its machine time
against the calibrated estimate (``calibration.json``), which is what ``peftlab sweep --dry-run`` showed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from peftlab.report.tables import (
    Column,
    ConfigGroup,
    FinishedRun,
    TaskTable,
    baseline_interval,
    format_interval,
    measured_on,
    number,
)
from peftlab.stats import Interval
from peftlab.summary import method_of, metric_spec, quantizes_base, training_type
from peftlab.sweep.runner import read_calibration, row_key


@dataclass(frozen=True)
class BaseCheck:
    """A row against its own base (the 4-bit base for methods that quantize it) on one metric."""

    group: ConfigGroup
    value: float
    base: Interval
    beyond: bool  # the row's mean lies past the base's interval, on the better side


def _label(group: ConfigGroup, table: TaskTable) -> str:
    return group.label(table.several_models)


def _trains_every_weight(group: ConfigGroup) -> bool:
    method = method_of(group.first)
    return bool(method is not None and method.trains_every_weight)


def _base_intervals(groups: list[ConfigGroup], key: str) -> dict[bool, Interval]:
    """quantized? -> the base's CI of metric ``key`` (per-example values required)."""
    out = {}
    for quantized in (False, True):
        members = [r for g in groups for r in g.runs if quantizes_base(r.record) == quantized]
        if members:
            found = baseline_interval(members, metric_spec(members[0].record, key))
            if found is not None:
                out[quantized] = found[0]
    return out


def interval_metrics(table: TaskTable) -> list[Column]:
    """The table's metric columns whose value can be bootstrapped, the headline first."""
    first = table.groups[0].first
    cols = [c for c in table.columns if metric_spec(first, c.key).statistic is not None]
    return sorted(cols, key=lambda c: c.key != table.metric)


def base_checks(table: TaskTable, column: Column) -> list[BaseCheck]:
    """Every row with a base interval for ``column``: is its mean beyond that interval, on the better side?"""
    checks = []
    for groups in table.by_model():
        bases = _base_intervals(groups, column.key)
        for group in groups:
            mean = group.mean_std(column)[0]
            base = bases.get(quantizes_base(group.first))
            if mean is None or base is None:
                continue
            beyond = mean > base.hi if column.higher_is_better else mean < base.lo
            checks.append(BaseCheck(group, mean, base, beyond))
    return checks


def base_sentence(table: TaskTable, column: Column) -> str | None:
    checks = base_checks(table, column)
    if not checks:
        return None
    missed = [c for c in checks if not c.beyond]
    better = "above" if column.higher_is_better else "below"
    if not missed:
        return (f"{column.label}: every row ends {better} its base model's 95% interval "
                f"({'; '.join(_base_text(table, c) for c in _first_per_base(checks))}).")
    named = "; ".join(f"{_label(c.group, table)} {number(c.value)} against its base's {format_interval(c.base, number)}"
                      for c in missed)
    passed = [_label(c.group, table) for c in checks if c.beyond]
    return (f"{column.label}: not beyond the base's 95% interval: {named}."
            + (f" Beyond it: {', '.join(passed)}." if passed else ""))


def _first_per_base(checks: list[BaseCheck]) -> list[BaseCheck]:
    seen, out = set(), []
    for c in checks:
        key = (str(c.group.first.model.name), quantizes_base(c.group.first))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _base_text(table: TaskTable, check: BaseCheck) -> str:
    kind = "4-bit base" if quantizes_base(check.group.first) else "base"
    model = f" {check.group.first.model.name}" if table.several_models else ""
    return f"{kind}{model} {number(check.base.estimate)} {format_interval(check.base, number)}"


@dataclass(frozen=True)
class GainShares:
    """Full fine-tuning's gain over the base on one model, and each other row's gain over its own base as a share
    of it."""

    full: ConfigGroup
    base: float
    full_value: float
    shares: list[tuple[ConfigGroup, float]]


def gain_shares(table: TaskTable) -> list[GainShares]:
    """Per model with a full fine-tuning row: each row's share of its gain (headline metric, seed means)."""
    column = table.metric_column
    found = []
    for groups in table.by_model():
        full = next((g for g in groups if _trains_every_weight(g)), None)
        before = {}  # id(group) -> the mean 'before' value of its runs (its own base's)
        for group in groups:
            vals = [v for r in group.runs for v in [r.record.metric(table.metric, "before")] if v is not None]
            if vals:
                before[id(group)] = statistics.fmean(vals)
        if full is None or id(full) not in before:
            continue
        full_mean = full.mean_std(column)[0]
        full_gain = None if full_mean is None else full_mean - before[id(full)]
        if not full_gain or (full_gain > 0) != bool(column.higher_is_better):
            continue  # full fine-tuning did not improve on its base: no gain to share
        shares = [(g, (m - before[id(g)]) / full_gain) for g in groups for m in [g.mean_std(column)[0]]
                  if g is not full and m is not None and id(g) in before]
        found.append(GainShares(full, before[id(full)], full_mean, shares))
    return found


def gain_sentence(table: TaskTable) -> str | None:
    """Each row's gain over its own base as a share of full fine-tuning's gain over the base."""
    parts = []
    for found in gain_shares(table):
        shares = [f"{_label(g, table)} {round(100 * share)}%" + (" (from its 4-bit base)" if quantizes_base(g.first)
                                                                else "") for g, share in found.shares]
        if shares:
            parts.append(f"{_label(found.full, table)} moves {table.metric_column.label} {number(found.base)} → "
                         f"{number(found.full_value)}; the share of that gain each row reaches: {', '.join(shares)}")
    return ("; ".join(parts) + ".") if parts else None


def _where(table: TaskTable, groups: list[ConfigGroup]) -> str:
    return f"{table.task} on {table.dataset} ({groups[0].first.model.name})"


def relations(tables: list[TaskTable]) -> list[str]:
    """What holds across the tables: memory by training type, and each row's share of full fine-tuning's gain."""
    memory = []
    for table in tables:
        column = next((c for c in table.columns if c.key == "memory_gb"), None)
        for groups in table.by_model() if column is not None else []:
            by_type: dict[str, list[float]] = {}
            for g in groups:
                mean = g.mean_std(column)[0]
                if mean is not None:
                    by_type.setdefault(training_type(g.first), []).append(mean)
            if len(by_type) > 1:
                order = sorted(by_type.items(), key=lambda kv: statistics.fmean(kv[1]))
                memory.append(f"{_where(table, groups)}: " + " < ".join(f"{t} {statistics.fmean(v):.2f}"
                                                                       for t, v in order))
    shares: dict[str, list[str]] = {}
    for table in tables:
        for found in gain_shares(table):
            for g, share in found.shares:
                shares.setdefault(g.label(False), []).append(f"{table.task} on {table.dataset} "
                                                              f"({g.first.model.name}) {round(100 * share)}%")
    lines = []
    if memory:
        lines.append("Memory (GB) by training type, lowest first (rows of one type averaged): " + "; ".join(memory)
                     + ".")
    if shares:
        lines.append("Share of full fine-tuning's gain over the base, by row: "
                     + "; ".join(f"{label}: {', '.join(where)}" for label, where in shares.items()) + ".")
    return lines


def _ordered(table: TaskTable, key: str) -> list[tuple[float, ConfigGroup]]:
    column = next((c for c in table.columns if c.key == key), None)
    if column is None:
        return []
    pairs = [(m, g) for g in table.groups for m in [g.mean_std(column)[0]] if m is not None]
    return sorted(pairs, key=lambda mg: mg[0])


def memory_sentence(table: TaskTable) -> str | None:
    pairs = _ordered(table, "memory_gb")
    if len(pairs) < 2:
        return None
    return ("Memory (GB), lowest first: " + ", ".join(f"{_label(g, table)} {m:.2f}" for m, g in pairs) + ".")


def time_sentence(table: TaskTable) -> str | None:
    pairs = _ordered(table, "time_per_epoch_min")
    fulls = [(m, g) for m, g in pairs if _trains_every_weight(g)]
    if not fulls or len(pairs) < 2:
        return None
    parts = []
    for full_min, full in fulls:
        model = full.first.model.name
        rows = [f"{_label(g, table)} {m / full_min:.2f}x" for m, g in pairs
                if g is not full and g.first.model.name == model]
        if rows:
            parts.append(f"{_label(full, table)} {full_min:.2f} min; " + ", ".join(rows))
    return ("Time per epoch relative to full fine-tuning: " + "; ".join(parts) + ".") if parts else None


def difference_sentence(table: TaskTable) -> str | None:
    ref = table.reference_label
    rows = [g for g in table.groups if g.stats.diff is not None]
    if ref is None or not rows:
        return None
    fmt = table.metric_column.digits
    significant = [f"{_label(g, table)} {fmt(g.stats.diff.estimate)}" for g in rows if g.stats.diff.excludes_zero]
    within = [f"{_label(g, table)} {fmt(g.stats.diff.estimate)}" for g in rows if not g.stats.diff.excludes_zero]
    text = f"{table.metric_column.label} against {ref} (paired 95% interval excludes zero): "
    text += ", ".join(significant) if significant else "none"
    return text + (f"; within noise: {', '.join(within)}." if within else ".")


def forgetting_sentence(table: TaskTable) -> str | None:
    """The rows whose benchmark accuracy fell beyond its paired 95% interval (forgetting), and those that rose.

    Only single-run rows are judged (a row over several seeds has one interval per seed, not one for the row)."""
    columns = [c for c in table.columns if c.change is not None]
    if not columns:
        return None
    forgot, gained, judged = [], [], 0
    for group in table.groups:
        if len(group.runs) != 1:
            continue
        for column in columns:
            change = column.change(group.first)
            if change is None:
                continue
            judged += 1
            text = f"{_label(group, table)} on {column.label} {column.digits(change.estimate)} " \
                   f"[{column.digits(change.lo)}, {column.digits(change.hi)}]"
            if change.hi < 0:
                forgot.append(text)
            elif change.lo > 0:
                gained.append(text)
    if not judged:
        return None
    text = "Forgetting (benchmark accuracy down, paired 95% interval below zero): "
    text += "; ".join(forgot) if forgot else "no row"
    return text + (f". Gains beyond noise: {'; '.join(gained)}." if gained else ".")


def table_findings(table: TaskTable) -> list[str]:
    """The sentences for one table (none that its numbers cannot support)."""
    sentences = [base_sentence(table, c) for c in interval_metrics(table)]
    sentences += [gain_sentence(table), difference_sentence(table), forgetting_sentence(table),
                  memory_sentence(table), time_sentence(table), host_sentence(table)]
    return [s for s in sentences if s]


# --- the sweep's machine time ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MachineTime:
    """The finished runs' summed wall time and, for those with a calibrated row, the estimate beside it."""

    runs: int
    seconds: float
    calibrated_runs: int
    calibrated_seconds: float  # the calibration's estimate for the calibrated runs
    measured_of_calibrated: float  # their measured seconds

    @property
    def ratio(self) -> float | None:
        return self.measured_of_calibrated / self.calibrated_seconds if self.calibrated_seconds else None


def machine_time(runs: list[FinishedRun], folder) -> MachineTime | None:
    timed = [r for r in runs if r.wall_s is not None]
    if not timed:
        return None
    calibration = read_calibration(folder)
    matched = [(r.wall_s, calibration[row_key(r.definition)]) for r in timed
               if r.definition is not None and row_key(r.definition) in calibration]
    return MachineTime(len(timed), sum(r.wall_s for r in timed), len(matched), sum(e for _, e in matched),
                       sum(w for w, _ in matched))


def machine_time_sentence(mt: MachineTime | None, total_runs: int) -> str | None:
    if mt is None:
        return None
    text = (f"Machine time: the {mt.runs} finished runs (of {total_runs}) took {mt.seconds / 3600:.2f} h, the sum "
            "of their wall-clock times, shared baseline evaluations included.")
    if mt.ratio is not None:
        text += (f" For the {mt.calibrated_runs} of them with a calibrated row, `peftlab sweep --dry-run` estimated "
                 f"{mt.calibrated_seconds / 3600:.2f} h from calibration.json and they took "
                 f"{mt.measured_of_calibrated / 3600:.2f} h: measured / estimate = {mt.ratio:.2f}.")
    return text


def _machine_description(run: FinishedRun) -> str | None:
    m, model = run.record.machine, run.record.model
    where = measured_on(run)
    if where is None:
        return None
    parts = [where]
    if not m.get("cuda_device"):
        parts.append(f"{m.get('cpu_count')} cores, {m.get('torch_threads')} torch threads")
        parts.append(f"native bf16: {m.get('cpu_native_bf16') or 'none'}")
    if model.precision:
        reason = f" ({model.precision_reason})" if model.precision_reason else ""
        parts.append(f"precision {model.precision}{reason}")
    return ", ".join(parts)


def machine_sentence(runs: list[FinishedRun]) -> str | None:
    """Where the runs were measured: CPU (or GPU), cores, bf16 capability and the precision that ``auto`` chose;
    when the runs span several machines, how many ran on each and which ones ran on the others."""
    ordered = _largest_first((_machine_description(run), run.id) for run in runs)
    if len(ordered) <= 1:
        return ("Measured on: " + ordered[0][0] + ".") if ordered else None
    parts = [f"{ordered[0][0]} ({_runs(len(ordered[0][1]))})"]
    parts += [f"{desc} ({_runs(len(ids))}: {', '.join(ids)})" for desc, ids in ordered[1:]]
    return (f"Measured on {len(ordered)} machines: " + "; ".join(parts)
            + ". Times and memory compare only between runs on one machine.")


def _largest_first(pairs) -> list[tuple[str, list[str]]]:
    """(key, item) pairs grouped by key (None skipped), the groups with the most items first."""
    groups: dict[str, list[str]] = {}
    for key, item in pairs:
        if key is not None:
            groups.setdefault(key, []).append(item)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def host_sentence(table: TaskTable) -> str | None:
    """A warning when a table's runs were measured on more than one device: which rows' seeds ran where."""
    ordered = _largest_first((measured_on(run), f"{_label(group, table)} seed {run.record.seed}")
                             for group in table.groups for run in group.runs)
    if len(ordered) <= 1:
        return None
    return ("This table's runs were measured on more than one machine, so its times (and tokens/s) are not "
            f"comparable across them: {ordered[0][0]} ran {_runs(len(ordered[0][1]))}; "
            + "; ".join(f"{host} ran {', '.join(runs)}" for host, runs in ordered[1:]) + ".")
