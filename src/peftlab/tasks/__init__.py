"""The registry of tasks. A task reads its data, tokenizes it, defines its loss and declares its metrics.

The contract (declarations, phases, the immutable data objects) is in :mod:`peftlab.tasks.base`; helpers shared by
the tasks (column checks, row naming, the info block, the eval-mode toggle, progress) are in
:mod:`peftlab.tasks.common`. Adding a task is one module that defines a :class:`Task` subclass with ``@register``
and one line in the import list at the end of this file.
"""

from __future__ import annotations

from peftlab.errors import UserError
from peftlab.tasks.base import Evaluation, MetricSpec, RawData, Task

__all__ = ["TASKS", "Evaluation", "MetricSpec", "RawData", "Task", "eval_inherited_fields", "get_task", "register",
           "task_names"]

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the registry under ``cls.name``."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The registered task class called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}") from None


def task_names() -> list[str]:
    """Registered task names in table order."""
    return [t.name for t in sorted(TASKS.values(), key=lambda t: (t.order, t.name))]


def eval_inherited_fields() -> frozenset[str]:
    """The task settings that evaluating a saved adapter takes from its run: every task's fields
    (``Task.fields``) but those only training reads."""
    return frozenset().union(*(set(t.fields.model_fields) - t.fields.training_only for t in TASKS.values()))


from peftlab.tasks import classification, clm, instruction  # noqa: E402,F401  (registers the built-in tasks)
