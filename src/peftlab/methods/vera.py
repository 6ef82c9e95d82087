"""VeRA: vector-based random matrix adaptation, frozen shared random A and B scaled by trained vectors
(Kopiczko et al. 2024)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import TargetFields


class VeraFields(TargetFields):
    """VeRA's rank of the shared projections and its vectors' options (peft's names and defaults)."""

    r: int = Field(256, gt=0, description="Rank of the shared random projections (trains r + out per target).")
    vera_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the scaling vector d.")
    projection_prng_key: int = Field(0, ge=0, description="Seed of the shared random projections.")


class Vera(pt.PeftTunerMethod):
    name = "vera"
    display_name = "VeRA"
    family = "vera"
    summary = "shared frozen random projections scaled by trained vectors (Kopiczko et al. 2024)"
    order = 140
    fields = VeraFields
    mergeable = True
    unsupported = {"quantized_base": pt.NO_4BIT}

    def run_id_part(self, fields: dict[str, Any]) -> str:
        return f"-r{fields['r']}"

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import VeraConfig

        # save_projection: the shared A and B are saved with the adapter, so a reload does not depend on the PRNG.
        return VeraConfig(task_type=pt.peft_task_type(model_kind), r=cfg.r, vera_dropout=cfg.vera_dropout,
                          d_initial=cfg.d_initial, projection_prng_key=cfg.projection_prng_key, save_projection=True,
                          target_modules=pt.model_targets(model, cfg), **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields
        r = f["r"]
        total, largest = pt.count_tensors(arch, f, lambda d_in, d_out: [d_out, r])  # lambda_b, lambda_d
        targets = pt.plan_targets(arch, f).values()
        shared = 4 * r * (max(d for d, _ in targets) + max(d for _, d in targets))  # frozen A and B, fp32, once
        # Per target and token: A x and d * (A x) (r each) and B (...) (out), fp32; with dropout its mask and output.
        per_token = sum(4 * (2 * r + d_out) + (2 * 4 * d_in if f["vera_dropout"] > 0 else 0) for d_in, d_out in targets)
        return PlanTerms(trainable_params=total, largest_trainable=largest, activation_bytes_fixed=shared,
                         activation_bytes_per_token_layer=per_token,
                         notes=("vera: activations approximate; the shared random projections are counted with "
                                "them",))


VERA = register(Vera())
