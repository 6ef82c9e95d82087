"""Prompt Tuning: learned soft-prompt embeddings prepended to the input (Lester et al. 2021)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import VirtualTokenFields


class PromptTuningFields(VirtualTokenFields):
    """How many virtual tokens, and how they start (peft's names)."""

    prompt_tuning_init: Literal["random", "text"] = Field(
        "random", description="Start from random embeddings, or from the embeddings of prompt_tuning_init_text.")
    prompt_tuning_init_text: str | None = Field(None, min_length=1,
                                                description="Text whose token embeddings start the prompt.")

    @model_validator(mode="after")
    def _init_text(self) -> PromptTuningFields:
        if self.prompt_tuning_init == "text" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init 'text' needs prompt_tuning_init_text")
        return self


def extra_token_activation_bytes(arch: Any, plan_input: Any, tokens: int) -> int:
    """Approximate bytes the decoder saves for backward for ``tokens`` extra (virtual) positions of a micro-batch:
    the frozen base's per-token terms (norm inputs, q/k/v, attention output, MLP) in every layer."""
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    per_token_layer = pt.act_bytes(plan_input) * (2 * h + 2 * q + 2 * kv + 3 * i)
    return getattr(plan_input, "batch_size", 1) * tokens * arch.num_layers * per_token_layer


class PromptTuning(pt.PeftTunerMethod):
    name = "prompt_tuning"
    display_name = "Prompt Tuning"
    family = "prompt"
    summary = "learned soft-prompt embeddings (Lester et al. 2021)"
    order = 180
    fields = PromptTuningFields
    unsupported = dict(pt.PROMPT_UNSUPPORTED)

    def run_id_part(self, fields: dict[str, Any]) -> str:
        return f"-v{fields['num_virtual_tokens']}"

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import PromptTuningConfig

        text = {}
        if cfg.prompt_tuning_init == "text":  # peft tokenizes the text with the model's own tokenizer
            text = dict(prompt_tuning_init_text=cfg.prompt_tuning_init_text,
                        tokenizer_name_or_path=model.name_or_path)
        return PromptTuningConfig(task_type=pt.peft_task_type(model_kind), num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init=cfg.prompt_tuning_init.upper(), **text,
                                  **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        n = plan_input.fields["num_virtual_tokens"] * arch.hidden_size
        return PlanTerms(trainable_params=n, largest_trainable=n,
                         activation_bytes_fixed=extra_token_activation_bytes(
                             arch, plan_input, plan_input.fields["num_virtual_tokens"]),
                         notes=("prompt_tuning: activations approximate (the virtual tokens lengthen every sequence; "
                                "attention over them is not counted)",))


PROMPT_TUNING = register(PromptTuning())
