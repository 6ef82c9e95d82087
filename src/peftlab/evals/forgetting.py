"""Forgetting: a benchmark's accuracy after training minus before, with a paired bootstrap interval over items.

Both stages score the same items (matched by lm-eval's ``doc_id``), so the paired bootstrap resamples items once
for both and the item-to-item variation they share cancels in the difference (:mod:`peftlab.stats`).
"""

from __future__ import annotations

from peftlab.errors import UserError
from peftlab.evals.harness import BenchmarkScore
from peftlab.stats import Interval, mean_of, paired_bootstrap


def forgetting(before: BenchmarkScore, after: BenchmarkScore) -> dict[str, Interval]:
    """Per metric both stages have: after - before and its 95% paired bootstrap interval."""
    if before.items.get("doc_id") != after.items.get("doc_id"):
        raise UserError(f"benchmark {before.name}: the before and after stages scored different items; score both "
                        "with the same --benchmark-limit")
    out = {}
    for metric in before.metrics:
        if metric in after.metrics and metric in before.items and metric in after.items:
            out[metric] = paired_bootstrap(mean_of(before.items[metric]), mean_of(after.items[metric]),
                                           before.size)
    return out
