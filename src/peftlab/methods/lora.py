"""LoRA: low-rank adapters (Hu et al. 2021), through peft's LoraConfig. Its variants subclass :class:`Lora`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from peftlab.methods import register
from peftlab.methods.base import Method, PlanTerms, peft_task_type, plan_targets
from peftlab.methods.fields import LoraFields

if TYPE_CHECKING:
    from torch import nn

#: Projections that read the same input: one fp32 cast of it serves all (dropout off, fp32 activations).
INPUT_GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


@register
class Lora(Method):
    name = "lora"
    display_name = "LoRA"
    family = "lora"
    summary = "low-rank adapters (Hu et al. 2021)"
    order = 10
    fields = LoraFields
    mergeable = True
    shows_rank = True
    starts_as_base = True  # B is initialised to zero
    shards_with_fsdp = True
    #: Extra LoraConfig arguments of a variant (use_dora, use_rslora, init_lora_weights).
    lora_options: ClassVar[dict[str, Any]] = {}

    def reference_rank(self, fields: dict[str, Any]) -> int | None:
        if type(self) is not Lora:  # the variants are compared with plain LoRA, not used as the reference
            return None
        return 0 if (fields.get("r"), float(fields.get("alpha", 0))) == (8, 16.0) else 1

    def lora_config(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str]):
        from peft import LoraConfig

        from peftlab.methods.targets import resolve_targets

        targets = resolve_targets(model, cfg.target_modules, cfg.is_set("target_modules"))
        return LoraConfig(task_type=peft_task_type(model_kind), r=cfg.r, lora_alpha=cfg.alpha,
                          lora_dropout=cfg.dropout, target_modules=targets, bias=cfg.bias,
                          modules_to_save=list(new_modules) or None, **self.lora_options)

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str] = ()) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.lora_config(model, cfg, model_kind, new_modules))

    # --- planner ---------------------------------------------------------------------------------------------

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        shapes, r = arch.linear_shapes(), plan_input.fields["r"]
        targets = plan_targets(arch, plan_input)
        trainable = arch.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
        largest = max(r * max(shapes[t]) for t in targets)
        return PlanTerms(trainable_params=trainable, largest_trainable=largest,
                         activation_bytes_per_token_layer=self.lora_activation_bytes(arch, plan_input, targets))

    def lora_activation_bytes(self, arch: Any, plan_input: Any, targets: list[str]) -> int:
        """Saved per token and layer: r outputs per target (fp32), plus the dropout noise and output, or the fp32
        cast of each input (one per shared input when activations are fp32)."""
        a = self.activation_element_bytes(plan_input)
        shapes, r = arch.linear_shapes(), plan_input.fields["r"]
        out, groups = 0, set()
        for t in targets:
            d_in = shapes[t][0]
            out += 4 * r
            if plan_input.fields["dropout"] > 0:
                out += (4 + 1) * d_in if plan_input.device == "cuda" else 2 * 4 * d_in
            elif a != 4:
                out += 4 * d_in  # each target's fp32 cast of its input
            else:
                group = INPUT_GROUPS.get(t, t)
                if group not in groups and t != "o_proj":  # o_proj's input is the saved attention output
                    out += 4 * d_in
                groups.add(group)
        return out
