"""Every registered task: its declarations match what it evaluates, its phase data is immutable, and the task
object keeps no state across phases. Plus the shared helpers in peftlab.tasks.common."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.tasks import TASKS, MetricSpec, get_task
from peftlab.tasks.common import eval_mode, require_columns, split_info


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_data(name: str, tmp_path: Path) -> dict:
    """A tiny dataset for each built-in task (a new task adds its own line here)."""
    if name == "clm":
        text = tmp_path / "text.txt"
        text.write_text("\n".join(f"Line {i} of a small text about rivers and stones." for i in range(60)),
                        encoding="utf-8")
        return dict(dataset=str(text), block_size=16, eval_subset=4)
    if name == "classification":
        rows = [{"text": f"item {i} {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(8)]
        path = write_jsonl(tmp_path / "cls.jsonl", rows)
        return dict(dataset=str(path), eval_dataset=str(path), max_length=16)
    if name == "instruction":
        rows = [{"instruction": f"Name item {i}.", "input": "", "output": f"Item {i}."} for i in range(4)]
        path = write_jsonl(tmp_path / "ins.jsonl", rows)
        return dict(dataset=str(path), eval_dataset=str(path), max_length=48, max_new_tokens=3, batch_size=2)
    raise AssertionError(f"add a tiny dataset for the new task {name!r} to task_data()")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_declarations_match_evaluate_and_phase_data_is_frozen(name: str, tmp_path: Path) -> None:
    from peftlab.models import load_model

    cls = get_task(name)
    # Declarations: a headline first, unique keys, extra table columns among the metrics, a stable order.
    assert cls.name == name and cls.model_kind in ("causal_lm", "seq_cls")
    assert cls.metrics and all(isinstance(m, MetricSpec) for m in cls.metrics)
    keys = [m.key for m in cls.metrics]
    assert len(set(keys)) == len(keys)
    assert set(cls.table_metrics) <= set(keys) and keys[0] not in cls.table_metrics
    assert cls.example_unit in ("blocks", "examples")
    assert sorted(t.order for t in TASKS.values()) == list(range(len(TASKS)))

    cfg = load_config(None, dict(task=name, model="tiny-llama", **task_data(name, tmp_path)))
    assert cls.seq_len(cfg) in (cfg.block_size, cfg.max_length)
    assert cls.tokens_per_example(cfg) >= 1
    task = cls(cfg)
    raw = task.load()
    loaded = load_model(cfg, model_kind=cls.model_kind, **task.model_kwargs(raw))
    data = task.prepare(raw, loaded.tokenizer, loaded.model)
    batch = task.train_batch(data, [0])
    assert float(task.loss(loaded.model, batch).detach()) > 0 and task.loss_count(batch) > 0
    result = task.evaluate(data, loaded.model, "eval")

    # What evaluate() returns is what the task declares: the headline first, every declared key present.
    assert task.metric == keys[0] and task.higher_is_better == cls.metrics[0].higher_is_better
    assert set(keys) <= set(result.metrics), f"{name}: declared {keys}, evaluate() gave {sorted(result.metrics)}"
    assert all(isinstance(result.metrics[k], float) for k in keys)
    assert result.stage == "eval"
    assert task.sample(data, loaded.model, result)
    info = task.info(data)
    assert f"{cls.example_unit}_used" in info["train"] and f"{cls.example_unit}_total" in info["eval"]

    # Immutable phase data, and nothing set on the task across the phases.
    for value in (raw, data, result):
        assert dataclasses.is_dataclass(value)
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, None)
    assert vars(task) == {"cfg": cfg}


def test_get_task_names_the_choices() -> None:
    assert get_task("clm") is TASKS["clm"]
    with pytest.raises(UserError) as exc:
        get_task("summarise")
    assert str(exc.value) == "unknown task 'summarise'; choose one of classification, clm, instruction"


def test_metric_spec_formats_and_arrows() -> None:
    clm = get_task("clm")
    assert clm.metrics[0].format(53.4912) == "53.49" and clm.metrics[0].arrow == "↓"
    cls = get_task("classification")
    assert [m.label for m in cls.metrics] == ["Accuracy", "F1 (macro)"]
    assert cls.metric_spec("accuracy").format(0.8125) == "0.8125" and cls.metrics[0].format(None) == "-"
    instruction = get_task("instruction")
    assert [m.key for m in instruction.metrics] == ["rougeL", "bleu", "exact_match", "perplexity"]
    assert [m.key for m in instruction.metrics if m.generated] == ["rougeL", "bleu", "exact_match"]


def test_require_columns_and_row_names() -> None:
    from peftlab.data.sources import DataSplit

    split = DataSplit([{"sentence": "a", "label": 0}], "file:/x/train.csv", "train", "f", first_line=2)
    require_columns(split, {"label": "Set --label-column"})
    with pytest.raises(UserError, match=r"train\.csv: no column 'text'; the columns are sentence, label\. "
                                        r"Set --text-column"):
        require_columns(split, {"text": "Set --text-column"})
    assert split.row_name(1) == "row 2 (line 3)"
    assert split_info(split, "blocks", 3, 5) == {"source": "file:/x/train.csv", "split": "train",
                                                 "fingerprint": "f", "blocks_used": 3, "blocks_total": 5}


def test_eval_mode_restores_training_mode_also_on_errors() -> None:
    model = torch.nn.Linear(2, 2)
    model.train()
    with eval_mode(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training
