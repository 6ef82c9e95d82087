"""Loss functions shared by tasks. Every loss returns a *sum* over its counted items, in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted_label_count(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a causal LM batch: label positions 1..T that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy: position t predicts labels[t + 1]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits[:, :-1, :]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
