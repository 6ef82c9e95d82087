"""Sequence classification: a text (or text pair) and a label; metrics accuracy and macro-F1.

The label set is built from the whole training split (before ``train_subset``), sorted (integers numerically,
strings alphabetically), and recorded in results.json; a label that only the evaluation split has is an error.
The model is ``AutoModelForSequenceClassification`` (an encoder such as MiniLM, or a decoder such as Llama with a
pad token). Its newly initialised head is trained and saved with the adapter (peft ``modules_to_save``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.sources import DataSplit
from peftlab.errors import UserError
from peftlab.tasks import register
from peftlab.tasks.base import Evaluation, ExampleValues, MetricSpec, RawData, Statistic, Task, task_fields
from peftlab.tasks.common import (
    check_positions,
    eval_batch_size,
    eval_mode,
    model_device,
    read_splits,
    require_columns,
    split_info,
)

LabelKey = int | str


def label_key(value: Any, split: DataSplit, index: int, column: str) -> LabelKey:
    """A label as a sortable key: integers (also '3' and 3.0) as int, other text stripped."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{split.source}: {split.row_name(index)} has no label in column {column!r}; fill it or "
                        "remove the row")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{split.source}: {split.row_name(index)} has label {value!r} in column {column!r}; "
                            "classification needs discrete labels (integers or names)")
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def sorted_labels(keys: set[LabelKey]) -> list[LabelKey]:
    """Integers first in numeric order, then names in alphabetical order."""
    return sorted(keys, key=lambda k: (1, 0, k) if isinstance(k, str) else (0, k, ""))


def text_of(record: dict[str, Any], column: str, split: DataSplit, index: int) -> str:
    """The non-empty text of a record's column."""
    value = record.get(column)
    if value is None or not str(value).strip():
        raise UserError(f"{split.source}: {split.row_name(index)} has an empty text in column {column!r}; fill it "
                        "or remove the row")
    return str(value)


#: Heads that peft's sequence-classification model already saves with the adapter (``classifier``, ``score``).
PEFT_DEFAULT_HEADS = ("classifier", "score")

Row = tuple[str, str | None, int]  # (text, text pair, label id)


def extra_saved_modules(model: nn.Module) -> list[str]:
    """Modules saved with the adapter beyond peft's usual heads: newly initialised ones such as a pooler."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return []  # full fine-tuning trains and saves every weight
    saved = next(iter(peft_config.values())).modules_to_save or []
    return [m for m in dict.fromkeys(saved) if m not in PEFT_DEFAULT_HEADS]


@dataclass(frozen=True)
class ClassificationRaw(RawData):
    """Checked classification records: the label set (from the whole training split) and the rows."""

    label_names: tuple[str, ...]
    label_counts_train: tuple[tuple[str, int], ...]  # label -> count, in order of first appearance
    train_rows: tuple[Row, ...]
    eval_rows: tuple[Row, ...]


@dataclass(frozen=True)
class ClassificationData:
    """Prepared classification data: token ids (and token type ids) per row, on the model's device."""

    raw: ClassificationRaw
    device: torch.device
    pad_id: int
    train_enc: tuple[dict[str, list[int]], ...]
    eval_enc: tuple[dict[str, list[int]], ...]
    truncated: tuple[tuple[str, int], ...]  # role -> rows cut to max_length
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Prediction:
    """One evaluated row: the predicted label id and its probability."""

    label: int
    probability: float


