"""What a task declares and does: the contract every module in ``peftlab.tasks`` implements.

Reports, summaries and sweeps read the declarations (:class:`MetricSpec`, the Task class attributes) and never
compare a task's name. A task object holds only its config; each phase returns an immutable value that the next
phase takes:

    raw = task.load()                               # read and check raw data (before the model loads)
    loaded = load_model(..., **task.model_kwargs(raw))
    data = task.prepare(raw, tokenizer, model)      # tokenized, on the model's device: a frozen dataclass
    task.train_batch(data, indices); task.loss(model, batch)
    result = task.evaluate(data, model, stage)      # an Evaluation: metrics + per-example outputs
    task.sample(data, model, result); task.write_artifacts(data, run_dir, result, before); task.info(data)

This module imports neither torch nor the task modules, so declarations can be read cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, create_model

if TYPE_CHECKING:  # typing only
    import torch
    from torch import nn

    from peftlab.data.sources import SplitPlan


class TaskFields(BaseModel):
    """A task's own settings: the config fields it reads, as a pydantic model (``Task.fields``).

    The fields keep their flat RunConfig names, types, defaults and help (``block_size: 64``, ``--block-size 64``):
    :func:`task_fields` builds a task's model from RunConfig's definitions of the names the task declares, so the
    config module stays free of the registry and every spelling stays what it was. What a task says about its
    settings, the rest of the code derives from: the settings that evaluating a saved adapter takes from its run
    (all but ``training_only``, see :func:`peftlab.tasks.eval_inherited_fields`) and the method capability a
    setting needs when it is on (``needs``, checked by :mod:`peftlab.configure`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Settings only training reads: a re-evaluation of a saved adapter does not take them from the run.
    training_only: ClassVar[frozenset[str]] = frozenset()
    #: Setting -> the method capability (``peftlab.methods.base.CAPABILITIES``) it needs when it is on.
    needs: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls, cfg) -> TaskFields:
        """This task's settings in a config."""
        return cls.model_validate({name: getattr(cfg, name) for name in cls.model_fields})


#: What every task reads through :mod:`peftlab.data`: the data, its evaluation split and the subsets.
DATA_FIELDS = ("dataset", "eval_dataset", "eval_split", "data_dir", "train_subset", "eval_subset")


def task_fields(name: str, *fields: str, training_only: tuple[str, ...] = (),
                needs: dict[str, str] | None = None) -> type[TaskFields]:
    """A task's :class:`TaskFields` model: :data:`DATA_FIELDS` and ``fields``, each with RunConfig's definition;
    ``training_only`` and ``needs`` as in :class:`TaskFields` (``train_subset`` is always training-only)."""
    from peftlab.config import RunConfig

    declared = RunConfig.model_fields
    unknown = [f for f in (*fields, *training_only, *(needs or {})) if f not in declared]
    if unknown:
        raise TypeError(f"{name}: {', '.join(unknown)} are not RunConfig fields")
    model = create_model(name, __base__=TaskFields,
                         **{f: (declared[f].annotation, declared[f]) for f in dict.fromkeys((*DATA_FIELDS, *fields))})
    model.training_only = frozenset(("train_subset", *training_only))
    model.needs = dict(needs or {})
    return model


@dataclass(frozen=True)
class Statistic:
    """How a metric is recomputed from per-example values (for bootstrap intervals, :mod:`peftlab.stats`).

    ``kind`` is "mean" (of one column), "exp_ratio" (exp of sum of the first column over sum of the second:
    perplexity) or "macro_f1" (from label and prediction columns); ``unit`` names the group of
    :class:`ExampleValues` whose rows are resampled.
    """

    kind: str
    unit: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class MetricSpec:
    """One metric a task reports: its key in the metrics dict, its label, its direction and its format."""

    key: str  # e.g. "perplexity"
    label: str  # e.g. "Perplexity"
    higher_is_better: bool
    fmt: str = ".4f"  # a format spec for the value, e.g. ".2f"
    #: Scored on greedy generations (so ``generation_subset`` and ``max_new_tokens`` shape it).
    generated: bool = False
    #: How to recompute it per bootstrap resample from the evaluation's per-example values (None: not possible).
    statistic: Statistic | None = None

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def format(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt)


@dataclass(frozen=True)
class RawData:
    """What ``Task.load()`` returns: the resolved splits and the notes so far. Tasks subclass it (frozen)."""

    splits: SplitPlan
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ExampleValues:
    """Per-example evaluation values: per unit ("blocks", "responses", "generations", "examples"), named columns of
    one value per unit, in evaluation order; ``classes``: the label count (macro-F1 counts every class)."""

    groups: dict[str, dict[str, tuple[float, ...]]]
    classes: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """What ``Task.evaluate()`` returns: the metrics, and what artifacts and samples need (per-example outputs)."""

    stage: str  # "before", "after", "eval", "epoch<N>"
    metrics: dict[str, Any]
    outputs: tuple[Any, ...] = ()  # one per evaluated example, in evaluation order (predictions, generations)
    examples: ExampleValues | None = None  # per-example values (written to eval_examples.json, for intervals)


