"""LoKr: Kronecker-product adapters, delta W = W1 (x) (B2 A2) (Edalati et al. 2022; LyCORIS)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms


class LokrFields(pt.RankAlphaFields):
    """LoKr's rank, scaling, dropouts and Kronecker factorisation (peft's names)."""

    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each rank of the update during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping the whole adapter in a step.")
    decompose_both: bool = Field(False, description="Also factor the left Kronecker matrix into a low-rank product.")
    decompose_factor: int = Field(-1, description="Size of the left Kronecker factor (-1: the most square split).")

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("decompose_factor must be -1 or a positive integer")
        return value


def kronecker_tensors(d_in: int, d_out: int, r: int, decompose_both: bool, factor: int) -> list[int]:
    """Sizes of one linear target's LoKr tensors, by peft's rule (lokr/layer.py update_layer)."""
    from peft.tuners.lokr.layer import factorization

    in_m, in_n = factorization(d_in, factor)
    out_l, out_k = factorization(d_out, factor)
    use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    w1 = [out_l * in_m] if use_w1 else [out_l * r, r * in_m]
    w2 = [out_k * in_n] if use_w2 else [out_k * r, r * in_n]
    return w1 + w2


class Lokr(pt.PeftTunerMethod):
    name = "lokr"
    display_name = "LoKr"
    family = "lycoris"
    summary = "Kronecker-product adapters (Edalati et al. 2022)"
    order = 110
    fields = LokrFields
    mergeable = True
    shows_rank = True
    unsupported = {"quantized_base": pt.NO_4BIT}

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import LoKrConfig

        return LoKrConfig(task_type=pt.peft_task_type(model_kind), r=cfg.r, alpha=cfg.alpha,
                          rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                          decompose_both=cfg.decompose_both, decompose_factor=cfg.decompose_factor,
                          target_modules=pt.model_targets(model, cfg), **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields
        total, largest = pt.count_tensors(arch, f, lambda d_in, d_out: kronecker_tensors(
            d_in, d_out, f["r"], f["decompose_both"], f["decompose_factor"]))
        # The forward builds each target's dense Kronecker product (fp32) and keeps it for backward.
        dense = sum(4 * d_in * d_out for d_in, d_out in pt.plan_targets(arch, f).values())
        return PlanTerms(trainable_params=total, largest_trainable=largest,
                         activation_bytes_fixed=arch.num_layers * dense,
                         notes=("lokr: activations approximate (one dense fp32 delta weight per target kept for "
                                "backward)",))


LOKR = register(Lokr())
