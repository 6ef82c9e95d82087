"""Prefix tuning: trainable key/value prefixes per layer (Li & Liang 2021), through peft's PrefixTuningConfig."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftlab.methods import register
from peftlab.methods.base import DTYPE_BYTES, Method, PlanTerms, peft_task_type
from peftlab.methods.fields import VirtualTokenFields

if TYPE_CHECKING:
    from torch import nn


@register
class Prefix(Method):
    name = "prefix"
    display_name = "Prefix"
    family = "prompt"
    summary = "trainable prefix key/values per layer (Li & Liang 2021)"
    order = 80
    fields = VirtualTokenFields
    unsupported = {"merge": "adds trainable inputs instead of changing weights and cannot be merged; use it with "
                            "`peftlab eval/generate --adapter`",
                   "packing": "cannot pack examples (its prefix breaks the per-example masks); "
                              "use --set packing=false"}

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str] = ()) -> nn.Module:
        from peft import PrefixTuningConfig, get_peft_model

        return get_peft_model(model, PrefixTuningConfig(task_type=peft_task_type(model_kind),
                                                        num_virtual_tokens=cfg.num_virtual_tokens,
                                                        modules_to_save=list(new_modules) or None))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        tokens = plan_input.fields["num_virtual_tokens"]
        n = tokens * arch.num_layers * 2 * arch.kv_dim
        a = self.activation_element_bytes(plan_input)
        # the prefix key/values of every layer at the run dtype; with a mask, attention repeats k/v to every head
        fixed = arch.num_layers * plan_input.batch_size * tokens * 2 * arch.kv_dim * DTYPE_BYTES[plan_input.dtype]
        return PlanTerms(trainable_params=n, largest_trainable=n,
                         activation_bytes_per_token_layer=2 * a * (arch.q_dim - arch.kv_dim),
                         activation_bytes_fixed=fixed,
                         notes=("prefix tuning: activations approximate (attention with a mask repeats k/v per "
                                "head)",))
