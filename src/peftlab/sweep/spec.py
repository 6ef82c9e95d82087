"""The sweep file -> its runs: parse ``base``/``grid``/``grids``, expand the product, give each run a stable
readable id, and validate every RunConfig before anything runs. The syntax is described in :mod:`peftlab.sweep`."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import RunConfig, read_yaml
from peftlab.configure import build_config, config_field_names, suggest_field
from peftlab.errors import UserError

SWEEP_OWNED_FIELDS = ("output_dir", "overwrite", "resume")
#: Run keys that say how a run is launched rather than what it computes: ``processes: N`` runs it on N
#: data-parallel processes (``peftlab train --processes N``), so it takes N slots of the executor.
LAUNCH_FIELDS = ("processes",)
TOP_KEYS = ("name", "description", "calibration", "slurm", "base", "grid", "grids")
PART_KEYS = ("id", "base", "grid")
#: Short prefixes for numeric values in run ids (r8, a16, seed1); other fields use their own name.
ID_PREFIX = {"alpha": "a", "epochs": "ep", "max_steps": "steps", "train_subset": "n", "batch_size": "bs",
             "grad_accum": "ga", "block_size": "block", "max_length": "len", "dropout": "drop"}
#: Fields whose values are paths or hub ids: their last component names them in run ids.
PATH_FIELDS = ("model", "dataset", "eval_dataset")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class SweepRun:
    """One expanded run of a sweep: its id, the fields the sweep file sets for it, and the validated config."""

    id: str
    fields: dict[str, Any]
    config: RunConfig
    processes: int = 1


@dataclass(frozen=True)
class SweepSpec:
    """A sweep file, expanded and validated."""

    path: Path
    name: str
    description: str
    runs: list[SweepRun]
    fingerprint: str
    #: A calibration file shipped with the sweep (``calibration:``, relative to the sweep file), used while the
    #: sweep folder has no calibration.json of its own.
    calibration: Path | None = None
    #: The ``slurm:`` block: submitit settings for ``--executor slurm`` (checked by the slurm executor).
    slurm: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Option:
    segment: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class _Axis:
    name: str
    options: list[_Option]

    @property
    def fields(self) -> set[str]:
        return {k for o in self.options for k in o.fields}


def _check_field(name: Any, where: str) -> None:
    if name in LAUNCH_FIELDS:
        return
    if not isinstance(name, str) or name not in config_field_names():
        raise UserError(f"{where}: unknown config field {name!r}{suggest_field(str(name))}; "
                        "see `peftlab train --help`")
    if name in SWEEP_OWNED_FIELDS:
        raise UserError(f"{where}: the sweep sets {name!r} itself (each run writes to DIR/runs/<id>); remove it")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of field: value, not {type(value).__name__}")
    return value


def id_segment(name: str, value: Any) -> str:
    """The readable piece of a run id for one field value: lora, r8, a16, seed1, Mistral-7B-v0.1, q_proj+v_proj."""
    if isinstance(value, bool):
        text = name if value else f"no-{name}"
    elif value is None:
        text = f"{name}-none"
    elif isinstance(value, int | float):
        text = f"{ID_PREFIX.get(name, name)}{value:g}" if isinstance(value, float) else \
            f"{ID_PREFIX.get(name, name)}{value}"
    elif isinstance(value, list | tuple):
        text = "+".join(str(v) for v in value)
    else:
        text = str(value)
        if name in PATH_FIELDS:
            text = text.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_-") or name


def _parse_axis(name: Any, values: Any, where: str) -> _Axis:
    where = f"{where}: axis {name!r}"
    if not isinstance(values, list):
        raise UserError(f"{where} must be a list of values (got {values!r}); put a fixed value under base:")
    if not values:
        raise UserError(f"{where} has no values, so the grid expands to zero runs; give at least one value "
                        "or remove the axis")
    coupled = [isinstance(v, dict) for v in values]
    if any(coupled) and not all(coupled):
        raise UserError(f"{where} mixes mappings and plain values; use only mappings (a coupled axis) or only "
                        "values (a plain axis)")
    if not all(coupled):
        _check_field(name, where)
        return _Axis(name, [_Option(id_segment(name, v), {name: v}) for v in values])
    if name in config_field_names():
        raise UserError(f"{where}: a list of mappings sets several fields together, so name the axis with a "
                        f"word that is not a config field (e.g. 'shape'), not {name!r}")
    options = []
    for i, entry in enumerate(values, 1):
        label = entry.get("id")
        fields = {k: v for k, v in entry.items() if k != "id"}
        for key in fields:
            _check_field(key, f"{where}, entry {i}")
        if label is None:
            if not fields:
                raise UserError(f"{where}, entry {i} is empty; give it fields or an id")
            label = "-".join(id_segment(k, v) for k, v in fields.items())
        elif not isinstance(label, str | int) or not _ID_RE.match(str(label)):
            raise UserError(f"{where}, entry {i}: id {label!r} must be letters, digits, '.', '_', '+' or '-'")
        options.append(_Option(str(label), fields))
    return _Axis(name, options)


def _parse_grid(grid: Any, where: str) -> list[_Axis]:
    axes = [_parse_axis(k, v, where) for k, v in _mapping(grid, where).items()]
    for a, b in itertools.combinations(axes, 2):
        both = sorted(a.fields & b.fields)
        if both:
            raise UserError(f"{where}: field {both[0]!r} is set by both axes {a.name!r} and {b.name!r}; "
                            "set it in one of them")
    return axes


def _drop_inapplicable_method_fields(base: dict[str, Any], grid_fields: dict[str, Any]) -> dict[str, Any]:
    """Base method fields apply only to runs whose method takes them (so full runs can share a LoRA base)."""
    from peftlab.methods import METHOD_FIELDS, METHODS

    method = grid_fields.get("method", base.get("method", RunConfig.model_fields["method"].default))
    if method not in METHODS:  # an unknown method: RunConfig's validation names it
        return dict(base)
    takes = METHODS[method].field_names()
    return {k: v for k, v in base.items() if k not in METHOD_FIELDS or k in takes}


def _expand(data: dict[str, Any], source: str) -> list[tuple[str, dict[str, Any]]]:
    top_base = _mapping(data.get("base"), f"{source}: base")
    for key in top_base:
        _check_field(key, f"{source}: base")
    if ("grid" in data) == ("grids" in data):
        raise UserError(f"{source}: give exactly one of grid: (one grid) or grids: (a list of parts)")
    if "grid" in data:
        parts = [{"grid": data["grid"]}]
    else:
        parts = data["grids"]
        if not isinstance(parts, list) or not parts:
            raise UserError(f"{source}: grids: must be a non-empty list of parts {{id, base, grid}}, so the sweep "
                            "expands to zero runs")
    out: list[tuple[str, dict[str, Any]]] = []
    for n, part in enumerate(parts, 1):
        where = f"{source}: grids[{n}]" if "grids" in data else f"{source}: grid"
        part = _mapping(part, where)
        if "grids" in data:
            extra = sorted(set(part) - set(PART_KEYS))
            if extra:
                raise UserError(f"{where}: unknown key {extra[0]!r}; a part has {', '.join(PART_KEYS)}")
        part_id = part.get("id")
        if part_id is not None and not _ID_RE.match(str(part_id)):
            raise UserError(f"{where}: id {part_id!r} must be letters, digits, '.', '_', '+' or '-'")
        part_base = _mapping(part.get("base"), f"{where}: base")
        for key in part_base:
            _check_field(key, f"{where}: base")
        base = {**top_base, **part_base}
        axes = _parse_grid(part.get("grid"), where)
        for combo in itertools.product(*(a.options for a in axes)):
            grid_fields: dict[str, Any] = {}
            segments = [str(part_id)] if part_id is not None else []
            for option in combo:
                grid_fields.update(option.fields)
                segments.append(option.segment)
            fields = {**_drop_inapplicable_method_fields(base, grid_fields), **grid_fields}
            out.append(("-".join(segments) or "run", fields))
    return out


def fingerprint(runs: list[SweepRun]) -> str:
    """A hash of every run's id and the (validated) fields the sweep sets for it."""
    blob = json.dumps([[r.id, r.fields] for r in runs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read, expand and validate a sweep file; every error is one line naming the place to fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} does not exist; check the path")
    data = read_yaml(path)
    source = str(path)
    extra = sorted(set(data) - set(TOP_KEYS))
    if extra:
        raise UserError(f"{source}: unknown top-level key {extra[0]!r}; a sweep file has "
                        f"{', '.join(TOP_KEYS)} (config fields go under base:)")
    expanded = _expand(data, source)
    if not expanded:
        raise UserError(f"{source}: the grid expands to zero runs")
    seen: dict[str, int] = {}
    runs = []
    for i, (run_id, fields) in enumerate(expanded):
        if run_id in seen:
            raise UserError(f"{source}: runs {seen[run_id] + 1} and {i + 1} both get the id {run_id!r}; give the "
                            "coupled-axis entries distinct `id:` labels or make the values differ")
        seen[run_id] = i
        processes = _processes(fields.get("processes", 1), f"{source} (run {run_id})")
        cfg = build_config({k: v for k, v in fields.items() if k not in LAUNCH_FIELDS}, f"{source} (run {run_id})")
        dumped = {**cfg.model_dump(mode="json"), "processes": processes}
        runs.append(SweepRun(run_id, {k: dumped[k] for k in fields}, cfg, processes))
    return SweepSpec(path, str(data.get("name") or path.stem), str(data.get("description") or ""), runs,
                     fingerprint(runs), _calibration_path(data.get("calibration"), path),
                     _mapping(data.get("slurm"), f"{source}: slurm"))


def _processes(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: processes must be a whole number of processes, 1 or more (got {value!r})")
    return value


def _calibration_path(value: Any, sweep_file: Path) -> Path | None:
    """The ``calibration:`` file, resolved against the sweep file's folder; it must exist."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{sweep_file}: calibration: must be a path to a calibration.json, got {value!r}")
    found = (sweep_file.parent / value).resolve()
    if not found.is_file():
        raise UserError(f"{sweep_file}: calibration: {value!r} does not exist (looked for {found}); fix the path "
                        "(relative to the sweep file) or remove the key")
    return found
