"""Model cards: the README.md of every saved adapter, merged model and export, following peft's and the Hub's
conventions (YAML front matter: base_model, library_name, pipeline_tag, tags, datasets, model-index).

Everything in a card is measured or recorded by the run (its :class:`~peftlab.record.RunRecord`); nothing is a
placeholder. ``base_model`` is a hub id or absent, never a local path.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from peftlab.record import RunRecord

#: Hub ids of the offline aliases that stand for a real hub model (the tiny random ones stand for none).
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m",
                 "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD_MARK = "<!-- written by peftlab -->"
#: Config fields that `peftlab train` takes as flags of their own (the rest go through --set).
_FLAG_FIELDS = ("model", "task", "dataset", "eval_dataset", "text_column", "text_pair_column", "label_column",
                "method", "r", "alpha", "dropout", "target_modules", "lr", "epochs", "max_steps", "block_size",
                "max_length", "batch_size", "grad_accum", "seed", "train_subset", "eval_subset")
#: Fields left out of the reproducing command: where the run was written, how it was logged, machine paths.
_NOT_IN_COMMAND = ("output_dir", "overwrite", "resume", "data_dir", "report_to", "tracking_dir", "tracking_project")


def is_hub_id(name: str | None) -> bool:
    """'org/name' that is not an existing local path."""
    return bool(name) and bool(HUB_ID.match(str(name))) and not Path(str(name)).expanduser().exists()


def base_model_id(model: str, source: str | None = None) -> str | None:
    """The base's hub id: an alias's, a hub id as given, or the `_name_or_path` a local folder declares."""
    if model in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[model]
    if is_hub_id(model):
        return model
    for folder in (source, model):
        config = Path(str(folder or "")).expanduser() / "config.json"
        if folder and config.is_file():
            try:
                declared = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
            except (json.JSONDecodeError, OSError):
                declared = None
            if is_hub_id(declared):
                return declared
    return None


def dequantized_note(record: RunRecord) -> list[str]:
    """One sentence under the base model when its weights were dequantized from a GGUF file (an alias's fact)."""
    from peftlab.models import dequantized_from

    model = record.model
    quantization = dequantized_from(model.name)
    if quantization is None:
        return []
    base = base_model_id(str(model.name), model.source) or model.name
    return [f"The base weights are `{base}` dequantized from a {quantization} GGUF file, not the original bf16 "
            "release: the adapter was trained against these weights and fits them best.", ""]


def pipeline_tag(architecture: str | None) -> str:
    """The Hub's pipeline tag from the model class (the head decides what the model does)."""
    arch = architecture or ""
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return "text-generation"


def _dataset_names(record: RunRecord) -> list[str]:
    names = []
    for key in ("dataset", "eval_dataset"):
        value = record.config.get(key)  # the run's resolved config, as recorded
        if value:
            names.append(Path(value).name if Path(str(value)).expanduser().exists() else str(value))
    return list(dict.fromkeys(names))


def reproduce_command(config: dict[str, Any]) -> str:
    """A `peftlab train` command line that reruns the config: every field that differs from the default."""
    from peftlab.config import RunConfig

    defaults = RunConfig().model_dump()
    parts = ["peftlab", "train"]
    for key, value in config.items():
        if key in _NOT_IN_COMMAND or key not in defaults or value == defaults[key]:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else ("null" if value is None else str(value))
        if isinstance(value, bool):
            text = str(value).lower()
        if key in _FLAG_FIELDS:
            parts += [f"--{key.replace('_', '-')}", text]
        else:
            parts += ["--set", f"{key}={text}"]
    return shlex.join(parts)


def _metrics_index(record: RunRecord) -> list[dict[str, Any]]:
    return [{"type": name, "value": round(float(value), 6), "name": f"{name} (after training)"}
            for name, value in record.metrics.after.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def front_matter(record: RunRecord, library: str = "peft", extra_tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The card's YAML metadata."""
    method, task = record.method.name, record.task.name
    base = base_model_id(str(record.model.name), record.model.source)
    tag = pipeline_tag(record.model.architecture)
    tags = ["peftlab", *([method] if method else []), *extra_tags, tag]
    if base and library == "peft":
        tags.insert(1, f"base_model:adapter:{base}")
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta.update({"library_name": library, "pipeline_tag": tag, "tags": list(dict.fromkeys(tags))})
    datasets = _dataset_names(record)
    if datasets:
        meta["datasets"] = datasets
    metrics = _metrics_index(record)
    if metrics:
        split = record.data.eval.split if record.data.eval is not None else None
        meta["model-index"] = [{"name": Path(str(record.run_dir or "run")).name, "results": [{
            "task": {"type": tag, **({"name": task} if task else {})},
            "dataset": {"name": datasets[-1] if datasets else "local data", "type": datasets[-1] if datasets
                        else "local", "split": str(split or "eval")},
            "metrics": metrics}]}]
    return meta


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def body(record: RunRecord, title: str, extra: list[str] | None = None) -> str:
    """The card's markdown: result row, hyperparameters, data, command, time, memory, versions."""
    method = record.method
    lines = [CARD_MARK, f"# {title}", ""]
    lines += [f"{_fmt(method.name)} fine-tune of `{_fmt(record.model.name)}` on the {_fmt(record.task.name)} task, "
              "trained and measured by peftlab" + (f" ({method.summary})." if method.summary else "."), ""]
    lines += dequantized_note(record)
    lines += extra or []
    lines += _result_lines(record)
    lines += ["", "## Hyperparameters", "", "| field | value |", "|---|---|"]
    lines += _hyperparameter_lines(record)
    lines += ["", "## Data", "", "| role | source | split | used | fingerprint (sha256) |", "|---|---|---|---|---|"]
    for role, part in (("train", record.data.train), ("eval", record.data.eval)):
        if part is not None:
            lines.append(f"| {role} | `{_fmt(part.source)}` | {_fmt(part.split)} | {_fmt(part.used)} of "
                         f"{_fmt(part.total)} | `{_fmt(part.fingerprint)}` |")
    lines += [f"- {note}" for note in record.data.notes]
    lines += ["", "## Reproduce", "", "```bash", reproduce_command(record.config), "```", ""]
    lines += _time_memory_lines(record)
    return "\n".join(lines) + "\n"


def _result_lines(record: RunRecord) -> list[str]:
    """The result row (when the record is complete enough for one) and the metrics before and after."""
    from peftlab.summary import format_result_row

    lines = ["## Result", ""]
    try:
        lines += [format_result_row(record), ""]
    except (KeyError, TypeError, ValueError):  # a partial record: the metrics below still stand
        pass
    before, after = record.metrics.before or {}, record.metrics.after
    lines += ["| metric | before | after |", "|---|---|---|"]
    return lines + [f"| {k} | {_fmt(before.get(k))} | {_fmt(v)} |" for k, v in after.items()]


def _hyperparameter_lines(record: RunRecord) -> list[str]:
    cfg, lines = record.config, []
    keys = ("method", "r", "alpha", "dropout", "target_modules", "lr", "epochs", "max_steps", "batch_size",
            "grad_accum", "scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "block_size", "max_length",
            "seed", "dtype")
    for key in keys:
        if key in cfg:
            value = cfg[key]
            lines.append(f"| {key} | {','.join(map(str, value)) if isinstance(value, list) else _fmt(value)} |")
    if record.method.target_modules:
        lines.append(f"| adapted modules | {', '.join(record.method.target_modules)} |")
    params = record.params
    if params.trainable_params is not None and params.total_params is not None:
        lines.append(f"| trainable parameters | {params.trainable_params:,} of {params.total_params:,}"
                     f" ({_fmt(params.trainable_percent)}%) |")
    return lines


def _time_memory_lines(record: RunRecord) -> list[str]:
    timing, memory, model = record.timing, record.memory, record.model
    lines = ["## Time, memory and versions", "",
             f"- training: {_fmt(timing.train_time_s)} s over {_fmt(timing.optimizer_steps)} optimizer steps "
             f"({_fmt(timing.tokens_per_s)} tokens/s); load {_fmt(timing.load_time_s)} s, evaluation "
             f"{_fmt(timing.eval_time_s)} s",
             f"- memory: {_fmt(memory.headline_gb)} GB ({_fmt(memory.headline_kind)})",
             f"- device: {_fmt(model.device)}, dtype {_fmt(model.dtype)}; finished {_fmt(record.finished)}"]
    if record.versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in record.versions.items() if v))
    if record.git_commit:
        lines.append(f"- peftlab commit: {record.git_commit}")
    return lines


def render(record: RunRecord, title: str | None = None, library: str = "peft",
           extra_tags: tuple[str, ...] = (), extra: list[str] | None = None) -> str:
    """The whole card: YAML front matter and body."""
    meta = front_matter(record, library, extra_tags)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    name = title or Path(str(record.run_dir or "peftlab run")).name
    return f"---\n{head}---\n\n{body(record, name, extra)}"


def write_card(folder: str | Path, record: RunRecord, **kwargs: Any) -> Path:
    """Write ``folder/README.md`` (replacing peft's placeholder template)."""
    path = Path(folder) / "README.md"
    path.write_text(render(record, **kwargs), encoding="utf-8")
    return path
