"""General-ability benchmarks through lm-evaluation-harness: what a fine-tuned model keeps of its base's abilities.

``tasks/`` holds the shipped task YAMLs (offline copies, scored as lm-eval scores its tasks of the same names),
``docs.py`` the document converters they name, ``suite.py`` the checks and rendering of ``--benchmarks``,
``harness.py`` the lm-eval glue, ``forgetting.py`` the paired interval. :class:`BenchmarkStages` is what a run
uses: score before and after, keep per-item values in ``eval_examples.json``, and give results.json its block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.evals.forgetting import forgetting
from peftlab.evals.harness import BenchmarkScore, score
from peftlab.evals.suite import CHANCE, MEASURES, SHIPPED, BenchmarkSuite, resolve
from peftlab.models import LoadedModel

__all__ = ["CHANCE", "MEASURES", "SHIPPED", "BenchmarkScore", "BenchmarkStages", "BenchmarkSuite", "forgetting",
           "resolve", "score"]


class BenchmarkStages:
    """A run's benchmarks: resolved (and checked) from its config, scored per stage, recorded.

    Usage in a run: ``stages = BenchmarkStages.for_config(cfg)`` before the model loads (bad names fail there),
    ``stages.score("before", model, loaded, run_dir)`` next to the baseline evaluation,
    ``stages.score("after", ...)`` next to the final one, then ``RunRecord(..., **stages.record())``.
    """

    def __init__(self, suite: BenchmarkSuite | None, batch_size: int, task: str) -> None:
        self.suite = suite
        self.batch_size = batch_size
        self.task = task
        self.scores: dict[str, dict[str, BenchmarkScore]] = {}
        self.seconds = 0.0

    @classmethod
    def for_config(cls, cfg) -> BenchmarkStages:
        from peftlab.data.sources import data_dir

        suite = resolve(list(cfg.benchmarks), data_dir(cfg), cfg.benchmark_limit)
        return cls(suite, cfg.eval_batch_size or cfg.batch_size, cfg.task)

    @property
    def active(self) -> bool:
        return self.suite is not None

    def score(self, stage: str, model: nn.Module, loaded: LoadedModel, run_dir: str | Path | None = None,
              write: bool = True) -> dict[str, BenchmarkScore]:
        """Score every benchmark on ``model`` (with the loaded model's tokenizer, in its precision); with a run
        dir, the per-item values go into its eval_examples.json."""
        if self.suite is None:
            return {}
        from peftlab.per_example import write_benchmark_stage

        autocast = torch.bfloat16 if loaded.precision.autocasts else None  # as compute_context
        scores, seconds = score(self.suite, model, loaded.tokenizer, self.batch_size, autocast)
        self.scores[stage], self.seconds = scores, self.seconds + seconds
        if run_dir is not None and write:
            write_benchmark_stage(run_dir, self.task, stage, {n: s.to_json() for n, s in scores.items()})
        return scores

    def restore(self, stage: str, run_dir: str | Path) -> bool:
        """A resumed run's stage, read back from its eval_examples.json (False when it holds none)."""
        from peftlab.per_example import read_benchmark_stages

        saved = read_benchmark_stages(run_dir).get(stage)
        if not saved or self.suite is None or set(saved) != set(self.suite.names):
            return False
        self.scores[stage] = {n: BenchmarkScore.from_json(n, saved[n]) for n in self.suite.names}
        return True

    def record(self) -> dict[str, Any]:
        """results.json's ``benchmarks`` (and ``benchmark_time_s``): accuracies per stage, forgetting when both."""
        if self.suite is None:
            return {}
        from peftlab.record import BenchmarkResult, Change

        before, after = self.scores.get("before", {}), self.scores.get("after", {})
        out = {}
        for name in self.suite.names:
            b, a = before.get(name), after.get(name)
            change = None
            if b is not None and a is not None:
                change = {m: Change(estimate=i.estimate, lo=i.lo, hi=i.hi, level=i.level, resamples=i.resamples)
                          for m, i in forgetting(b, a).items()}
            size = (a or b).size if (a or b) is not None else None
            out[name] = BenchmarkResult(items=size, limit=self.suite.limit, before=b.metrics if b else None,
                                        after=a.metrics if a else None, forgetting=change)
        return {"benchmarks": out, "benchmark_time_s": self.seconds}
