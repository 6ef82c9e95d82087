"""DoRA: weight-decomposed LoRA (Liu et al. 2024), peft's ``use_dora``."""

from __future__ import annotations

from typing import Any

from peftlab.methods import register
from peftlab.methods.base import PlanTerms, plan_targets
from peftlab.methods.lora import Lora


@register
class Dora(Lora):
    name = "dora"
    display_name = "DoRA"
    summary = "weight-decomposed LoRA (Liu et al. 2024)"
    order = 30
    lora_options = {"use_dora": True}
    starts_as_base = False  # the magnitude renormalisation reproduces the base only up to rounding

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        lora = super().plan_terms(arch, plan_input)
        shapes, targets = arch.linear_shapes(), plan_targets(arch, plan_input)
        a = self.activation_element_bytes(plan_input)
        magnitudes = arch.num_layers * sum(shapes[t][1] for t in targets)  # one per output feature
        return PlanTerms(
            trainable_params=lora.trainable_params + magnitudes, largest_trainable=lora.largest_trainable,
            activation_bytes_per_token_layer=lora.activation_bytes_per_token_layer
            + sum((a + 4) * shapes[t][1] for t in targets),
            activation_bytes_fixed=max(4 * shapes[t][0] * shapes[t][1] for t in targets),  # one dense B @ A
            notes=("dora: activations approximate (magnitude and weight-norm terms)",))
