"""P-Tuning: virtual-token embeddings produced by a trained prompt encoder (MLP or LSTM) (Liu et al. 2021)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import VirtualTokenFields
from peftlab.methods.prompt_tuning import extra_token_activation_bytes


class PTuningFields(VirtualTokenFields):
    """Virtual tokens and the prompt encoder that produces them (peft's PromptEncoderConfig names)."""

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description="Prompt encoder kind.")
    encoder_hidden_size: int | None = Field(None, gt=0, description="Encoder width (default: the model's hidden size).")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (the MLP always has 3 linear layers).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout between LSTM layers.")


def encoder_tensors(h: int, fields: dict[str, Any]) -> list[int]:
    """Sizes of peft's PromptEncoder tensors (p_tuning/model.py): embedding, then the LSTM and/or MLP."""
    n, e = fields["num_virtual_tokens"], fields["encoder_hidden_size"] or h
    sizes = [n * h]
    if fields["encoder_reparameterization_type"] == "MLP":
        return sizes + [h * e, e, e * e, e, e * h, h]
    for layer in range(fields["encoder_num_layers"]):
        d_in = h if layer == 0 else 2 * e
        sizes += [4 * e * d_in, 4 * e * e, 4 * e, 4 * e] * 2  # both directions: w_ih, w_hh, b_ih, b_hh
    return sizes + [2 * e * 2 * e, 2 * e, 2 * e * h, h]


class PTuning(pt.PeftTunerMethod):
    name = "p_tuning"
    display_name = "P-Tuning"
    family = "prompt"
    summary = "virtual tokens from a trained prompt encoder (Liu et al. 2021)"
    order = 190
    fields = PTuningFields
    unsupported = dict(pt.PROMPT_UNSUPPORTED)

    def run_id_part(self, fields: dict[str, Any]) -> str:
        return f"-v{fields['num_virtual_tokens']}"

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type=pt.peft_task_type(model_kind), num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_reparameterization_type=cfg.encoder_reparameterization_type,
                                   encoder_hidden_size=cfg.encoder_hidden_size,
                                   encoder_num_layers=cfg.encoder_num_layers, encoder_dropout=cfg.encoder_dropout,
                                   **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields
        sizes = encoder_tensors(arch.hidden_size, f)
        return PlanTerms(trainable_params=sum(sizes), largest_trainable=max(sizes),
                         activation_bytes_fixed=extra_token_activation_bytes(arch, plan_input, f["num_virtual_tokens"]),
                         notes=("p_tuning: activations approximate (the virtual tokens lengthen every sequence; "
                                "attention over them and the small encoder are not counted)",))


P_TUNING = register(PTuning())
