"""Per-example evaluation values on disk: a run's ``eval_examples.json``, read back for bootstrap intervals.

The file holds, per evaluation stage ("before": the base model, "after": the trained one), the stage's metrics and
its per-example values (:class:`~peftlab.tasks.base.ExampleValues`): per unit (blocks, responses, generations,
examples), columns of one value per unit in evaluation order. It is written atomically, a stage at a time, so the
"before" stage survives a crash and a resume. Layout (``format`` 1)::

    {"format": 1, "task": "clm",
     "stages": {"before": {"metrics": {...}, "classes": null, "groups": {"blocks": {"nll": [...], "tokens": [...]}}},
                "after": {...}},
     "benchmarks": {"before": {"arc_easy": {"metrics": {"acc": ..., "acc_norm": ...},
                                            "items": {"doc_id": [...], "acc": [...], "acc_norm": [...]}}},
                    "after": {...}}}

``benchmarks`` (present when the run scored lm-eval benchmarks) holds one correctness value per item and metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.record import EXAMPLES_FILE, write_json
from peftlab.tasks.base import Evaluation, ExampleValues

__all__ = ["EXAMPLES_FILE", "StageValues", "read_benchmark_stages", "read_stages", "write_benchmark_stage",
           "write_stage"]
EXAMPLES_FORMAT = 1
#: The file's key for the benchmarks (peftlab.evals): {stage: {benchmark: {"metrics", "items": {column: [...]}}}}.
BENCHMARKS_KEY = "benchmarks"


@dataclass(frozen=True)
class StageValues:
    """One evaluation stage as read back: its metrics and per-example values."""

    stage: str
    metrics: dict[str, Any]
    values: ExampleValues

    def size(self, unit: str) -> int | None:
        """How many units of this kind were evaluated (None when the stage has none)."""
        columns = self.values.groups.get(unit)
        return len(next(iter(columns.values()))) if columns else None


def values_to_json(values: ExampleValues) -> dict[str, Any]:
    return {"classes": values.classes,
            "groups": {unit: {name: list(column) for name, column in cols.items()}
                       for unit, cols in values.groups.items()}}


def values_from_json(data: dict[str, Any], source: str) -> ExampleValues:
    groups = data.get("groups")
    if not isinstance(groups, dict) or not all(isinstance(c, dict) for c in groups.values()):
        raise UserError(f"{source}: 'groups' must map each unit to its columns; rerun the run or remove the file")
    out: dict[str, dict[str, tuple[float, ...]]] = {}
    for unit, columns in groups.items():
        lengths = {len(v) for v in columns.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in columns.values()):
            raise UserError(f"{source}: the columns of {unit!r} are not lists of one length; rerun the run or remove "
                            "the file")
        out[unit] = {name: tuple(column) for name, column in columns.items()}
    classes = data.get("classes")
    return ExampleValues(out, int(classes) if classes is not None else None)


def stage_to_json(evaluation: Evaluation) -> dict[str, Any]:
    """A stage's entry: metrics and per-example values (the evaluation must have them)."""
    assert evaluation.examples is not None
    return {"metrics": evaluation.metrics, **values_to_json(evaluation.examples)}


def write_stage(run_dir: str | Path, task: str, evaluation: Evaluation) -> Path | None:
    """Add (or replace) one stage in the run's eval_examples.json; nothing when the evaluation has no values."""
    if evaluation.examples is None:
        return None
    path = Path(run_dir) / EXAMPLES_FILE
    data: dict[str, Any] = {"format": EXAMPLES_FORMAT, "task": task, "stages": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if isinstance(old, dict) and old.get("task") == task and isinstance(old.get("stages"), dict):
            data["stages"] = old["stages"]
        if isinstance(old, dict) and isinstance(old.get(BENCHMARKS_KEY), dict):
            data[BENCHMARKS_KEY] = old[BENCHMARKS_KEY]
    data["stages"][evaluation.stage] = stage_to_json(evaluation)
    write_json(path, data)
    return path


def read_stages(run_dir: str | Path) -> dict[str, StageValues] | None:
    """The stages of a run's eval_examples.json, or None when the run has none (an older run)."""
    path = Path(run_dir) / EXAMPLES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun the run or remove the file") from None
    if not isinstance(data, dict) or data.get("format") != EXAMPLES_FORMAT or not isinstance(data.get("stages"),
                                                                                              dict):
        raise UserError(f"{path}: not a format-{EXAMPLES_FORMAT} eval_examples.json; rerun the run or remove it")
    return {stage: StageValues(stage, dict(entry.get("metrics") or {}), values_from_json(entry, str(path)))
            for stage, entry in data["stages"].items() if isinstance(entry, dict)}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def write_benchmark_stage(run_dir: str | Path, task: str, stage: str, scores: dict[str, dict[str, Any]]) -> Path:
    """Add (or replace) one stage's benchmark scores (``{name: {"metrics", "items"}}``) in eval_examples.json."""
    path = Path(run_dir) / EXAMPLES_FILE
    data = _read_file(path) if path.is_file() else {}
    if data.get("format") != EXAMPLES_FORMAT:
        data = {"format": EXAMPLES_FORMAT, "task": task, "stages": {}}
    benchmarks = data.get(BENCHMARKS_KEY) if isinstance(data.get(BENCHMARKS_KEY), dict) else {}
    data[BENCHMARKS_KEY] = {**benchmarks, stage: scores}
    write_json(path, data)
    return path


def read_benchmark_stages(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The benchmark stages a run's eval_examples.json holds ({} when none)."""
    path = Path(run_dir) / EXAMPLES_FILE
    stages = _read_file(path).get(BENCHMARKS_KEY) if path.is_file() else None
    return {k: v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}
