"""BOFT: orthogonal fine-tuning with butterfly-factorised rotations (Liu et al. 2024)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from peftlab.methods import peft_tuners as pt
from peftlab.methods import register
from peftlab.methods.base import PlanTerms
from peftlab.methods.fields import TargetFields


class BoftFields(TargetFields):
    """BOFT's block layout (exactly one of boft_block_size and boft_block_num, as peft requires)."""

    boft_block_size: int = Field(4, ge=0, description="Size of each rotation block (0: set by boft_block_num).")
    boft_block_num: int = Field(0, ge=0, description="Number of rotation blocks (0: set by boft_block_size).")
    boft_n_butterfly_factor: int = Field(1, ge=1, description="Butterfly factors (1: block-diagonal, as OFT); peft "
                                         "uses 1 without its CUDA extension, e.g. on CPU.")
    boft_dropout: float = Field(0.0, ge=0, lt=1, description="Multiplicative dropout of whole blocks.")

    @model_validator(mode="before")
    @classmethod
    def _one_layout(cls, data: Any) -> Any:
        # Setting only the block count means the default block size gives way (peft takes one of them).
        if isinstance(data, dict) and data.get("boft_block_num") and "boft_block_size" not in data:
            data = dict(data, boft_block_size=0)
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> BoftFields:
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError("set exactly one of boft_block_size and boft_block_num; the other must be 0")
        return self


def boft_layout(d_in: int, block_size: int, block_num: int) -> tuple[int, int]:
    """(blocks, block size) of a target with ``d_in`` inputs; peft raises when they do not divide it."""
    from peftlab.errors import UserError

    field, value = ("boft_block_num", block_num) if block_size == 0 else ("boft_block_size", block_size)
    if d_in % value:
        raise UserError(f"{field}: {value} does not divide a target's {d_in} input features; choose a divisor")
    return (block_num, d_in // block_num) if block_size == 0 else (d_in // block_size, block_size)


class Boft(pt.PeftTunerMethod):
    name = "boft"
    display_name = "BOFT"
    family = "orthogonal"
    summary = "butterfly orthogonal fine-tuning (Liu et al. 2024)"
    order = 130
    fields = BoftFields
    mergeable = True
    unsupported = {"quantized_base": pt.NO_4BIT}

    def peft_config(self, model, cfg, model_kind, new_modules):
        from peft import BOFTConfig

        return BOFTConfig(task_type=pt.peft_task_type(model_kind), boft_block_size=cfg.boft_block_size,
                          boft_block_num=cfg.boft_block_num, boft_n_butterfly_factor=cfg.boft_n_butterfly_factor,
                          boft_dropout=cfg.boft_dropout, target_modules=pt.model_targets(model, cfg),
                          **pt.save_modules(new_modules))

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        f = plan_input.fields
        # Without peft's CUDA extension (always so on CPU) BOFT falls back to one butterfly factor.
        factors = f["boft_n_butterfly_factor"] if getattr(plan_input, "device", "cpu") == "cuda" else 1

        def tensors(d_in: int, d_out: int) -> list[int]:
            blocks, size = boft_layout(d_in, f["boft_block_size"], f["boft_block_num"])
            return [factors * blocks * size * size, d_out]  # boft_R and the output scale boft_s

        total, largest = pt.count_tensors(arch, f, tensors)
        # Per target: the dense permutation buffers (factors x in x in, fp32), the rotation products kept for
        # backward (about two per factor) and the rotated dense weight.
        fixed = sum(4 * (3 * factors * d_in * d_in + d_in * d_out) for d_in, d_out in pt.plan_targets(arch, f).values())
        return PlanTerms(trainable_params=total, largest_trainable=largest,
                         activation_bytes_fixed=arch.num_layers * fixed,
                         notes=("boft: activations approximate (dense butterfly permutations and rotations per "
                                "target, counted with the activations); on CUDA without peft's BOFT extension "
                                "it uses one butterfly factor",))


BOFT = register(Boft())
