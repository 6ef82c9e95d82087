"""The registry of tasks. A task reads its data, tokenizes it, defines its loss and its metrics."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the registry under ``cls.name``."""
    TASKS[cls.name] = cls
    return cls


class Task:
    """One task family. Subclasses fill in data, loss and evaluation.

    The run calls, in order: ``load()`` (read and check raw data, no tokenizer yet), ``model_kwargs()``,
    ``build(tokenizer, model)``, then ``train_batch``/``loss`` in the loop and ``evaluate``/``sample`` around it.
    """

    name: ClassVar[str]
    model_kind: ClassVar[str] = "causal_lm"  # causal_lm | seq_cls
    metric: ClassVar[str]  # the headline metric key in evaluate()'s result
    higher_is_better: ClassVar[bool]

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.notes: list[str] = []

    def load(self) -> None:
        """Read and validate raw data."""
        raise NotImplementedError

    def load_plan(self):
        """Resolve the train/eval splits (``self.plan``), keeping the note when the mirror forced a substitute."""
        from peftlab.data.sources import load_splits

        self.plan = load_splits(self.cfg)
        if self.plan.note:
            self.notes.append(self.plan.note)
        return self.plan

    def model_kwargs(self) -> dict[str, Any]:
        """Extra arguments for loading the model (e.g. the label set)."""
        return {}

    def build(self, tokenizer, model: nn.Module) -> None:
        """Tokenize the data for this model."""
        raise NotImplementedError

    def num_train_examples(self) -> int:
        raise NotImplementedError

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The training micro-batch made of these example indices."""
        raise NotImplementedError

    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items (tokens or examples) the loss of this batch sums over."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed (not averaged) loss over the batch's counted items."""
        raise NotImplementedError

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens in a batch, for tokens/s."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def evaluate(self, model: nn.Module, stage: str) -> dict[str, float]:
        """The task's metrics on the evaluation split. ``stage`` is 'before' or 'after'."""
        raise NotImplementedError

    def sample(self, model: nn.Module) -> dict[str, Any]:
        """A stored example of what the model does (a generation or a prediction)."""
        return {}

    def info(self) -> dict[str, Any]:
        """Data provenance for results.json: sources, splits, sizes, fingerprints and notes."""
        return {}

    def write_artifacts(self, run_dir, model: nn.Module) -> None:
        """Task-specific files in the run directory (predictions, reports)."""


from peftlab.tasks import classification, clm, instruction  # noqa: E402,F401  (registers the built-in tasks)
