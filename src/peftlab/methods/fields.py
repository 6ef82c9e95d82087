"""Config fields that several methods share, with the seed's defaults. A method's fields model composes these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from peftlab.methods.base import MethodFields


class TargetFields(MethodFields):
    """Which modules get adapters."""

    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1,
                                      description="Module names that get adapters (comma-separated on the CLI).")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class RankFields(TargetFields):
    """A rank, its scaling and dropout: the seed's LoRA knobs."""

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (scaling = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input.")


class LoraFields(RankFields):
    """LoRA and its variants."""

    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class VirtualTokenFields(MethodFields):
    """Prompt-learning methods: how many virtual tokens they learn."""

    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens learned.")
