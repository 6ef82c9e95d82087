"""IA3: learned rescaling vectors (Liu et al. 2022), through peft's IA3Config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from peftlab.methods import register
from peftlab.methods.base import Method, PlanTerms, peft_task_type, plan_targets
from peftlab.methods.fields import TargetFields

if TYPE_CHECKING:
    from torch import nn

#: Targets whose input (not output) is rescaled.
FEEDFORWARD_NAMES = {"down_proj", "fc2", "w2", "dense_4h_to_h", "output"}
#: peft's default IA3 targets for Llama-style models (used when the user kept the default targets).
PLAN_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")


class Ia3Fields(TargetFields):
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Module names that get rescaling vectors (default: peft's IA3 targets for "
        "the architecture, k_proj,v_proj,down_proj for Llama).")


@register
class Ia3(Method):
    name = "ia3"
    display_name = "IA3"
    family = "ia3"
    summary = "learned rescaling vectors (Liu et al. 2022)"
    order = 70
    fields = Ia3Fields
    mergeable = True

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str] = ()) -> nn.Module:
        from peft import IA3Config, get_peft_model

        from peftlab.methods.targets import resolve_targets

        targets, feedforward = None, None  # peft's defaults for the architecture
        if cfg.target_modules is not None:
            targets = resolve_targets(model, cfg.target_modules, user_set=True)
            feedforward = [t for t in targets if t in FEEDFORWARD_NAMES]
        return get_peft_model(model, IA3Config(task_type=peft_task_type(model_kind), target_modules=targets,
                                               feedforward_modules=feedforward,
                                               modules_to_save=list(new_modules) or None))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        shapes = arch.linear_shapes()
        targets = plan_targets(arch, plan_input, default=PLAN_DEFAULT_TARGETS)
        sizes = [shapes[t][0] if t in FEEDFORWARD_NAMES else shapes[t][1] for t in targets]
        a = self.activation_element_bytes(plan_input)
        return PlanTerms(trainable_params=arch.num_layers * sum(sizes), largest_trainable=max(sizes),
                         activation_bytes_per_token_layer=a * sum(sizes))
