"""Shared by the peft tuner methods added one module each (LoHa, LoKr, OFT, BOFT, VeRA, AdaLoRA, FourierFT, ...).

A :class:`PeftTunerMethod` builds one peft config (``peft_config``) and wraps the model with ``get_peft_model``;
the helpers here map a task kind to peft's task type, pass new head modules as ``modules_to_save``, resolve
targets on a model and on the planner's shapes, and count per-target tensors for the planner. No torch or peft at
import time (like :mod:`peftlab.methods.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from peftlab.errors import UserError
from peftlab.methods.base import Method
from peftlab.methods.fields import TargetFields

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: What prompt-learning methods cannot do, shared by Prompt Tuning and P-Tuning.
PROMPT_UNSUPPORTED = {
    "merge": "cannot be merged: its virtual tokens are inputs, not weights; use the adapter with the base",
    "packing": "does not work with packing (its virtual tokens break the per-example masks); "
               "use --set packing=false",
}
#: What the weight-adapter methods added here cannot do (peft has no 4-bit layers for them).
NO_4BIT = "has no 4-bit (bitsandbytes) layers in peft; use a full-precision base"


class RankAlphaFields(TargetFields):
    """A rank and its scaling alpha / r, as in LoRA (LoHa, LoKr), with the seed's defaults."""

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (scaling = alpha / r).")


def peft_task_type(model_kind: str) -> Any:
    """peft's TaskType for a task kind ("causal_lm" or "seq_cls")."""
    from peft import TaskType

    kinds = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS}
    if model_kind not in kinds:
        raise UserError(f"task kind {model_kind!r}: peft methods support {', '.join(kinds)}")
    return kinds[model_kind]


def save_modules(new_modules: list[str]) -> dict[str, Any]:
    """``modules_to_save`` for the new (head) modules, when there are any."""
    return {"modules_to_save": list(new_modules)} if new_modules else {}


def model_targets(model: nn.Module, cfg: Any) -> list[str]:
    """The run's target modules, checked against the model's linear layers (default q/v names mapped)."""
    from peftlab.methods.targets import resolve_targets

    return resolve_targets(model, list(cfg.target_modules), cfg.is_set("target_modules"))


def plan_targets(arch: Any, fields: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each targeted per-layer linear module of the planner's decoder."""
    shapes = arch.linear_shapes()
    targets = list(fields.get("target_modules") or ())
    wrong = [t for t in targets if t not in shapes]
    if wrong:
        raise UserError(f"target_modules: the planner's model has no linear module named {', '.join(wrong)}; "
                        f"its per-layer linear modules are {', '.join(shapes)}")
    return {t: shapes[t] for t in targets}


def count_tensors(arch: Any, fields: dict[str, Any], tensors_of) -> tuple[int, int]:
    """(total elements, the largest tensor) when each target holds ``tensors_of(in, out)`` (a list of sizes)."""
    sizes = [tensors_of(d_in, d_out) for d_in, d_out in plan_targets(arch, fields).values()]
    total = arch.num_layers * sum(sum(s) for s in sizes)
    return total, max((max(s) for s in sizes if s), default=0)


def act_bytes(plan_input: Any) -> int:
    """Bytes per activation element at the run's dtype."""
    return DTYPE_BYTES.get(getattr(plan_input, "dtype", "float32"), 4)


class PeftTunerMethod(Method):
    """A method that is one peft config wrapped around the model by ``get_peft_model``."""

    def peft_config(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: list[str]) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: list[str]) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(model, cfg, model_kind, new_modules)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:  # peft's shape checks (e.g. a block size that does not divide): one line
            raise UserError(f"method {self.name!r}: {str(exc).splitlines()[0]}") from None
