"""What a task declares: the contract every module in ``peftlab.tasks`` implements.

Reports, summaries and sweeps read these declarations and never compare a task's name. The behaviour (reading data,
``prepare()`` returning an immutable prepared-data object, loss, evaluation) is documented on the Task class in
``peftlab.tasks``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    """One metric a task reports: its key in the metrics dict, its label, its direction and its format."""

    key: str  # e.g. "perplexity"
    label: str  # e.g. "Perplexity"
    higher_is_better: bool
    fmt: str = ".4f"  # a format spec for the value, e.g. ".2f"
    generated: bool = False  # measured on greedy generations (generation_subset examples, max_new_tokens each)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def format(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt)


# The Task class attributes that go with these (set on every registered task class):
#   name: str                         registry key ("clm", "classification", "instruction")
#   model_kind: str                   "causal_lm" | "seq_cls"
#   order: int                        position of the task's table in reports (the seed's order)
#   metrics: tuple[MetricSpec, ...]   every metric it reports; metrics[0] is the headline
#   table_metrics: tuple[str, ...]    keys of the extra columns after the headline, in order
#   example_unit: str                 "blocks" | "examples" (what train_subset/eval_subset count)
#   classmethod seq_len(cfg) -> int   tokens per training sequence (block_size or max_length)
#   classmethod tokens_per_example(cfg) -> int   upper bound of tokens per training example
