"""The seed-style result row: model | training type | (r, alpha) | time/epoch | metric | memory.

Labels, directions, column order and the method's cells come from the registries: a method's ``display_name``
and ``config_label``, a task's ``metrics`` (:class:`~peftlab.tasks.base.MetricSpec`) and ``table_metrics``. A
record whose method or task is not registered (an older peftlab's) still renders, with its names as labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftlab.errors import UserError

if TYPE_CHECKING:  # the registries (torch) load when a record is first rendered, not at import
    from peftlab.record import RunRecord
    from peftlab.tasks.base import MetricSpec


def method_of(record: RunRecord) -> Any | None:
    """The registered method the run used, or None when this peftlab does not know it."""
    from peftlab.methods import get_method

    try:
        return get_method(record.method.name or "")
    except UserError:
        return None


def task_of(record: RunRecord) -> type | None:
    """The registered task class of the run, or None when this peftlab does not know it."""
    from peftlab.tasks import TASKS

    return TASKS.get(record.task.name or "")


def metric_spec(record: RunRecord, key: str) -> MetricSpec:
    """The task's declaration of metric ``key``; for an unknown task or metric, the key itself as its label."""
    from peftlab.tasks.base import MetricSpec

    task = task_of(record)
    for spec in (task.metrics if task is not None else ()):
        if spec.key == key:
            return spec
    better = bool(record.task.higher_is_better) if key == record.task.metric else True
    return MetricSpec(key, key, better)


def table_metrics(record: RunRecord) -> tuple[str, ...]:
    """Keys of the task's extra columns after the headline, in its declared order."""
    task = task_of(record)
    return tuple(task.table_metrics) if task is not None else ()


def training_type(record: RunRecord) -> str:
    """'Full', 'LoRA', 'QLoRA'... as in the seed's tables (the method's display name)."""
    method = method_of(record)
    return method.display_name if method is not None else str(record.method.name)


def config_label(record: RunRecord) -> str:
    """'(r, alpha)' for methods with a rank, '-' otherwise (the method decides)."""
    method = method_of(record)
    return method.config_label(record.method.fields) if method is not None else "-"


def method_order(record: RunRecord) -> int:
    """The method's position in tables and plots (unknown methods last)."""
    method = method_of(record)
    return method.order if method is not None else 1_000_000


def task_order(name: str) -> int:
    """The task's position among the report's tables (unknown tasks last)."""
    from peftlab.tasks import TASKS

    task = TASKS.get(name)
    return task.order if task is not None else 1_000_000


def quantizes_base(record: RunRecord) -> bool:
    """Whether the run's base model was loaded quantized (its 'before' numbers are the 4-bit base's)."""
    method = method_of(record)
    return bool(method is not None and method.quantizes_base)


def format_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def format_result_row(record: RunRecord) -> str:
    """A markdown header and row for one run, plus a line saying which data it used."""
    spec = metric_spec(record, record.task.metric or "")
    minutes = record.timing.time_per_epoch_s / 60 if record.timing.time_per_epoch_s else None
    memory = record.memory.headline_gb
    header = (f"| Model | Training Type | LoRA Config (r, alpha) | Time/Epoch (min) | {spec.label} {spec.arrow} "
              "(before → after) | Memory (GB) |")
    row = (f"| {record.model.name} | {training_type(record)} | {config_label(record)} | "
           f"{minutes:.2f} | {format_metric(record.metric(spec.key, 'before'))} → "
           f"{format_metric(record.metric(spec.key))} | {memory:.2f} |"
           if minutes is not None and memory is not None else "")
    extras = [metric_spec(record, k) for k in table_metrics(record) if k in record.metrics.after]
    for extra in extras:
        header += f" {extra.label} {extra.arrow} (before → after) |"
        if row:
            row += (f" {format_metric(record.metric(extra.key, 'before'))} → "
                    f"{format_metric(record.metric(extra.key))} |")
    notes = "; ".join(data_used(record) + list(record.data.notes))
    return "\n".join([header, "|---|---|---|---|---|---|" + "---|" * len(extras), row, f"data: {notes}"])


def data_used(record: RunRecord) -> list[str]:
    """'train: <source> (N of M blocks)' and the same for eval: which data (and subset) a run used."""
    task = task_of(record)
    used = []
    for role, part in (("train", record.data.train), ("eval", record.data.eval)):
        if part is None:
            continue
        unit = task.example_unit if task is not None else ("blocks" if part.blocks_used is not None
                                                           else "examples")
        used.append(f"{role}: {part.source} ({part.used} of {part.total} {unit})")
    return used
