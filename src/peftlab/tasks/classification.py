"""Sequence classification: a text (or text pair) and a label; metrics accuracy and macro-F1.

The label set is built from the whole training split (before ``train_subset``), sorted (integers numerically,
strings alphabetically), and recorded in results.json; a label that only the evaluation split has is an error.
The model is ``AutoModelForSequenceClassification`` (an encoder such as MiniLM, or a decoder such as Llama with a
pad token). Its newly initialised head is trained and saved with the adapter (peft ``modules_to_save``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.sources import DataSplit, SplitPlan
from peftlab.errors import UserError
from peftlab.tasks import Task, register

LabelKey = int | str


def row_name(split: DataSplit, index: int) -> str:
    """'row N' of a split (1-based), plus its line number for csv/tsv files read whole."""
    where = f"row {index + 1}"
    if split.source.endswith((".csv", ".tsv")):
        where += f" (line {index + 2})"
    return where


def require_columns(split: DataSplit, columns: dict[str, str]) -> None:
    """Fail with the existing columns when a needed column (name -> CLI flag) is missing."""
    have = list(split.records[0].keys()) if split.records else []
    for column, flag in columns.items():
        if column not in have:
            raise UserError(f"{split.source}: no column {column!r}; the columns are {', '.join(map(str, have))}. "
                            f"Set {flag}")


def label_key(value: Any, split: DataSplit, index: int, column: str) -> LabelKey:
    """A label as a sortable key: integers (also '3' and 3.0) as int, other text stripped."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{split.source}: {row_name(split, index)} has no label in column {column!r}; fill it or "
                        "remove the row")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{split.source}: {row_name(split, index)} has label {value!r} in column {column!r}; "
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
        raise UserError(f"{split.source}: {row_name(split, index)} has an empty text in column {column!r}; fill it "
                        "or remove the row")
    return str(value)


def save_new_modules(model: nn.Module) -> list[str]:
    """Make newly initialised base-model modules trainable and saved with the adapter; return those added.

    peft already adds modules named ``classifier`` and ``score`` (the usual heads) to ``modules_to_save`` for
    sequence classification. Any other module whose weights were missing from the checkpoint (a pooler, a
    ``classification_head``) would otherwise stay random, untrained, and be re-randomised on reload.
    """
    if not hasattr(model, "peft_config"):
        return []  # full fine-tuning trains and saves every weight
    from peft.utils.other import AuxiliaryTrainingWrapper, _set_trainable

    base = model.get_base_model()
    new_params = getattr(base, "peftlab_new_parameters", None) or []
    wrapped = [name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, AuxiliaryTrainingWrapper)]
    missing: list[str] = []
    for param in new_params:
        path = param.rsplit(".", 1)[0] if "." in param else param
        if not any(path == w or path.startswith(w + ".") for w in wrapped) and path not in missing:
            missing.append(path)
    if not missing:
        return []
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    if not hasattr(config, "modules_to_save"):
        raise UserError(f"method {type(config).__name__}: the model's new modules {', '.join(missing)} cannot be "
                        "trained with this adapter; use --method lora or full")
    config.modules_to_save = [*(config.modules_to_save or []), *missing]
    _set_trainable(model, adapter, module_names=missing, inference_mode=False)
    return missing


