"""Full fine-tuning: every weight is trained, and the whole model is saved."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftlab.methods import register
from peftlab.methods.base import DTYPE_BYTES, Method, PlanTerms

if TYPE_CHECKING:
    from torch import nn


@register
class Full(Method):
    name = "full"
    display_name = "Full"
    family = "full"
    summary = "all weights trainable"
    order = 0
    is_peft = False
    starts_as_base = True
    shards_with_fsdp = True
    trains_every_weight = True
    unsupported = {"merge": "trains every weight, so there is no adapter to merge; use its model/ folder as is",
                   "quantized_base": "trains every weight, which a 4-bit base cannot hold; use --method qlora",
                   # AdamW updates of ~lr * 1e-3 vanish when added to bf16 weights (8 mantissa bits)
                   "bf16_true": "cannot train bf16 weights with plain AdamW (updates below bf16's resolution are "
                                "lost; that needs stochastic rounding or Kahan summation); use --precision "
                                "bf16-mixed, which keeps fp32 master weights"}

    flops_formula = "6*N + 12*L*T*d_attn"

    def train_flops_per_token(self, arch: Any, plan_input: Any) -> float:
        """Every matmul weight is trained: 6 FLOPs per weight and token, plus the attention term."""
        return 6 * arch.flop_weights() + arch.attention_flops_per_token(plan_input.seq_len)

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str] = ()) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        pbytes = DTYPE_BYTES[plan_input.master_dtype]
        a = self.activation_element_bytes(plan_input)
        h = arch.hidden_size
        largest = max(arch.vocab_size * h, *(i * o for i, o in arch.linear_shapes().values()))
        held = arch.vocab_size * h * pbytes if plan_input.grad_accum == 1 else None  # the output layer's, first
        # the weight gradients need the normalized inputs, norm outputs and down_proj's input; the head 3h
        return PlanTerms(trainable_params=arch.total_params(), largest_trainable=largest, base_weight_bytes=0,
                         trainable_bytes_per_param=pbytes,
                         activation_bytes_per_token_layer=a * (4 * h + arch.intermediate_size),
                         activation_bytes_per_token_head=2 * a * h, gradients_held_bytes=held,
                         # bf16-mixed: autocast's bf16 copies of the fp32 matmul weights live through the step
                         autocast_copy_bytes=2 * arch.matmul_params() if plan_input.precision_traits.autocasts
                         else 0)
