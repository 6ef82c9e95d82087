"""The seed's own table layout filled from measured rows (``peftlab report --seed-table``).

The seed reported Model | Training Type | (r, alpha) | Time/Epoch | metric | Memory, one number per cell. Here each
cell carries its interval: the headline metric its 95% bootstrap interval over the evaluation examples (the
report's), time and memory a 95% t-interval over the row's seeds (a single seed has none). Below it stand the seed's
own causal-LM claims for its 7B models, with the arithmetic that rules out those no single GPU can meet (the
planner's :mod:`peftlab.plan.seed_table`).
"""

from __future__ import annotations

import math
import statistics

from peftlab.plan.arch import BUILTIN_ARCHS
from peftlab.plan.seed_table import SEED_CLAIM_ROWS, claim_check
from peftlab.report.tables import Column, ConfigGroup, TaskTable, format_interval
from peftlab.summary import config_label, training_type

SEED_COLUMNS = ("time_per_epoch_min", "memory_gb")  # besides the headline metric


def seed_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean over seeds; None for fewer than two."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.fmean(values)
    return mean - half, mean + half


def _seed_cell(group: ConfigGroup, column: Column) -> str:
    if column.blank is not None:
        return column.blank
    values = group.values(column)
    if not values:
        return "-"
    text = column.digits(statistics.fmean(values))
    found = seed_interval(values)
    if found is None:
        return f"{text} (1 seed)"
    return f"{text} [{column.digits(found[0])}, {column.digits(found[1])}] ({len(values)} seeds)"


def _metric_cell(table: TaskTable, group: ConfigGroup) -> str:
    column = table.metric_column
    mean = group.mean_std(column)[0]
    if mean is None:
        return "-"
    ci = group.stats.ci
    return column.digits(mean) + ("" if ci is None else f" {format_interval(ci, column.digits)}")


def seed_layout_table(table: TaskTable) -> str:
    """One task table in the seed's layout, each cell with its interval."""
    columns = {c.key: c for c in table.columns}
    time_col, memory_col = (columns[k] for k in SEED_COLUMNS)
    lines = [f"| Model | Training Type | (r, α) | {time_col.header} | {table.metric_column.header} | "
             f"{memory_col.header} |", "|---|---|---|---|---|---|"]
    for group in table.groups:
        first = group.first
        lines.append(f"| {first.model.name} | {training_type(first)} | {config_label(first)} | "
                     f"{_seed_cell(group, time_col)} | {_metric_cell(table, group)} | "
                     f"{_seed_cell(group, memory_col)} |")
    return "\n".join(lines)


def seed_claims() -> str:
    """The seed's causal-LM claims for its 7B models, and why those below the floor cannot hold on one GPU."""
    lines = ["| Model | Training Type | r | seed claimed | can it hold on one GPU? |", "|---|---|---|---|---|"]
    from peftlab.methods import get_method

    for model, method, r, claim in SEED_CLAIM_ROWS:
        why = claim_check(BUILTIN_ARCHS[model], method, claim)
        lines.append(f"| {model} | {get_method(method).display_name} | {r if r else '-'} | {claim.cell()} | "
                     f"{why or 'possible'} |")
    return "\n".join(lines)


def render_seed_layout(tables: list[TaskTable]) -> str:
    """Every task table in the seed's layout, then the seed's claims beside them."""
    parts = ["# The seed's table, measured", "",
             "Each metric cell: the seed-mean with its 95% bootstrap interval over the evaluation examples. Time "
             "and memory: the mean with a 95% t-interval over the row's seeds. Measured by peftlab on the "
             "models named; the seed's own claims, for its 7B models, follow.", ""]
    for table in tables:
        parts += [f"## {table.title}", "", seed_layout_table(table), ""]
        parts += [f"- {n}" for n in table.notes if n.startswith(("Memory:", "Time/Epoch", "Data:"))] + [""]
    parts += ["## The seed's claims (causal LM, 7B models, one GPU)", "", seed_claims(), "",
              "Run `peftlab plan --seed-table` for the planner's prediction of each of these rows.", ""]
    return "\n".join(parts)
