"""The registry of tasks. A task reads its data, tokenizes it, defines its loss and declares its metrics.

The contract (declarations, phases, the immutable data objects) is in :mod:`peftlab.tasks.base`; helpers shared by
the tasks (column checks, row naming, the info block, the eval-mode toggle, progress) are in
:mod:`peftlab.tasks.common`. Adding a task is one module that defines a :class:`Task` subclass with ``@register``
and one line in the import list at the end of this file.
"""

from __future__ import annotations

from peftlab.errors import UserError
from peftlab.tasks.base import Evaluation, MetricSpec, RawData, Task

__all__ = ["TASKS", "Evaluation", "MetricSpec", "RawData", "Task", "get_task", "register"]

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


from peftlab.tasks import classification, clm, instruction  # noqa: E402,F401  (registers the built-in tasks)
