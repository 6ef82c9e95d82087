"""rsLoRA: LoRA scaled by alpha / sqrt(r) (Kalajdzievski 2023), peft's ``use_rslora``."""

from __future__ import annotations

from peftlab.methods import register
from peftlab.methods.lora import Lora


@register
class RsLora(Lora):
    name = "rslora"
    display_name = "rsLoRA"
    summary = "rank-stabilised LoRA: scaling alpha/sqrt(r) (Kalajdzievski 2023)"
    order = 20
    lora_options = {"use_rslora": True}
