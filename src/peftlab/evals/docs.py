"""Turn the offline benchmark files into the documents lm-eval's own tasks of the same names read.

The shipped task YAMLs (``tasks/``) name these functions with ``!function peftlab.evals.docs.<name>``; each maps a
file's published layout onto the fields of the hub dataset lm-eval's task uses, so the prompts, choices and
targets in the YAMLs are lm-eval's, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import datasets


def arc(dataset: datasets.Dataset) -> datasets.Dataset:
    """AI2's ARC jsonl (``question.stem``, ``question.choices[{text, label}]``) -> allenai/ai2_arc's layout."""

    def convert(doc):
        choices = doc["question"]["choices"]
        return {"question": doc["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": doc["answerKey"]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """The harness-form context (activity label already prefixed) and endings, cleaned by lm-eval's own
    ``preprocess`` as its ``hellaswag`` task cleans them."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    def convert(doc):
        return {"query": preprocess(doc["ctx"]), "choices": [preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(convert)


def piqa_with_labels(data_files: dict[str, str], labels_file: str, **_: object) -> datasets.DatasetDict:
    """PIQA's validation jsonl with its answers, which the authors publish in a separate file, one per line."""
    splits = datasets.load_dataset("json", data_files=data_files)
    labels = [int(line) for line in Path(labels_file).read_text(encoding="utf-8").split()]
    out = {}
    for name, split in splits.items():
        if len(labels) != len(split):
            raise ValueError(f"{labels_file}: {len(labels)} labels for {len(split)} PIQA items")
        out[name] = split.add_column("label", labels)
    return datasets.DatasetDict(out)
