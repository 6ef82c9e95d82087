"""LoRA+: LoRA with a higher learning rate for B than for A (Hayou et al. 2024), peft's LoRA+ optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from peftlab.methods import register
from peftlab.methods.fields import LoraFields
from peftlab.methods.lora import Lora

if TYPE_CHECKING:
    from torch import nn, optim


class LoraPlusFields(LoraFields):
    loraplus_lr_ratio: float = Field(16.0, gt=0, description="Learning-rate ratio of B to A.")


@register
class LoraPlus(Lora):
    name = "loraplus"
    display_name = "LoRA+"
    summary = "LoRA with a higher learning rate for B (Hayou et al. 2024)"
    order = 50
    fields = LoraPlusFields
    optimizer_is_fused = False  # peft builds its own AdamW with parameter groups

    def make_optimizer(self, model: nn.Module, cfg: Any) -> optim.Optimizer:
        import torch
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr,
                                         loraplus_lr_ratio=cfg.loraplus_lr_ratio, weight_decay=cfg.weight_decay)
