"""LoHa: low-rank Hadamard product adapters, delta W = (B1 A1) * (B2 A2) (Hyeon-Woo et al. 2022, FedPara)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms


class LohaFields(pt.RankAlphaFields):
    """LoHa's rank, scaling and its two dropouts (peft's names)."""

    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each rank of the update during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping the whole adapter in a step.")


class Loha(pt.PeftTunerMethod):
    name = "loha"
    display_name = "LoHa"
    family = "lycoris"
    summary = "low-rank Hadamard product adapters (Hyeon-Woo et al. 2022)"
    order = 100
    fields = LohaFields
    mergeable = True
    shows_rank = True
    unsupported = {"quantized_base": pt.NO_4BIT}

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import LoHaConfig

        return LoHaConfig(task_type=pt.peft_task_type(model_kind), r=cfg.r, alpha=cfg.alpha,
                          rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                          target_modules=pt.model_targets(model, cfg), **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        r = plan_input.fields["r"]
        total, largest = pt.count_tensors(arch, plan_input.fields, lambda d_in, d_out: [d_out * r, r * d_in] * 2)
        # The forward builds each target's dense delta weight (fp32) and keeps it for backward.
        dense = sum(4 * d_in * d_out for d_in, d_out in pt.plan_targets(arch, plan_input.fields).values())
        return PlanTerms(trainable_params=total, largest_trainable=largest,
                         activation_bytes_fixed=arch.num_layers * dense,
                         notes=("loha: activations approximate (one dense fp32 delta weight per target kept for "
                                "backward)",))


LOHA = register(Loha())
