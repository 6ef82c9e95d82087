"""Score a model already in memory on a benchmark suite with lm-evaluation-harness' Python API.

``HFLM(pretrained=<the loaded model, PeftModel or not>, tokenizer=<its tokenizer>)`` wraps the model without
loading anything; ``simple_evaluate`` runs the suite's tasks (indexed by a ``TaskManager`` over the suite's
folders) and logs every item, so each benchmark comes back with its accuracies and one correctness value per item.
No hub access: the tokenizer is passed in, the shipped tasks read local files and use lm-eval's built-in
``acc``/``acc_norm`` (no ``evaluate.load``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.evals.suite import BenchmarkSuite

#: Per-item values kept from lm-eval's logged samples (the metrics a multiple-choice task reports per item).
ITEM_METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class BenchmarkScore:
    """One benchmark at one stage: its accuracies and, per item in document order, the item's id and values."""

    name: str
    metrics: dict[str, float]
    items: dict[str, list[float]] = field(default_factory=dict)  # "doc_id" and each of ITEM_METRICS lm-eval gave

    @property
    def size(self) -> int:
        return len(self.items.get("doc_id", []))

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "items": self.items}

    @classmethod
    def from_json(cls, name: str, data: dict) -> BenchmarkScore:
        return cls(name, {k: float(v) for k, v in (data.get("metrics") or {}).items()},
                   {k: list(v) for k, v in (data.get("items") or {}).items()})


def score(suite: BenchmarkSuite, model: nn.Module, tokenizer, batch_size: int, autocast: torch.dtype | None = None,
          seed: int = 1234) -> tuple[dict[str, BenchmarkScore], float]:
    """Every benchmark of the suite on ``model`` (left in the training mode it had); returns the scores and the
    seconds lm-eval took. ``autocast``: the dtype the run's forwards autocast to (bf16-mixed), which lm-eval
    applies itself (its forward sets its own autocast, which would otherwise switch the run's off)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    started = time.perf_counter()
    previous = logging.getLogger("lm_eval").level
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task chatter is not the user's business
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=autocast)
        out = simple_evaluate(model=lm, tasks=list(suite.names), task_manager=suite.task_manager(),
                              limit=suite.limit, log_samples=True, bootstrap_iters=0, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        logging.getLogger("lm_eval").setLevel(previous)
        model.train(was_training)
    seconds = time.perf_counter() - started
    return {name: _score_of(name, out) for name in suite.names}, seconds


def _score_of(name: str, out: dict) -> BenchmarkScore:
    results = out["results"][name]
    metrics = {m: float(results[f"{m},none"]) for m in ITEM_METRICS if f"{m},none" in results}
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    items: dict[str, list[float]] = {"doc_id": [int(s["doc_id"]) for s in samples]}
    for metric in metrics:
        items[metric] = [float(s[metric]) for s in samples]
    return BenchmarkScore(name, metrics, items)
