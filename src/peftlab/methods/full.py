"""Full fine-tuning: every weight is trained."""

from __future__ import annotations

from torch import nn

from peftlab.methods import Method, register


def _apply_full(model: nn.Module, cfg, task_kind: str) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


FULL = register(Method(name="full", fields=frozenset(), apply=_apply_full, is_peft=False,
                       summary="all weights trainable"))
