"""LN Tuning: train only (copies of) the normalisation layers (Zhao et al. 2024)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from peftlab.errors import UserError
from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import TargetFields

#: A Llama-style decoder's norms: two per layer, one final.
DECODER_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


class LnTuningFields(TargetFields):
    """Which normalisation layers are trained (no rank)."""

    target_modules: list[str] = Field(DECODER_NORMS, min_length=1,
                                      description="Normalisation modules to train (comma-separated on the CLI).")


def norm_module_names(model: Any) -> list[str]:
    """Sorted unique last-name components of the model's normalisation layers."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and "norm" in type(module).__name__.lower()})


def resolve_norms(model: Any, targets: list[str], user_set: bool) -> list[str]:
    """The norms to train; the default decoder names fall back to all of the model's norms elsewhere (BERT)."""
    available = norm_module_names(model)
    if not user_set:
        return [t for t in targets if t in available] or available
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(f"target_modules: the model has no normalisation module named {', '.join(missing)}; "
                        f"its norms are {', '.join(available) or 'none'}")
    return targets


class LnTuning(pt.PeftTunerMethod):
    name = "ln_tuning"
    display_name = "LN Tuning"
    family = "ln_tuning"
    summary = "trains only the normalisation layers (Zhao et al. 2024)"
    order = 170
    fields = LnTuningFields
    mergeable = True

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import LNTuningConfig

        targets = resolve_norms(model, list(cfg.target_modules), cfg.is_set("target_modules"))
        return LNTuningConfig(task_type=pt.peft_task_type(model_kind), target_modules=targets,
                              **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        h = arch.hidden_size
        sizes = {"input_layernorm": arch.num_layers * h, "post_attention_layernorm": arch.num_layers * h, "norm": h}
        targets = list(plan_input.fields["target_modules"])
        wrong = [t for t in targets if t not in sizes]
        if wrong:
            raise UserError(f"target_modules: the planner's model has no norm named {', '.join(wrong)}; "
                            f"its norms are {', '.join(sizes)}")
        per_layer = sum(t != "norm" for t in targets)
        # A trained norm weight needs its normalised input for the weight gradient (h per norm and token).
        return PlanTerms(trainable_params=sum(sizes[t] for t in targets), largest_trainable=h,
                         activation_bytes_per_token_layer=per_layer * pt.act_bytes(plan_input) * h,
                         notes=("ln_tuning: activations approximate (the normalised input of each trained norm)",))


LN_TUNING = register(LnTuning())
