"""QLoRA: LoRA over a 4-bit NF4 base (Dettmers et al. 2023), through bitsandbytes and peft."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import LoraFields
from peftlab.methods.lora import Lora

if TYPE_CHECKING:
    from torch import nn

NF4_BLOCK = 64  # values per absmax
DQ_BLOCK = 256  # absmax values per second-level constant (double quantization)


class QloraFields(LoraFields):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")


def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one weight tensor of n values in bitsandbytes 4-bit: packed values, absmax, quant map."""
    blocks = math.ceil(n / NF4_BLOCK)
    size = (n + 1) // 2 + 16 * 4  # packed nibbles + the 16-entry quant map
    if double_quant:
        size += blocks + math.ceil(blocks / DQ_BLOCK) * 4 + 256 * 4 + 4  # uint8 absmax, fp32 absmax2, code, offset
    else:
        size += blocks * 4
    return size


@register
class Qlora(Lora):
    name = "qlora"
    display_name = "QLoRA"
    summary = "LoRA over a 4-bit NF4 base (Dettmers et al. 2023)"
    order = 60
    fields = QloraFields
    quantizes_base = True

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str] = ()) -> nn.Module:
        from peft import get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        return get_peft_model(model, self.lora_config(model, cfg, model_kind, new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        """LoRA's terms over a 4-bit base: every decoder linear layer in NF4; embeddings, head, norms and biases
        stay unquantized in fp32 (peft's k-bit preparation upcasts them)."""
        lora = super().plan_terms(arch, plan_input)
        dq = plan_input.fields["double_quant"]
        quantized = arch.num_layers * sum(nf4_bytes(i * o, dq) for i, o in arch.linear_shapes().values())
        bias = arch.num_layers * (arch.q_dim + 2 * arch.kv_dim if arch.attention_bias else 0)
        base = quantized + 4 * (arch.embedding_params() + arch.norm_params() + bias)
        return PlanTerms(trainable_params=lora.trainable_params, largest_trainable=lora.largest_trainable,
                         base_weight_bytes=base,
                         activation_bytes_per_token_layer=lora.activation_bytes_per_token_layer)