@register
class ClassificationTask(Task):
    """Text (or text-pair) classification with accuracy and macro-F1 (scikit-learn)."""

    name = "classification"
    model_kind = "seq_cls"
    metric = "accuracy"
    higher_is_better = True

    # --- raw data -------------------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        self.plan: SplitPlan = self.load_plan()
        needed = {cfg.text_column: "--text-column", cfg.label_column: "--label-column"}
        if cfg.text_pair_column:
            needed[cfg.text_pair_column] = "--text-pair-column"
        for split in (self.plan.train, self.plan.eval):
            require_columns(split, needed)
        train_keys = self._labels(self.plan.train)
        self.label_keys = sorted_labels(set(train_keys))
        self.label_names = [str(k) for k in self.label_keys]
        if len(self.label_keys) < 2:
            raise UserError(f"{self.plan.train.source}: column {cfg.label_column!r} has a single label "
                            f"({self.label_names[0]!r}); classification needs at least two")
        self.train_label_counts = Counter(str(k) for k in train_keys)
        eval_keys = self._labels(self.plan.eval)
        known = set(self.label_keys)
        unseen = [k for k in dict.fromkeys(eval_keys) if k not in known]
        if unseen:
            first = eval_keys.index(unseen[0])
            raise UserError(f"{self.plan.eval.source}: label {unseen[0]!r} ({row_name(self.plan.eval, first)}"
                            f"{f' and {len(unseen) - 1} more' if len(unseen) > 1 else ''}) is not in the "
                            f"training split {self.plan.train.source}, whose labels are "
                            f"{', '.join(self.label_names)}; remove those rows or add training examples")
        index = {k: i for i, k in enumerate(self.label_keys)}
        self.train_rows = self._rows(self.plan.train, [index[k] for k in train_keys], cfg.train_subset)
        self.eval_rows = self._rows(self.plan.eval, [index[k] for k in eval_keys], cfg.eval_subset)

    def _labels(self, split: DataSplit) -> list[LabelKey]:
        column = self.cfg.label_column
        return [label_key(r.get(column), split, i, column) for i, r in enumerate(split.records)]

    def _rows(self, split: DataSplit, label_ids: list[int], subset: int | None) -> list[tuple[str, str | None, int]]:
        """(text, text pair, label id) per record, checking that no text is empty."""
        cfg = self.cfg
        rows = []
        for i, (record, label) in enumerate(zip(split.records, label_ids, strict=True)):
            text = text_of(record, cfg.text_column, split, i)
            pair = text_of(record, cfg.text_pair_column, split, i) if cfg.text_pair_column else None
            rows.append((text, pair, label))
        return rows[:subset] if subset else rows

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.label_names), "label_names": self.label_names}

    # --- tokenized data -------------------------------------------------------------------------------------
    def build(self, tokenizer, model: nn.Module) -> None:
        from peftlab.models import max_positions

        limit = max_positions(model)
        if limit is not None and self.cfg.max_length > limit:
            raise UserError(f"max_length {self.cfg.max_length} exceeds the model's maximum positions ({limit}); "
                            f"use --max-length {limit} or less")
        added = save_new_modules(model)
        if added:
            self.notes.append(f"newly initialised modules trained and saved with the adapter: {', '.join(added)}")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else tokenizer.pad_token_id)
        self.truncated: dict[str, int] = {}
        self.train_enc = self._encode(self.train_rows, "train")
        self.eval_enc = self._encode(self.eval_rows, "eval")
        self.predictions: dict[str, list[dict[str, Any]]] = {}

    def _encode(self, rows: list[tuple[str, str | None, int]], role: str) -> list[dict[str, list[int]]]:
        """Token ids (and token type ids) per row; rows over max_length are truncated and counted."""
        texts = [r[0] for r in rows]
        pairs = [r[1] for r in rows] if self.cfg.text_pair_column else None
        enc = self.tokenizer(texts, pairs)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        out = [{k: enc[k][i] for k in keys} for i in range(len(rows))]
        long = [i for i, e in enumerate(out) if len(e["input_ids"]) > self.cfg.max_length]
        self.truncated[role] = len(long)
        if long:
            cut = self.tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                                 truncation=True, max_length=self.cfg.max_length)
            for j, i in enumerate(long):
                out[i] = {k: cut[k][j] for k in keys}
        return out

    def num_train_examples(self) -> int:
        return len(self.train_enc)

    def _batch(self, enc: list[dict[str, list[int]]], rows, indices) -> dict[str, torch.Tensor]:
        """Right-padded to the longest example of the batch."""
        items = [enc[i] for i in indices]
        width = max(len(e["input_ids"]) for e in items)
        batch = {"input_ids": torch.full((len(items), width), self.pad_id, dtype=torch.long),
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
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._batch(self.train_enc, self.train_rows, indices)

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
    @torch.no_grad()
    def predict(self, model: nn.Module) -> tuple[list[int], list[float], float]:
        """Predicted label ids, their probabilities, and the summed eval loss (batches by length, order kept)."""
        was_training = model.training
        model.eval()
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        order = sorted(range(len(self.eval_enc)), key=lambda i: len(self.eval_enc[i]["input_ids"]))
        preds, probs = [0] * len(order), [0.0] * len(order)
        nll = 0.0
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            batch = self._batch(self.eval_enc, self.eval_rows, chunk)
            logits = self.logits(model, batch)
            nll += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            p = logits.softmax(-1)
            top, arg = p.max(-1)
            for j, i in enumerate(chunk):
                preds[i], probs[i] = int(arg[j]), float(top[j])
        model.train(was_training)
        return preds, probs, nll

    def evaluate(self, model: nn.Module, stage: str) -> dict[str, float]:
        from peftlab.metrics import classification_metrics

        preds, probs, nll = self.predict(model)
        truth = [r[2] for r in self.eval_rows]
        self.predictions[stage] = [{"prediction": p, "probability": q} for p, q in zip(preds, probs, strict=True)]
        metrics = classification_metrics(truth, preds, len(self.label_names))
        mean = nll / len(truth)
        return {**metrics, "eval_loss": mean, "eval_examples": len(truth)}

    def _latest(self) -> tuple[str, list[dict[str, Any]]] | None:
        for stage in ("after", "eval", "before"):
            if stage in getattr(self, "predictions", {}):
                return stage, self.predictions[stage]
        return None

    def sample(self, model: nn.Module) -> dict[str, Any]:
        latest = self._latest()
        if latest is None or not self.eval_rows:
            return {}
        text, pair, label = self.eval_rows[0]
        out = {"text": text, "label": self.label_names[label],
               "prediction": self.label_names[latest[1][0]["prediction"]]}
        if pair is not None:
            out["text_pair"] = pair
        return out

    def write_artifacts(self, run_dir, model: nn.Module) -> None:
        """predictions.jsonl, and classification_report.json/.txt (per-class report and confusion matrix)."""
        from peftlab.metrics import classification_report_dict, confusion

        latest = self._latest()
        if latest is None:
            return
        run_dir = Path(run_dir)
        stage, preds = latest
        before = self.predictions.get("before") if stage != "before" else None
        truth = [r[2] for r in self.eval_rows]
        with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for i, ((text, pair, label), p) in enumerate(zip(self.eval_rows, preds, strict=True)):
                row = {"index": i, "text": text, **({"text_pair": pair} if pair is not None else {}),
                       "label": self.label_names[label], "prediction": self.label_names[p["prediction"]],
                       "probability": round(p["probability"], 6), "correct": p["prediction"] == label}
                if before is not None:
                    row["base_prediction"] = self.label_names[before[i]["prediction"]]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        pred_ids = [p["prediction"] for p in preds]
        report = classification_report_dict(truth, pred_ids, self.label_names)
        matrix = confusion(truth, pred_ids, len(self.label_names))
        (run_dir / "classification_report.json").write_text(json.dumps(
            {"stage": stage, "labels": self.label_names, "report": report,
             "confusion_matrix": {"rows": "true label", "columns": "predicted label", "matrix": matrix}},
            indent=2) + "\n", encoding="utf-8")
        (run_dir / "classification_report.txt").write_text(
            format_report(report, matrix, self.label_names), encoding="utf-8")

    def info(self) -> dict[str, Any]:
        return {
            "train": {"source": self.plan.train.source, "split": self.plan.train.split,
                      "fingerprint": self.plan.train.fingerprint, "examples_used": len(self.train_rows),
                      "examples_total": len(self.plan.train.records)},
            "eval": {"source": self.plan.eval.source, "split": self.plan.eval.split,
                     "fingerprint": self.plan.eval.fingerprint, "examples_used": len(self.eval_rows),
                     "examples_total": len(self.plan.eval.records)},
            "labels": self.label_names,
            "label_counts_train": dict(self.train_label_counts),
            "columns": {"text": self.cfg.text_column, "text_pair": self.cfg.text_pair_column,
                        "label": self.cfg.label_column},
            "max_length": self.cfg.max_length,
            "truncated_examples": getattr(self, "truncated", None),
            "notes": self.notes,
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