class Task:
    """One task family. Subclasses set the declarations and implement the phases.

    The task holds its config only (``self.cfg``); nothing is set on it across phases. Each phase's data is an
    immutable object returned by the phase before.
    """

    # --- declarations (read by reports, summaries, sweeps and the planner) ------------------------------------
    name: ClassVar[str]  # registry key ("clm", "classification", "instruction")
    #: The task's own settings (:func:`task_fields`); configure and evaluate read what they need from it.
    fields: ClassVar[type[TaskFields]] = task_fields("DataFields")
    model_kind: ClassVar[str] = "causal_lm"  # "causal_lm" | "seq_cls"
    order: ClassVar[int]  # position of the task's table in reports (the seed's order)
    metrics: ClassVar[tuple[MetricSpec, ...]]  # every metric it reports; metrics[0] is the headline
    table_metrics: ClassVar[tuple[str, ...]] = ()  # keys of the extra columns after the headline, in order
    example_unit: ClassVar[str] = "examples"  # "blocks" | "examples": what train_subset/eval_subset count
    #: Config fields besides the model and the evaluation data that change what ``evaluate`` computes: part of the
    #: shared baseline's key (:mod:`peftlab.baseline`). Fields that only change float rounding are left out.
    eval_fields: ClassVar[tuple[str, ...]] = ()
    #: Evaluation pads batches (results may depend on the evaluation batch size, e.g. batched greedy generation).
    eval_pads: ClassVar[bool] = False

    @classmethod
    def seq_len(cls, cfg) -> int:
        """Tokens per training sequence."""
        return cfg.max_length

    @classmethod
    def tokens_per_example(cls, cfg) -> int:
        """Upper bound of tokens per training example."""
        return cls.seq_len(cfg)

    @classmethod
    def metric_spec(cls, key: str) -> MetricSpec:
        """The declared metric with this key."""
        return next(m for m in cls.metrics if m.key == key)

    @property
    def metric(self) -> str:
        """The headline metric's key in ``evaluate()``'s metrics."""
        return self.metrics[0].key

    @property
    def higher_is_better(self) -> bool:
        return self.metrics[0].higher_is_better

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # --- phases -------------------------------------------------------------------------------------------
    def load(self) -> RawData:
        """Read and validate raw data (no tokenizer yet): bad files and columns fail before the model loads."""
        raise NotImplementedError

    def model_kwargs(self, raw: RawData) -> dict[str, Any]:
        """Extra arguments for loading the model (e.g. the label set)."""
        return {}

    def prepare(self, raw: RawData, tokenizer, model: nn.Module) -> Any:
        """Tokenize the data for this model; returns the task's frozen prepared-data object."""
        raise NotImplementedError

    def num_train_examples(self, data) -> int:
        raise NotImplementedError

    def train_batch(self, data, indices: list[int]) -> dict[str, torch.Tensor]:
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

    def evaluate(self, data, model: nn.Module, stage: str) -> Evaluation:
        """The task's metrics on the evaluation split (``metrics[0].key`` among them)."""
        raise NotImplementedError

    def sample(self, data, model: nn.Module, result: Evaluation) -> dict[str, Any]:
        """A stored example of what the model does (a generation or a prediction)."""
        return {}

    def write_artifacts(self, data, run_dir, result: Evaluation, before: Evaluation | None = None) -> None:
        """Task-specific files in the run directory (predictions, reports), from the final evaluation."""

    def info(self, data) -> dict[str, Any]:
        """Data provenance for results.json: sources, splits, sizes, fingerprints and notes."""
        return {}

    def eval_identity(self, data) -> dict[str, Any]:
        """What decides the evaluation's numbers apart from the model: the evaluation data as used (source,
        fingerprint, count), the ``eval_fields`` and, when evaluation pads, the evaluation batch size."""
        from peftlab.tasks.common import eval_batch_size

        out = {"task": self.name, "eval_data": self.info(data).get("eval"),
               **{name: getattr(self.cfg, name) for name in self.eval_fields}}
        if self.eval_pads:
            out["eval_batch_size"] = eval_batch_size(self.cfg)
        return out

    def outputs_to_json(self, outputs: tuple[Any, ...]) -> list[Any]:
        """Per-example outputs as JSON values (to cache a baseline evaluation); text outputs as they are."""
        return list(outputs)

    def outputs_from_json(self, values: list[Any]) -> tuple[Any, ...]:
        return tuple(values)
