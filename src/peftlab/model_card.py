"""Model cards: the README.md of every saved adapter, merged model and export, following peft's and the Hub's
conventions (YAML front matter: base_model, library_name, pipeline_tag, tags, datasets, model-index).

Everything in a card is measured or recorded by the run (results.json's schema-1 keys, read as plain dicts);
nothing is a placeholder. ``base_model`` is a hub id or absent, never a local path.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

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


def pipeline_tag(architecture: str | None) -> str:
    """The Hub's pipeline tag from the model class (the head decides what the model does)."""
    arch = architecture or ""
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return "text-generation"


def _dataset_names(results: dict[str, Any]) -> list[str]:
    cfg = results.get("config") or {}
    names = []
    for key in ("dataset", "eval_dataset"):
        value = cfg.get(key)
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


def _metrics_index(results: dict[str, Any]) -> list[dict[str, Any]]:
    after = (results.get("metrics") or {}).get("after") or {}
    return [{"type": name, "value": round(float(value), 6), "name": f"{name} (after training)"}
            for name, value in after.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


def front_matter(results: dict[str, Any], library: str = "peft", extra_tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The card's YAML metadata."""
    model = results.get("model") or {}
    method = (results.get("method") or {}).get("name")
    task = (results.get("task") or {}).get("name")
    base = base_model_id(str(model.get("name")), model.get("source"))
    tag = pipeline_tag(model.get("architecture"))
    tags = ["peftlab", *([method] if method else []), *extra_tags, tag]
    if base and library == "peft":
        tags.insert(1, f"base_model:adapter:{base}")
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta.update({"library_name": library, "pipeline_tag": tag, "tags": list(dict.fromkeys(tags))})
    datasets = _dataset_names(results)
    if datasets:
        meta["datasets"] = datasets
    metrics = _metrics_index(results)
    if metrics:
        data = (results.get("data") or {}).get("eval") or {}
        meta["model-index"] = [{"name": Path(str(results.get("run_dir") or "run")).name, "results": [{
            "task": {"type": tag, **({"name": task} if task else {})},
            "dataset": {"name": datasets[-1] if datasets else "local data", "type": datasets[-1] if datasets
                        else "local", "split": str(data.get("split") or "eval")},
            "metrics": metrics}]}]
    return meta


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def body(results: dict[str, Any], title: str, extra: list[str] | None = None) -> str:
    """The card's markdown: result row, hyperparameters, data, command, time, memory, versions."""
    from peftlab.record import RunRecord
    from peftlab.summary import format_result_row

    cfg = results.get("config") or {}
    timing, memory = results.get("timing") or {}, results.get("memory") or {}
    params = results.get("params") or {}
    method = results.get("method") or {}
    lines = [CARD_MARK, f"# {title}", ""]
    summary = method.get("summary")
    lines += [f"{_fmt(method.get('name'))} fine-tune of `{_fmt((results.get('model') or {}).get('name'))}` on the "
              f"{_fmt((results.get('task') or {}).get('name'))} task, trained and measured by peftlab"
              + (f" ({summary})." if summary else "."), ""]
    lines += extra or []
    lines += ["## Result", ""]
    try:
        lines += [format_result_row(RunRecord.from_dict(results)), ""]
    except (KeyError, TypeError, ValueError):  # a partial record: the metrics below still stand
        pass
    before, after = (results.get("metrics") or {}).get("before") or {}, (results.get("metrics") or {}).get(
        "after") or {}
    lines += ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(v)} |" for k, v in after.items()]
    lines += ["", "## Hyperparameters", "", "| field | value |", "|---|---|"]
    keys = ("method", "r", "alpha", "dropout", "target_modules", "lr", "epochs", "max_steps", "batch_size",
            "grad_accum", "scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "block_size", "max_length",
            "seed", "dtype")
    for key in keys:
        if key in cfg:
            value = cfg[key]
            lines.append(f"| {key} | {','.join(map(str, value)) if isinstance(value, list) else _fmt(value)} |")
    if method.get("target_modules"):
        lines.append(f"| adapted modules | {', '.join(method['target_modules'])} |")
    if params:
        lines.append(f"| trainable parameters | {params.get('trainable_params'):,} of {params.get('total_params'):,}"
                     f" ({_fmt(params.get('trainable_percent'))}%) |")
    lines += ["", "## Data", "", "| role | source | split | used | fingerprint (sha256) |", "|---|---|---|---|---|"]
    data = results.get("data") or {}
    for role in ("train", "eval"):
        part = data.get(role) or {}
        if part:
            used = part.get("blocks_used", part.get("examples_used"))
            total = part.get("blocks_total", part.get("examples_total"))
            lines.append(f"| {role} | `{_fmt(part.get('source'))}` | {_fmt(part.get('split'))} | {_fmt(used)} of "
                         f"{_fmt(total)} | `{_fmt(part.get('fingerprint'))}` |")
    lines += [f"- {note}" for note in data.get("notes") or []]
    lines += ["", "## Reproduce", "", "```bash", reproduce_command(cfg), "```", ""]
    lines += ["## Time, memory and versions", "",
              f"- training: {_fmt(timing.get('train_time_s'))} s over {_fmt(timing.get('optimizer_steps'))} "
              f"optimizer steps ({_fmt(timing.get('tokens_per_s'))} tokens/s); load {_fmt(timing.get('load_time_s'))}"
              f" s, evaluation {_fmt(timing.get('eval_time_s'))} s",
              f"- memory: {_fmt(memory.get('headline_gb'))} GB ({_fmt(memory.get('headline_kind'))})",
              f"- device: {_fmt((results.get('model') or {}).get('device'))}, dtype "
              f"{_fmt((results.get('model') or {}).get('dtype'))}; finished {_fmt(results.get('finished'))}"]
    versions = results.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if results.get("git_commit"):
        lines.append(f"- peftlab commit: {results['git_commit']}")
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any], title: str | None = None, library: str = "peft",
           extra_tags: tuple[str, ...] = (), extra: list[str] | None = None) -> str:
    """The whole card: YAML front matter and body."""
    meta = front_matter(results, library, extra_tags)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    name = title or Path(str(results.get("run_dir") or "peftlab run")).name
    return f"---\n{head}---\n\n{body(results, name, extra)}"


def write_card(folder: str | Path, results: dict[str, Any], **kwargs: Any) -> Path:
    """Write ``folder/README.md`` (replacing peft's placeholder template)."""
    path = Path(folder) / "README.md"
    path.write_text(render(results, **kwargs), encoding="utf-8")
    return path


def results_for_adapter(adapter: str | Path) -> dict[str, Any] | None:
    """The results.json of the run an adapter folder belongs to (its parent run directory), if there is one."""
    path = Path(adapter).expanduser().resolve().parent / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
