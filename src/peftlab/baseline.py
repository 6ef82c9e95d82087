"""The shared baseline: the "before" evaluation computed once per key and reused by every run with the same key.

The key holds what decides the baseline's numbers: the base model (name, revision, where it was loaded from and,
for a local folder, its files' sizes and modification times), the resolved precision and device, how the weights
are stored (parameter dtypes: a frozen base under bf16-mixed keeps bf16 matmul weights, full fine-tuning fp32
ones), the task's evaluation identity (evaluation data as used, its fingerprint, and the fields of
``Task.eval_fields``), the method when it changes the model before training (a 4-bit base, or an initialisation
that is not the base's function), the seed when the model has newly initialised modules (a classification head),
the package versions and a hash of peftlab's source. Fields that change only float rounding (threads, the evaluation
batch size where evaluation does not pad) are left out, so that runs differing in them share.

Entries live in ``$PEFTLAB_BASELINE_CACHE`` (a sweep points it at ``<sweep dir>/baselines``), else in
``<peftlab cache>/baselines``; each is one JSON file written atomically: the key, the metrics, the per-example
values and the per-example outputs (the base model's predictions in the run's artifacts).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.per_example import values_from_json, values_to_json, write_stage
from peftlab.record import package_versions, write_json
from peftlab.tasks.base import Evaluation

CACHE_ENV = "PEFTLAB_BASELINE_CACHE"
CACHE_FORMAT = 1
STAGE = "before"


def cache_folder() -> Path:
    """Where baseline entries are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from peftlab.models import cache_dir

    return cache_dir() / "baselines"


def _model_state(cfg, method) -> dict[str, Any]:
    """The method's part of the key: nothing when the wrapped model is its base's function before training."""
    if not method.starts_as_base:
        return {"method": method.name, "fields": cfg.method_fields(), "seed": cfg.seed}
    if method.quantizes_base:  # the 4-bit base is the baseline; its quantization settings are method fields
        return {"method": method.name, "fields": cfg.method_fields()}
    return {}


def code_digest() -> str:
    """A hash of peftlab's own source files: any code change (committed or not) gives new keys."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def model_files(source: str) -> list[tuple[str, int, int]] | None:
    """(name, size, mtime) of a local model folder's files: a folder rewritten in place gets a new key. Hub ids
    are pinned by ``revision`` instead (None here)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def baseline_key(cfg, task, data, loaded, method, model) -> dict[str, Any]:
    """Everything that decides the baseline evaluation's numbers (see the module docstring)."""
    versions = {k: v for k, v in package_versions().items() if k != "python"}
    return {
        "format": CACHE_FORMAT,
        "model": {"name": cfg.model, "revision": cfg.revision, "source": str(loaded.source),
                  "files": model_files(str(loaded.source)),
                  "trust_remote_code": cfg.trust_remote_code, "fp32_attention": cfg.fp32_attention,
                  "compile": cfg.compile},
        "precision": loaded.precision.name,
        "device": loaded.device.type,
        "weights": sorted({str(p.dtype) for p in model.parameters()}),
        "evaluation": task.eval_identity(data),
        "method": _model_state(cfg, method),
        "head_seed": cfg.seed if loaded.new_modules else None,  # a newly initialised head depends on the seed
        "versions": versions,
        "code": code_digest(),
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_entry(path: Path, key: dict[str, Any], task) -> Evaluation | None:
    """The cached evaluation at ``path`` if it is whole and has exactly this key, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or _normal(data.get("key")) != _normal(key):
            return None
        return Evaluation(STAGE, dict(data["metrics"]), task.outputs_from_json(data["outputs"]),
                          values_from_json(data, str(path)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):  # absent or malformed: recompute
        return None


def write_entry(path: Path, key: dict[str, Any], task, evaluation: Evaluation) -> None:
    assert evaluation.examples is not None
    write_json(path, {"format": CACHE_FORMAT, "key": key, "metrics": evaluation.metrics,
                      "outputs": task.outputs_to_json(evaluation.outputs), **values_to_json(evaluation.examples)})


def evaluate_before(cfg, task, data, model, loaded, method, run) -> Evaluation:
    """The base model's evaluation: from the cache when an entry has this run's key, else computed (and cached).

    The writing process also stores it as the run's "before" stage (eval_examples.json), so it survives a resume.
    """
    key = baseline_key(cfg, task, data, loaded, method, model)
    digest = key_digest(key)
    path = cache_folder() / f"{digest}.json"
    cached = read_entry(path, key, task)
    result = cached if cached is not None else task.evaluate(data, model, STAGE)
    if cached is None and run.is_writer and result.examples is not None:
        write_entry(path, key, task, result)
    result = Evaluation(result.stage, {**result.metrics, "baseline_key": digest,
                                       "baseline_reused": cached is not None}, result.outputs, result.examples)
    if run.is_writer:
        write_stage(run.path, task.name, result)
    return result
