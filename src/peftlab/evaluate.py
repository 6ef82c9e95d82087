"""Evaluation and generation outside training: a base model, or base + a saved adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from peftlab.config import RunConfig
from peftlab.configure import SAVED_SOURCE, build_config, load_config, precision_from_dtype
from peftlab.errors import UserError
from peftlab.evals import BenchmarkStages
from peftlab.methods import METHODS, get_method
from peftlab.models import LoadedModel, load_model
from peftlab.precision import compute_context
from peftlab.tasks import eval_inherited_fields, get_task


def run_config_of(adapter: str | Path) -> dict[str, Any]:
    """The config.yaml of the run that produced an adapter (its parent folder), if there is one."""
    path = Path(adapter).expanduser().parent / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {}


#: Run fields that evaluating a saved adapter takes from its run besides the tasks' settings: the model, the task
#: and how the model computes.
EVAL_RUN_FIELDS = ("model", "task", "precision", "dtype", "trust_remote_code", "eval_batch_size", "batch_size",
                   "chunked_ce", "fp32_attention", "threads")
#: Every field a re-evaluation inherits: those and each task's evaluation settings (``Task.fields``).
EVAL_INHERITED = frozenset(EVAL_RUN_FIELDS) | eval_inherited_fields()


def eval_config(adapter: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Config for evaluating: the adapter's run config (data and model fields) under the given overrides."""
    run = run_config_of(adapter) if adapter else {}
    base = precision_from_dtype({k: v for k, v in run.items() if k in EVAL_INHERITED}, SAVED_SOURCE, [])
    method = run.get("method")
    if method is not None and get_method(method).quantizes_base:  # for evaluation only a 4-bit base matters
        base.update({k: v for k, v in run.items() if k == "method" or k in get_method(method).field_names()})
    if overrides.get("dtype") is not None:  # the old spelling of an override still replaces the run's precision
        base.pop("precision", None)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return load_config(None, base)


def load_for_eval(cfg: RunConfig, adapter: str | None, base_precision: str, model_kind: str = "causal_lm",
                  **model_kwargs: Any) -> tuple[LoadedModel, nn.Module]:
    """Load the base model (4-bit if the adapter was trained with QLoRA, unless told otherwise) + adapter."""
    if cfg.threads:  # as in training: the run's thread count, unless overridden (--set threads=N)
        torch.set_num_threads(cfg.threads)
    trained_with = get_method(cfg.method)
    quantize = base_precision == "4bit" or (base_precision == "auto" and trained_with.quantizes_base)
    if quantize and not trained_with.quantizes_base:  # the 4-bit settings come from a quantizing method's defaults
        quantizer = next(m for m in METHODS.values() if m.quantizes_base)
        cfg = build_config({**cfg.model_dump(exclude=set(cfg.method_fields())), "method": quantizer.name},
                           "--base-precision 4bit")
    loaded = load_model(cfg, model_kind=model_kind, quantize_4bit=quantize, **model_kwargs)
    model = loaded.model
    if adapter:
        model = attach_adapter(model, adapter)
    model.eval()
    return loaded, model


def attach_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """PeftModel.from_pretrained with one-line errors for a missing folder or a mismatched base model."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"adapter {str(path)!r} has no adapter_config.json; give a run's adapter/ folder")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        text = str(exc)
        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if "size mismatch" in text or "shape" in text or "Target modules" in text or "not found" in text:
            raise UserError(f"adapter {str(path)!r} does not fit this base model (it was trained on "
                            f"{base_name!r}); load it onto the same architecture and size") from None
        raise


def check_recorded_labels(adapter: str | Path, labels: list[str] | None) -> None:
    """A classification adapter's head maps ids to the labels its run recorded; refuse a different label set."""
    from peftlab.record import RunRecord

    run_dir = Path(adapter).expanduser().parent
    if labels is None or not RunRecord.exists(run_dir):
        return
    recorded = getattr(RunRecord.read(run_dir).data, "labels", None)  # the classification task's info block
    if recorded is not None and list(recorded) != list(labels):
        raise UserError(f"adapter {str(adapter)!r} was trained on labels {', '.join(recorded)}, but this data's "
                        f"training split has {', '.join(labels)}; evaluate with the run's dataset")


#: Fields that ask for the task's own evaluation when benchmarks are given too (else only the benchmarks run).
TASK_FIELDS = ("task", "dataset", "eval_dataset", "eval_split", "eval_subset")


def run_eval(overrides: dict[str, Any], adapter: str | None, base_precision: str = "auto") -> dict[str, Any]:
    """Evaluate a model (+ adapter) with the task's metrics on a split, and/or on lm-eval benchmarks."""
    cfg = eval_config(adapter, overrides)
    if cfg.benchmarks and not any(overrides.get(k) is not None for k in TASK_FIELDS):
        return run_benchmarks(cfg, adapter, base_precision)
    task = get_task(cfg.task)(cfg)
    raw = task.load()
    model_kwargs = task.model_kwargs(raw)
    if adapter:
        check_recorded_labels(adapter, model_kwargs.get("label_names"))
    loaded, model = load_for_eval(cfg, adapter, base_precision, task.model_kind, **model_kwargs)
    data = task.prepare(raw, loaded.tokenizer, model)
    with compute_context(loaded.precision, loaded.device.type):  # the precision the run trained in
        metrics = task.evaluate(data, model, "eval").metrics
    result = {"model": cfg.model, "adapter": adapter, "task": cfg.task, "precision": loaded.precision.name,
              "data": task.info(data), "metrics": metrics}
    if cfg.benchmarks:
        scored = _score_benchmarks(BenchmarkStages.for_config(cfg), loaded, model)
        result["metrics"].update(scored.pop("metrics"))
        result.update(scored)
    return result


def run_benchmarks(cfg: RunConfig, adapter: str | None, base_precision: str = "auto") -> dict[str, Any]:
    """Score a model (+ adapter) on the config's lm-eval benchmarks only (no task data is read)."""
    stages = BenchmarkStages.for_config(cfg)  # bad names, files or data dir: one line, before the model loads
    loaded, model = load_for_eval(cfg, adapter, base_precision)
    return {"model": cfg.model, "adapter": adapter, "precision": loaded.precision.name,
            **_score_benchmarks(stages, loaded, model)}


def _score_benchmarks(stages: BenchmarkStages, loaded: LoadedModel, model: nn.Module) -> dict[str, Any]:
    scores = stages.score("eval", model, loaded)
    return {"metrics": {f"{name}/{metric}": value for name, s in scores.items() for metric, value in s.metrics.items()},
            "benchmarks": {name: {"items": s.size, "limit": stages.suite.limit, **s.metrics, "per_item": s.items}
                           for name, s in scores.items()},
            "benchmark_time_s": stages.seconds}


def run_generate(overrides: dict[str, Any], adapter: str | None, prompt: str, max_new_tokens: int,
                 chat: bool = False, base_precision: str = "auto") -> str:
    """Greedy completion of one prompt (optionally wrapped in the model's chat template)."""
    from peftlab.tasks.clm import generate_text

    cfg = eval_config(adapter, overrides)
    loaded, model = load_for_eval(cfg, adapter, base_precision)  # generation needs a causal LM, whatever the task
    tok = loaded.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise UserError(f"--chat: model {cfg.model!r} has no chat template; drop --chat")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    with compute_context(loaded.precision, loaded.device.type):
        return generate_text(model, tok, prompt, max_new_tokens)
