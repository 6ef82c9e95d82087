"""OFT: orthogonal fine-tuning, a block-diagonal rotation of each target's input (Qiu et al. 2023)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import TargetFields


class OftFields(TargetFields):
    """OFT's block layout (exactly one of r and oft_block_size, as peft requires) and its options."""

    r: int = Field(0, ge=0, description="Number of OFT blocks per target (0: set by oft_block_size).")
    oft_block_size: int = Field(32, ge=0, description="Size of each rotation block (0: set by r).")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Multiplicative dropout of whole OFT blocks.")
    coft: bool = Field(False, description="Constrained OFT: keep the rotation within eps of the identity.")
    eps: float = Field(6e-5, gt=0, description="COFT's freedom of rotation (only with coft).")
    block_share: bool = Field(False, description="Share one rotation between all blocks of a target.")
    use_cayley_neumann: bool = Field(True, description="Approximate the Cayley transform by a Neumann series.")

    @model_validator(mode="before")
    @classmethod
    def _one_layout(cls, data: Any) -> Any:
        # `--r 4` alone means 4 blocks: the default block size then gives way, since peft takes only one of them.
        if isinstance(data, dict) and data.get("r") and "oft_block_size" not in data:
            data = dict(data, oft_block_size=0)
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> OftFields:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError("set exactly one of r (blocks) and oft_block_size (block size); the other must be 0")
        return self


def adjusted(d_in: int, value: int) -> int:
    """peft's adjustment of r or the block size to a divisor of in_features (OFTLayer.adjust_oft_parameters)."""
    if value >= d_in:
        return d_in
    higher = value
    while higher <= d_in and d_in % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and d_in % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def oft_layout(d_in: int, r: int, block_size: int) -> tuple[int, int]:
    """(blocks, block size) peft uses for a target with ``d_in`` inputs."""
    if r == 0:
        block_size = adjusted(d_in, block_size)
        return d_in // block_size, block_size
    r = adjusted(d_in, r)
    return r, d_in // r


class Oft(pt.PeftTunerMethod):
    name = "oft"
    display_name = "OFT"
    family = "orthogonal"
    summary = "orthogonal fine-tuning: block-diagonal rotations (Qiu et al. 2023)"
    order = 120
    fields = OftFields
    mergeable = True
    unsupported = {"quantized_base": pt.NO_4BIT}

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import OFTConfig

        return OFTConfig(task_type=pt.peft_task_type(model_kind), r=cfg.r, oft_block_size=cfg.oft_block_size,
                         module_dropout=cfg.module_dropout, coft=cfg.coft, eps=cfg.eps, block_share=cfg.block_share,
                         use_cayley_neumann=cfg.use_cayley_neumann, target_modules=pt.model_targets(model, cfg),
                         **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields

        def tensors(d_in: int, d_out: int) -> list[int]:
            blocks, size = oft_layout(d_in, f["r"], f["oft_block_size"])
            return [(1 if f["block_share"] else blocks) * size * (size - 1) // 2]

        total, largest = pt.count_tensors(arch, f, tensors)
        # Each target rotates its input before the frozen weight: the rotated input is saved for backward.
        per_token = sum(pt.act_bytes(plan_input) * d_in for d_in, _ in pt.plan_targets(arch, f).values())
        return PlanTerms(trainable_params=total, largest_trainable=largest,
                         activation_bytes_per_token_layer=per_token,
                         notes=("oft: activations approximate (the rotated input of each target)",))


OFT = register(Oft())
