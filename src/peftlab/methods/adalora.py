"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated between targets during training
(Zhang et al. 2023). The allocation runs after every optimizer step through the loop's method hooks."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from peftlab.errors import UserError
from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import TargetFields


class AdaloraFields(TargetFields):
    """AdaLoRA's initial and target ranks, scaling, dropout and budget schedule (peft's names).

    The schedule's total step count is not a field: the loop passes the run's optimizer steps to
    :meth:`Adalora.begin_training`.
    """

    init_r: int = Field(12, gt=0, description="Rank of every target at the start.")
    target_r: int = Field(8, gt=0, description="Average rank per target after the budget is cut.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (scaling = alpha / current rank).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input.")
    tinit: int = Field(0, ge=0, description="Warm-up steps before the budget starts to shrink.")
    tfinal: int = Field(0, ge=0, description="Final steps trained with the final budget fixed.")
    deltaT: int = Field(1, ge=1, description="Steps between two budget allocations.")  # noqa: N815 (peft's name)
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance sensitivity.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser (peft adds it "
                                   "to the loss the model computes from labels).")

    @model_validator(mode="after")
    def _ranks(self) -> AdaloraFields:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


def _adalora_model(model: Any) -> Any:
    """peft's AdaLoraModel inside the PeftModel (it owns the rank allocator)."""
    return model.base_model


class Adalora(pt.PeftTunerMethod):
    name = "adalora"
    display_name = "AdaLoRA"
    family = "lora"
    summary = "LoRA with an adaptive per-target rank budget (Zhang et al. 2023)"
    order = 150
    fields = AdaloraFields
    mergeable = True

    def config_label(self, fields: dict[str, Any]) -> str:
        return f"({fields['init_r']}->{fields['target_r']}, {float(fields['alpha']):g})"

    def run_id_part(self, fields: dict[str, Any]) -> str:
        return f"-r{fields['init_r']}t{fields['target_r']}a{float(fields['alpha']):g}"

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import AdaLoraConfig

        # total_step is set by begin_training once the loop knows it; peft's config needs a valid one now.
        return AdaLoraConfig(task_type=pt.peft_task_type(model_kind), init_r=cfg.init_r, target_r=cfg.target_r,
                             lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, tinit=cfg.tinit, tfinal=cfg.tfinal,
                             deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2,
                             orth_reg_weight=cfg.orth_reg_weight, total_step=cfg.tinit + cfg.tfinal + 1,
                             target_modules=pt.model_targets(model, cfg), **pt.save_modules(new_modules))

    def begin_training(self, model: Any, total_steps: int) -> None:
        inner = _adalora_model(model)
        config = inner.peft_config[inner.trainable_adapter_name]
        if config.tinit + config.tfinal >= total_steps:
            raise UserError(f"tinit + tfinal ({config.tinit} + {config.tfinal}) must be below the run's "
                            f"{total_steps} optimizer steps for AdaLoRA to reallocate ranks; lower them")
        inner.rankallocator.set_total_step(total_steps)

    def after_optimizer_step(self, model: Any, step: int) -> None:
        # peft: after optimizer.step() and before zero_grad(), since the importance scores read the gradients.
        _adalora_model(model).update_and_allocate(step)

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields
        r = f["init_r"]
        total, largest = pt.count_tensors(arch, f, lambda d_in, d_out: [r * d_in, d_out * r, r])  # A, B, E
        targets = pt.plan_targets(arch, f).values()
        # As LoRA: the rank-r product per token, and the dropout's output and mask (or the fp32 input) per target.
        per_token = sum(4 * r + (8 if f["dropout"] > 0 else 4) * d_in for d_in, _ in targets)
        return PlanTerms(trainable_params=total, largest_trainable=largest,
                         activation_bytes_per_token_layer=per_token,
                         activation_bytes_fixed=3 * 4 * total,  # the allocator's importance EMAs (3 per weight)
                         notes=("adalora: activations approximate; the rank allocator's three importance scores "
                                "per adapter weight are counted with them",))


ADALORA = register(Adalora())