@register
class ClassificationTask(Task):
    """Text (or text-pair) classification with accuracy and macro-F1 (scikit-learn)."""

    name = "classification"
    model_kind = "seq_cls"
    order = 1
    fields = task_fields("ClassificationFields", "text_column", "text_pair_column", "label_column", "max_length")
    metrics = (MetricSpec("accuracy", "Accuracy", higher_is_better=True,
                          statistic=Statistic("mean", "examples", ("correct",))),
               MetricSpec("macro_f1", "F1 (macro)", higher_is_better=True,
                          statistic=Statistic("macro_f1", "examples", ("label", "prediction"))))
    table_metrics = ("macro_f1",)
    example_unit = "examples"
    eval_fields = ("text_column", "text_pair_column", "label_column", "max_length", "eval_subset")
    eval_pads = True

    # --- raw data -------------------------------------------------------------------------------------------
    def load(self) -> ClassificationRaw:
        cfg = self.cfg
        splits, notes = read_splits(cfg)
        needed = {cfg.text_column: "Set --text-column", cfg.label_column: "Set --label-column"}
        if cfg.text_pair_column:
            needed[cfg.text_pair_column] = "Set --text-pair-column"
        for split in (splits.train, splits.eval):
            require_columns(split, needed)
        train_keys = self._labels(splits.train)
        label_keys = sorted_labels(set(train_keys))
        label_names = tuple(str(k) for k in label_keys)
        if len(label_keys) < 2:
            raise UserError(f"{splits.train.source}: column {cfg.label_column!r} has a single label "
                            f"({label_names[0]!r}); classification needs at least two")
        eval_keys = self._labels(splits.eval)
        known = set(label_keys)
        unseen = [k for k in dict.fromkeys(eval_keys) if k not in known]
        if unseen:
            first = eval_keys.index(unseen[0])
            raise UserError(f"{splits.eval.source}: label {unseen[0]!r} ({splits.eval.row_name(first)}"
                            f"{f' and {len(unseen) - 1} more' if len(unseen) > 1 else ''}) is not in the "
                            f"training split {splits.train.source}, whose labels are "
                            f"{', '.join(label_names)}; remove those rows or add training examples")
        index = {k: i for i, k in enumerate(label_keys)}
        return ClassificationRaw(
            splits, notes, label_names, tuple(Counter(str(k) for k in train_keys).items()),
            self._rows(splits.train, [index[k] for k in train_keys], cfg.train_subset),
            self._rows(splits.eval, [index[k] for k in eval_keys], cfg.eval_subset))

    def _labels(self, split: DataSplit) -> list[LabelKey]:
        column = self.cfg.label_column
        return [label_key(r.get(column), split, i, column) for i, r in enumerate(split.records)]

    def _rows(self, split: DataSplit, label_ids: list[int], subset: int | None) -> tuple[Row, ...]:
        """(text, text pair, label id) per record, checking that no text is empty."""
        cfg = self.cfg
        rows = []
        for i, (record, label) in enumerate(zip(split.records, label_ids, strict=True)):
            text = text_of(record, cfg.text_column, split, i)
            pair = text_of(record, cfg.text_pair_column, split, i) if cfg.text_pair_column else None
            rows.append((text, pair, label))
        return tuple(rows[:subset] if subset else rows)

    def model_kwargs(self, raw: ClassificationRaw) -> dict[str, Any]:
        return {"num_labels": len(raw.label_names), "label_names": list(raw.label_names)}

    # --- tokenized data -------------------------------------------------------------------------------------
    def prepare(self, raw: ClassificationRaw, tokenizer, model: nn.Module) -> ClassificationData:
        cfg = self.cfg
        check_positions(model, cfg.max_length, f"max_length {cfg.max_length}", "use --max-length {limit} or less")
        notes = list(raw.notes)
        added = extra_saved_modules(model)
        if added:
            notes.append(f"newly initialised modules trained and saved with the adapter: {', '.join(added)}")
        pad = getattr(model.config, "pad_token_id", None)
        pad_id = int(pad if pad is not None else tokenizer.pad_token_id)
        train_enc, train_cut = self._encode(tokenizer, raw.train_rows)
        eval_enc, eval_cut = self._encode(tokenizer, raw.eval_rows)
        return ClassificationData(raw, model_device(model), pad_id, train_enc, eval_enc,
                                  (("train", train_cut), ("eval", eval_cut)), tuple(notes))

    def _encode(self, tokenizer, rows: tuple[Row, ...]) -> tuple[tuple[dict[str, list[int]], ...], int]:
        """Token ids (and token type ids) per row, and how many rows over max_length were truncated."""
        texts = [r[0] for r in rows]
        pairs = [r[1] for r in rows] if self.cfg.text_pair_column else None
        enc = tokenizer(texts, pairs)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        out = [{k: enc[k][i] for k in keys} for i in range(len(rows))]
        long = [i for i, e in enumerate(out) if len(e["input_ids"]) > self.cfg.max_length]
        if long:
            cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                            truncation=True, max_length=self.cfg.max_length)
            for j, i in enumerate(long):
                out[i] = {k: cut[k][j] for k in keys}
        return tuple(out), len(long)

    def num_train_examples(self, data: ClassificationData) -> int:
        return len(data.train_enc)

    @staticmethod
    def _batch(data: ClassificationData, enc, rows: tuple[Row, ...], indices) -> dict[str, torch.Tensor]:
        """Right-padded to the longest example of the batch."""
        items = [enc[i] for i in indices]
        width = max(len(e["input_ids"]) for e in items)
        batch = {"input_ids": torch.full((len(items), width), data.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(items), width), dtype=torch.long)}
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = torch.zeros((len(items), width), dtype=torch.long)
        for row, e in enumerate(items):
            n = len(e["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][row, :n] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][row, :n] = torch.tensor(e["token_type_ids"])
        batch["labels"] = torch.tensor([rows[i][2] for i in indices], dtype=torch.long)
        return {k: v.to(data.device) for k, v in batch.items()}

    def train_batch(self, data: ClassificationData, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._batch(data, data.train_enc, data.raw.train_rows, indices)

    # --- loss -----------------------------------------------------------------------------------------------
    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    @staticmethod
    def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the batch's examples."""
        return F.cross_entropy(self.logits(model, batch), batch["labels"], reduction="sum")

    # --- evaluation -----------------------------------------------------------------------------------------
    def predict(self, data: ClassificationData, model: nn.Module) -> tuple[list[int], list[float], float]:
        """Predicted label ids, their probabilities, and the summed eval loss (batches by length, order kept)."""
        size = eval_batch_size(self.cfg)
        enc, rows = data.eval_enc, data.raw.eval_rows
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
        preds, probs = [0] * len(order), [0.0] * len(order)
        nll = 0.0
        with eval_mode(model):
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                batch = self._batch(data, enc, rows, chunk)
                logits = self.logits(model, batch)
                nll += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                top, arg = logits.softmax(-1).max(-1)
                for j, i in enumerate(chunk):
                    preds[i], probs[i] = int(arg[j]), float(top[j])
        return preds, probs, nll

    def evaluate(self, data: ClassificationData, model: nn.Module, stage: str) -> Evaluation:
        from peftlab.metrics import classification_metrics

        preds, probs, nll = self.predict(data, model)
        truth = [r[2] for r in data.raw.eval_rows]
        metrics = classification_metrics(truth, preds, len(data.raw.label_names))
        mean = nll / len(truth)
        examples = ExampleValues({"examples": {"label": tuple(truth), "prediction": tuple(preds),
                                               "correct": tuple(float(p == t) for p, t in zip(preds, truth,
                                                                                               strict=True))}},
                                 classes=len(data.raw.label_names))
        return Evaluation(stage, {**metrics, "eval_loss": mean, "eval_examples": len(truth)},
                          tuple(Prediction(p, q) for p, q in zip(preds, probs, strict=True)), examples)

    def sample(self, data: ClassificationData, model: nn.Module, result: Evaluation) -> dict[str, Any]:
        if not data.raw.eval_rows:
            return {}
        names = data.raw.label_names
        text, pair, label = data.raw.eval_rows[0]
        out = {"text": text, "label": names[label], "prediction": names[result.outputs[0].label]}
        if pair is not None:
            out["text_pair"] = pair
        return out

    def write_artifacts(self, data: ClassificationData, run_dir, result: Evaluation,
                        before: Evaluation | None = None) -> None:
        """predictions.jsonl, and classification_report.json/.txt (per-class report and confusion matrix)."""
        from peftlab.metrics import classification_report_dict, confusion

        run_dir = Path(run_dir)
        names, rows = list(data.raw.label_names), data.raw.eval_rows
        truth = [r[2] for r in rows]
        with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for i, ((text, pair, label), p) in enumerate(zip(rows, result.outputs, strict=True)):
                row = {"index": i, "text": text, **({"text_pair": pair} if pair is not None else {}),
                       "label": names[label], "prediction": names[p.label],
                       "probability": round(p.probability, 6), "correct": p.label == label}
                if before is not None:
                    row["base_prediction"] = names[before.outputs[i].label]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        pred_ids = [p.label for p in result.outputs]
        report = classification_report_dict(truth, pred_ids, names)
        matrix = confusion(truth, pred_ids, len(names))
        (run_dir / "classification_report.json").write_text(json.dumps(
            {"stage": result.stage, "labels": names, "report": report,
             "confusion_matrix": {"rows": "true label", "columns": "predicted label", "matrix": matrix}},
            indent=2) + "\n", encoding="utf-8")
        (run_dir / "classification_report.txt").write_text(format_report(report, matrix, names), encoding="utf-8")

    def eval_identity(self, data: ClassificationData) -> dict[str, Any]:
        return {**super().eval_identity(data), "labels": list(data.raw.label_names)}

    def outputs_to_json(self, outputs: tuple[Prediction, ...]) -> list[Any]:
        return [[p.label, p.probability] for p in outputs]

    def outputs_from_json(self, values: list[Any]) -> tuple[Prediction, ...]:
        return tuple(Prediction(int(label), float(prob)) for label, prob in values)

    def info(self, data: ClassificationData) -> dict[str, Any]:
        raw, cfg = data.raw, self.cfg
        return {
            "train": split_info(raw.splits.train, "examples", len(raw.train_rows), len(raw.splits.train.records)),
            "eval": split_info(raw.splits.eval, "examples", len(raw.eval_rows), len(raw.splits.eval.records)),
            "labels": list(raw.label_names),
            "label_counts_train": dict(raw.label_counts_train),
            "columns": {"text": cfg.text_column, "text_pair": cfg.text_pair_column, "label": cfg.label_column},
            "max_length": cfg.max_length,
            "truncated_examples": dict(data.truncated),
            "notes": list(data.notes),
        }


def format_report(report: dict[str, Any], matrix: list[list[int]], names: list[str]) -> str:
    """A plain-text per-class table and confusion matrix."""
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name in names:
        r = report[name]
        lines.append(f"{name:<{width}}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1-score']:>10.4f}"
                     f"{int(r['support']):>10d}")
    for key in ("macro avg", "weighted avg"):
        r = report[key]
        lines.append(f"{key:<{width}}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1-score']:>10.4f}"
                     f"{int(r['support']):>10d}")
    if "accuracy" in report:
        lines.append(f"{'accuracy':<{width}}{report['accuracy']:>40.4f}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted label)",
              " " * width + "".join(f"{n:>{max(8, len(n) + 2)}}" for n in names)]
    for name, row in zip(names, matrix, strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{max(8, len(n) + 2)}d}" for v, n in zip(row, names,
                                                                                                strict=True)))
    return "\n".join(lines) + "\n"
