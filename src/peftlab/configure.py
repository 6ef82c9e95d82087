"""Build a validated RunConfig: the one place that checks a config against the method and task registries.

A config comes from YAML (``--config``) and CLI overrides; both pass through :func:`load_config` /
:func:`build_config`, which report every invalid field in one actionable line (:class:`~peftlab.errors.UserError`).
Run-level fields are RunConfig's; the chosen method's fields model validates, coerces and default-fills the method
fields, which RunConfig then carries as extras (``cfg.r``, ``cfg.method_fields()``, ``cfg.is_set("r")``). A task's
settings that need something of the method (``Task.fields.needs``: packing needs a method that can pack) are
checked against the chosen method here too.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftlab.config import RunConfig, field_default, read_yaml, run_field_names, validation_messages
from peftlab.errors import UserError
from peftlab.methods import METHODS, all_method_fields, get_method, method_names

#: The source name of stored configs (results.json, a run's config.yaml): no alias notes for those.
SAVED_SOURCE = "saved config"

#: Common spellings of a field from other tools, pointed at ours.
SYNONYMS = {"rank": "r", "lora_r": "r", "learning_rate": "lr", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "num_epochs": "epochs", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length"}


def config_field_names() -> list[str]:
    """Every accepted config field name: the run fields and every registered method's fields."""
    return run_field_names() + sorted(all_method_fields() - set(run_field_names()))


def suggest_field(name: str, candidates: list[str] | None = None) -> str:
    """' (did you mean 'x'?)' for a misspelt or foreign field name, or ''."""
    names = candidates if candidates is not None else config_field_names()
    synonym = SYNONYMS.get(name.lower().replace("-", "_"))
    if synonym in names:
        return f" (did you mean {synonym!r}?)"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_config(data: dict[str, Any], source: str = "command line") -> RunConfig:
    """A validated RunConfig from a mapping of field: value; all problems in one line naming ``source``."""
    from peftlab.tasks import TASKS

    run_names = set(run_field_names())
    problems: list[str] = []
    data = precision_from_dtype(data, source, problems)
    run_data = {k: v for k, v in data.items() if k in run_names}
    other = {k: v for k, v in data.items() if k not in run_names}

    task = run_data.get("task", field_default("task"))
    if task not in TASKS:
        problems.append(f"field 'task': unknown task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    method_name = run_data.get("method", field_default("method"))
    method = METHODS.get(method_name) if isinstance(method_name, str) else None
    if method is None:
        problems.append(f"field 'method': unknown method {method_name!r}; choose one of {', '.join(method_names())}")

    takes = method.field_names() if method else frozenset()
    unknown = [k for k in other if k not in all_method_fields()]
    for key in unknown:
        problems.append(f"unknown config field {key!r}{suggest_field(str(key), sorted(run_names | takes))}")
    if method is not None:
        wrong = sorted(k for k in other if k not in takes and k not in unknown)
        if wrong:
            listed = ", ".join(sorted(takes)) or "no method fields"
            problems.append(f"method {method.name!r} does not take {', '.join(wrong)} (it takes {listed}); "
                            f"remove {'them' if len(wrong) > 1 else 'it'}")
    given = {k: v for k, v in other.items() if k in takes}
    method_values: dict[str, Any] = {}
    if method is not None:
        try:
            method_values = method.fields(**given).model_dump()
        except ValidationError as err:
            problems += validation_messages(err)
    try:
        RunConfig(**run_data)
    except ValidationError as err:
        problems += validation_messages(err)
    if method is not None and task in TASKS:
        problems += unmet_needs(TASKS[task], method, run_data)
    if problems:
        hint = "; see `peftlab train --help`" if unknown else ""
        raise UserError(f"{source}: " + "; ".join(problems) + hint)
    cfg = RunConfig(**run_data, **method_values)
    cfg._user_set = frozenset(given)
    return cfg


def unmet_needs(task, method, run_data: dict[str, Any]) -> list[str]:
    """A problem for each of the task's settings that is on and needs a capability the method lacks
    (``TaskFields.needs``: packing needs the method's "packing")."""
    reasons = method.unsupported_reasons()
    return [f"field {name!r}: method {method.name!r} {reasons[capability]}"
            for name, capability in task.fields.needs.items()
            if run_data.get(name, field_default(name)) and capability in reasons]


def precision_from_dtype(data: dict[str, Any], source: str, problems: list[str]) -> dict[str, Any]:
    """``dtype`` (the old field) as an alias of ``precision``: mapped with a note, or a problem if it conflicts."""
    if "dtype" not in data:
        return data
    from peftlab.precision import from_dtype

    data = dict(data)
    dtype = data.pop("dtype")
    try:
        precision = from_dtype(str(dtype))
    except UserError as exc:
        problems.append(f"field 'dtype': {exc}")
        return data
    given = data.get("precision")
    if given is not None and given != precision:
        problems.append(f"fields 'dtype' ({dtype}) and 'precision' ({given}) disagree; drop dtype, which is an "
                        "alias of precision")
        return data
    data["precision"] = precision
    if source != SAVED_SOURCE:
        print(f"note: dtype={dtype} is an alias of precision={precision}; use --precision", file=sys.stderr)
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Merge a YAML file and overrides (overrides win; None means "not given") into a validated RunConfig."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(data, str(path) if path else "command line")


def config_from_saved(config: dict[str, Any], source: str = SAVED_SOURCE) -> RunConfig:
    """A RunConfig from a stored config (results.json "config", a run's config.yaml), of today's schema or an older
    one that stored every method's fields: fields its method does not take, and nulls, are dropped."""
    method = config.get("method", field_default("method"))
    takes = get_method(method).field_names() if method in METHODS else frozenset()
    foreign = all_method_fields() - takes - set(run_field_names())
    kept = {k: v for k, v in config.items() if v is not None and k not in foreign}
    if "dtype" in kept:  # schema 1 and 2 records stored dtype, today's alias of precision
        kept = precision_from_dtype(kept, SAVED_SOURCE, [])
    return build_config(kept, source)
