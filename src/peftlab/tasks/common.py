"""Helpers every task shares: column checks, row naming, the train/eval info block, eval mode, limits, progress."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftlab.data.sources import DataSplit, SplitPlan, load_splits
from peftlab.errors import UserError


def read_splits(cfg) -> tuple[SplitPlan, tuple[str, ...]]:
    """The run's train/eval splits, and the note when the mirror forced a substitute (or a holdout was made)."""
    splits = load_splits(cfg)
    return splits, ((splits.note,) if splits.note else ())


def columns_of(split: DataSplit) -> list[str]:
    """The columns of a split (those of its first record)."""
    return [str(k) for k in split.records[0].keys()] if split.records else []


def require_columns(split: DataSplit, columns: dict[str, str]) -> None:
    """Fail with the existing columns when a needed column is missing; ``columns`` maps each to the fix."""
    have = columns_of(split)
    for column, fix in columns.items():
        if column not in have:
            raise UserError(f"{split.source}: no column {column!r}; the columns are {', '.join(have)}. {fix}")


def split_info(split: DataSplit, unit: str, used: int, total: int | None) -> dict[str, Any]:
    """One split's part of the info block: where it came from and how much of it was used."""
    return {"source": split.source, "split": split.split, "fingerprint": split.fingerprint,
            f"{unit}_used": used, f"{unit}_total": total}


def check_positions(model: nn.Module, needed: int, what: str, fix: str) -> None:
    """Refuse sequences longer than the model's position scheme; ``fix`` may name ``{limit}``."""
    from peftlab.models import max_positions

    limit = max_positions(model)
    if limit is not None and needed > limit:
        raise UserError(f"{what} exceeds the model's maximum positions ({limit}); {fix.format(limit=limit)}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_batch_size(cfg) -> int:
    return cfg.eval_batch_size or cfg.batch_size


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode without gradients; the model's training mode is restored afterwards (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def progress(total: int, desc: str, unit: str):
    """A tqdm bar on stderr (as training's): off when stderr is not a terminal, and on ranks other than 0."""
    from tqdm.auto import tqdm

    main_rank = os.environ.get("RANK", "0") == "0"
    return tqdm(total=total, desc=desc, unit=unit, disable=None if main_rank else True, dynamic_ncols=True,
                leave=False, file=sys.stderr)
