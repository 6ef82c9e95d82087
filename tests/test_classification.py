"""Classification task: label mapping, bad input, and a tiny end-to-end run whose adapter reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftlab.cli import main
from peftlab.configure import load_config
from peftlab.tasks.classification import ClassificationRaw, ClassificationTask, sorted_labels


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_for(tmp_path: Path, train: Path, evaluation: Path, **extra) -> tuple[ClassificationTask, ClassificationRaw]:
    cfg = load_config(None, dict(task="classification", model="tiny-llama", dataset=str(train),
                                 eval_dataset=str(evaluation), output_dir=str(tmp_path / "run"), **extra))
    task = ClassificationTask(cfg)
    return task, task.load()


def prepared(task: ClassificationTask, raw: ClassificationRaw):
    """The task's prepared data for tiny-llama's classification model."""
    from peftlab.models import load_model

    loaded = load_model(task.cfg, model_kind="seq_cls", **task.model_kwargs(raw))
    return task.prepare(raw, loaded.tokenizer, loaded.model)


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2, and return its single stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("peftlab: error: ")
    return err


def cls_argv(tmp_path: Path, train: Path, evaluation: Path, *extra: str) -> list[str]:
    return ["train", "--task", "classification", "--model", "tiny-llama", "--dataset", str(train),
            "--eval-dataset", str(evaluation), "--output-dir", str(tmp_path / "run"), *extra]


# --- label mapping ---------------------------------------------------------------------------------------------

def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": v} for i, v in
                                                  enumerate([10, 2, 0, 2, 1])])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "e", "label": 10}, {"text": "f", "label": 0}])
    task, raw = task_for(tmp_path, train, evaluation)
    assert list(raw.label_names) == ["0", "1", "2", "10"]
    assert [row[2] for row in raw.train_rows] == [3, 2, 0, 2, 1]
    assert [row[2] for row in raw.eval_rows] == [3, 0]
    assert task.model_kwargs(raw) == {"num_labels": 4, "label_names": ["0", "1", "2", "10"]}
    data = prepared(task, raw)
    assert task.info(data)["labels"] == ["0", "1", "2", "10"]
    assert task.info(data)["label_counts_train"] == {"10": 1, "2": 2, "0": 1, "1": 1}


def test_string_labels_sort_alphabetically_and_digit_strings_match_integers(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                                  {"text": "c", "label": " neutral "}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "d", "label": "neutral"}])
    task, raw = task_for(tmp_path, train, evaluation)
    assert list(raw.label_names) == ["neg", "neutral", "pos"]
    assert [row[2] for row in raw.train_rows] == [2, 0, 1]
    # A TSV gives the strings "0"/"1"; a jsonl eval file with integers 0/1 maps onto the same ids.
    tsv = tmp_path / "train.tsv"
    tsv.write_text("label\tsentence\n1\tgood\n0\tbad\n", encoding="utf-8")
    evaluation = write_jsonl(tmp_path / "eval2.jsonl", [{"sentence": "fine", "label": 1}])
    task, raw = task_for(tmp_path, tsv, evaluation, text_column="sentence")
    assert list(raw.label_names) == ["0", "1"]
    assert [row[2] for row in raw.train_rows] == [1, 0]
    assert [row[2] for row in raw.eval_rows] == [1]


def test_sorted_labels_mixed_and_negative() -> None:
    assert sorted_labels({3, -1, -20, "b", "a"}) == [-20, -1, 3, "a", "b"]


# --- bad input -------------------------------------------------------------------------------------------------

def test_missing_text_column_lists_columns(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}])
    err = error_line(capsys, cls_argv(tmp_path, train, train))
    assert "train.jsonl" in err and "no column 'text'" in err and "sentence, label" in err
    assert "--text-column" in err


def test_missing_label_column_lists_columns(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "y": 0}, {"text": "b", "y": 1}])
    err = error_line(capsys, cls_argv(tmp_path, train, train))
    assert "no column 'label'" in err and "text, y" in err and "--label-column" in err


def test_label_only_in_eval_split_is_named(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "pos"},
                                                       {"text": "d", "label": "neutral"}])
    err = error_line(capsys, cls_argv(tmp_path, train, evaluation))
    assert "eval.jsonl" in err and "'neutral'" in err and "row 2" in err and "neg, pos" in err


def test_empty_text_names_row_and_column(tmp_path: Path, capsys) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\ngood,1\n   ,0\n", encoding="utf-8")
    err = error_line(capsys, cls_argv(tmp_path, csv, csv))
    # The second data row of a csv file is its third line.
    assert "train.csv" in err and "row 2 (line 3)" in err and "empty text in column 'text'" in err


def test_missing_label_value_names_row(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    err = error_line(capsys, cls_argv(tmp_path, train, train))
    assert "row 2" in err and "no label in column 'label'" in err


def test_fractional_label_is_refused(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": 1}])
    err = error_line(capsys, cls_argv(tmp_path, train, train))
    assert "row 1" in err and "discrete labels" in err


def test_invalid_json_line_gives_line_number(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n', encoding="utf-8")
    err = error_line(capsys, cls_argv(tmp_path, bad, bad))
    assert "train.jsonl" in err and "line 2 is not valid JSON" in err


def test_not_utf8_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "train.csv"
    bad.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    err = error_line(capsys, cls_argv(tmp_path, bad, bad))
    assert "train.csv" in err and "not valid UTF-8" in err


def test_empty_file(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "train.csv"
    empty.write_text("", encoding="utf-8")
    err = error_line(capsys, cls_argv(tmp_path, empty, empty))
    assert "train.csv" in err and "empty" in err


def test_single_label_is_refused(tmp_path: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    err = error_line(capsys, cls_argv(tmp_path, train, train))
    assert "single label" in err


# --- end to end ------------------------------------------------------------------------------------------------

def sentiment_rows(n: int, offset: int = 0) -> list[dict]:
    """A learnable toy task: the label is which of two words the text holds."""
    words = ["apple", "river", "stone", "cloud", "green", "quick"]
    rows = []
    for i in range(offset, offset + n):
        label = i % 2
        rows.append({"text": f"{words[i % 6]} {'good great' if label else 'bad awful'} {words[(i * 5) % 6]}",
                     "label": ["negative", "positive"][label]})
    return rows


def test_train_and_reload_gives_identical_predictions(tmp_path: Path, capsys) -> None:
    from peftlab.evaluate import attach_adapter, eval_config
    from peftlab.models import load_model

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(16, offset=100))
    run = tmp_path / "run"
    assert main(cls_argv(tmp_path, train, evaluation, "--batch-size", "8", "--grad-accum", "1", "--lr", "3e-2",
                         "--epochs", "3", "--set", "max_length=16", "--set", "dropout=0")) == 0
    results = json.loads((run / "results.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss falls
    assert results["task"]["metric"] == "accuracy"
    assert results["data"]["labels"] == ["negative", "positive"]
    assert results["metrics"]["after"]["accuracy"] == 1.0

    # The head is saved with the adapter.
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"]
    # Artifacts: predictions and the per-class report with a confusion matrix over the 16 eval rows.
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and {"text", "label", "prediction", "probability", "base_prediction"} <= set(preds[0])
    report = json.loads((run / "classification_report.json").read_text())
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == 16
    assert (run / "classification_report.txt").read_text().startswith("label")

    # Reload base + adapter: identical predictions and probabilities.
    cfg = eval_config(str(run / "adapter"), {})
    task = ClassificationTask(cfg)
    raw = task.load()
    loaded = load_model(cfg, model_kind="seq_cls", **task.model_kwargs(raw))
    model = attach_adapter(loaded.model, run / "adapter")
    data = task.prepare(raw, loaded.tokenizer, model)
    ids, probs, _ = task.predict(data, model)
    assert [raw.label_names[i] for i in ids] == [p["prediction"] for p in preds]
    assert probs == pytest.approx([p["probability"] for p in preds], abs=1e-6)

    # `peftlab eval --adapter` reproduces the recorded metrics.
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == results["metrics"]["after"]


def test_new_modules_missing_from_checkpoint_are_trained_and_saved(tmp_path: Path) -> None:
    """A newly initialised module that peft does not know as a head (here the final norm, marked as missing)
    becomes trainable, is saved, and is restored on reload."""
    from peftlab.evaluate import attach_adapter
    from peftlab.methods import get_method
    from peftlab.models import load_model
    from peftlab.tasks.classification import extra_saved_modules

    cfg = load_config(None, dict(task="classification", model="tiny-llama"))
    loaded = load_model(cfg, model_kind="seq_cls", num_labels=2, label_names=["a", "b"])
    assert loaded.new_modules == ["score"]
    assert not hasattr(loaded.model, "peftlab_new_parameters")  # nothing is patched onto the model
    model = get_method("lora").apply(loaded.model, cfg, "seq_cls", ["model.norm", "score"])
    assert extra_saved_modules(model) == ["model.norm"]
    assert "score" in model.peft_config["default"].modules_to_save  # peft's own head stays saved
    assert model.peft_config["default"].modules_to_save.count("model.norm") == 1  # added once
    norm = [p for n, p in model.named_parameters() if "model.norm.modules_to_save" in n]
    assert norm and all(p.requires_grad for p in norm)
    with torch.no_grad():
        norm[0].mul_(3.0)
    model.save_pretrained(tmp_path / "adapter")
    batch = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    expected = model(input_ids=batch).logits
    fresh = load_model(cfg, model_kind="seq_cls", num_labels=2, label_names=["a", "b"]).model
    reloaded = attach_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(reloaded(input_ids=batch).logits, expected)


@pytest.mark.slow
def test_minilm_head_is_the_only_new_weight_and_reload_is_exact(tmp_path: Path, capsys, data_dir) -> None:
    """MiniLM's pooler comes from the checkpoint (only the classifier is new), and a LoRA run reloads exactly."""
    run = tmp_path / "run"
    argv = ["train", "--task", "classification", "--model", "minilm-l6", "--dataset", "sst2", "--text-column",
            "sentence", "--train-subset", "32", "--eval-subset", "16", "--batch-size", "8", "--grad-accum", "1",
            "--max-length", "32", "--output-dir", str(run)]
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["model"]["architecture"] == "BertForSequenceClassification"
    assert results["method"]["target_modules"] == ["query", "value"]
    assert not any("newly initialised" in note for note in results["data"]["notes"])
    from peftlab.models import load_model

    cfg = load_config(None, dict(task="classification", model="minilm-l6"))
    assert load_model(cfg, "seq_cls", num_labels=2, label_names=["0", "1"]).new_modules == ["classifier"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out) == results["metrics"]["after"]
