"""What a fine-tuning method is: the contract every module in ``peftlab.methods`` implements.

A method module defines one :class:`Method` subclass and registers one instance of it. The instance owns
everything about the method: its config fields (a pydantic model), its traits (display name, family, what it
cannot do), how it is applied to a loaded model, its optimizer if it has its own, a hook into the loop, and its
planner terms. Code outside ``peftlab.methods`` asks a method for these and never compares its name.

This module imports neither torch nor peft at import time, so config validation and reports can read a method's
fields and traits cheaply; ``apply`` and the planner terms import what they need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from peftlab.errors import UserError

if TYPE_CHECKING:  # typing only: no torch at import time
    from torch import nn, optim

#: Capabilities a method may lack; ``Method.unsupported`` maps each one it lacks to the reason (one line).
#: "causal_lm" and "classification" are the two task kinds (a method that cannot train one says so).
CAPABILITIES = ("merge", "packing", "quantized_base", "classification", "causal_lm", "fsdp", "bf16_true")
#: Bytes per element of the run dtypes the planner models.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def peft_task_type(model_kind: str) -> str:
    """peft's TaskType value for a task kind ("causal_lm" -> "CAUSAL_LM", "seq_cls" -> "SEQ_CLS")."""
    return model_kind.upper()


def plan_targets(arch: Any, plan_input: Any, default: Sequence[str] | None = None) -> list[str]:
    """The per-layer modules a method adapts in the planner: the run's target_modules (or ``default`` when the
    user kept the default targets), each checked against the planner's per-layer linear modules."""
    fields = plan_input.fields
    targets = list(default) if default is not None and "target_modules" not in plan_input.user_set \
        else list(fields["target_modules"])
    known = arch.linear_shapes()
    wrong = [t for t in targets if t not in known]
    if wrong:
        raise UserError(f"target_modules: the planner's model has no linear module named {', '.join(wrong)}; "
                        f"its per-layer linear modules are {', '.join(known)}")
    return targets


class MethodFields(BaseModel):
    """A method's own config fields, with defaults and help (``Field(..., description=...)``).

    Subclass it per method (or share a subclass between methods with the same fields). The flat spelling stays:
    ``--r 8`` / ``r: 8`` in YAML sets the field ``r`` of the chosen method's fields model.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class PlanTerms:
    """What a method adds to the memory plan (bytes, except the counts).

    ``trainable_params`` and ``largest_trainable`` (elements), the frozen ``base_weight_bytes``, the extra bytes it
    saves for backward per token and layer (``activation_bytes_per_token_layer``) and once per micro-batch
    (``activation_bytes_fixed``), and notes shown with the plan.
    """

    trainable_params: int
    largest_trainable: int
    base_weight_bytes: int | None = None  # None: the base at the run's dtype (the planner's default)
    trainable_bytes_per_param: int = 4
    activation_bytes_per_token_layer: int = 0
    activation_bytes_fixed: int = 0
    notes: tuple[str, ...] = ()
    activation_bytes_per_token_head: int = 0  # extra bytes saved per token at the head (full: the head's inputs)
    gradients_held_bytes: int | None = None  # gradients held at the forward/backward peak (None: all of them)
    # bf16 copies of fp32 trainable weights that autocast keeps through forward/backward; under FSDP the
    # all-gathered bf16 parameters take their place, so the planner counts them only without sharding
    autocast_copy_bytes: int = 0


class Method:
    """One fine-tuning method. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # registry key and CLI spelling, lowercase as peft names it
    display_name: ClassVar[str]  # as in the seed's tables: "LoRA", "QLoRA", "Full"
    family: ClassVar[str]  # "full", "lora", "ia3", "prompt" ...: methods of one family share table columns
    summary: ClassVar[str]  # one line, with the reference
    order: ClassVar[int]  # position in tables and plots (stable across runs)
    fields: ClassVar[type[MethodFields]] = MethodFields
    is_peft: ClassVar[bool] = True  # saved as a peft adapter (False: the whole model is saved)
    quantizes_base: ClassVar[bool] = False  # the base is loaded in 4-bit
    mergeable: ClassVar[bool] = False  # the adapter folds into the base weights
    converts_at_save: ClassVar[bool] = False  # the initial adapter is kept to convert at save time (PiSSA)
    shows_rank: ClassVar[bool] = False  # the (r, alpha) column and the run id show r and alpha
    optimizer_is_fused: ClassVar[bool] = True  # the loop's fused AdamW applies (False: its own, unfused optimizer)
    unsupported: ClassVar[dict[str, str]] = {}  # capability -> why not (one line, no trailing period)
    #: Before training, the wrapped model computes exactly what its base computes (an update initialised to zero),
    #: so runs of different methods and seeds share one baseline evaluation (``peftlab.baseline``).
    starts_as_base: ClassVar[bool] = False
    #: FSDP2 sharding is built and tested for this method (full and the LoRA family); the others refuse it.
    shards_with_fsdp: ClassVar[bool] = False
    #: Every weight of the model is trained (full fine-tuning): the report measures the other rows' gains against it.
    trains_every_weight: ClassVar[bool] = False

    # --- traits ----------------------------------------------------------------------------------------------

    def field_names(self) -> frozenset[str]:
        return frozenset(self.fields.model_fields)

    def check_supports(self, capability: str) -> None:
        """Raise a one-line UserError if this method cannot do ``capability`` (one of :data:`CAPABILITIES`)."""
        reason = self.unsupported_reasons().get(capability)
        if reason is not None:
            raise UserError(f"method {self.name!r} {reason}")

    def supports(self, capability: str) -> bool:
        return capability not in self.unsupported_reasons()

    def unsupported_reasons(self) -> dict[str, str]:
        """Every capability this method lacks, with its reason (``unsupported`` plus the traits that imply one)."""
        out = dict(self.unsupported)
        if not self.shards_with_fsdp:
            out.setdefault("fsdp", "does not support --strategy fsdp (built for full fine-tuning and the LoRA "
                           "family); use --strategy ddp")
        return out

    def config_label(self, fields: dict[str, Any]) -> str:
        """The seed's "(r, alpha)" cell for a run's method fields, '-' for methods without a rank."""
        if not self.shows_rank:
            return "-"
        return f"({fields['r']}, {float(fields['alpha']):g})"

    def reference_rank(self, fields: dict[str, Any]) -> int | None:
        """How well this config serves as the report's reference row (0 best; None: never), whose difference every
        other row shows: the seed's LoRA (8, 16), else another plain LoRA shape."""
        return None

    def run_id_part(self, fields: dict[str, Any]) -> str:
        """What the method adds to a default run name, e.g. '-r8a16'."""
        if not self.shows_rank:
            return ""
        return f"-r{fields['r']}a{float(fields['alpha']):g}"

    # --- behaviour -------------------------------------------------------------------------------------------

    def task_capability(self, model_kind: str) -> str:
        """The capability name of a task kind ("causal_lm" -> "causal_lm", "seq_cls" -> "classification")."""
        return "classification" if model_kind == "seq_cls" else model_kind

    def apply(self, model: nn.Module, cfg: Any, model_kind: str, new_modules: Sequence[str] = ()) -> nn.Module:
        """Turn the loaded base model into the model to train.

        ``model_kind`` is "causal_lm" or "seq_cls"; ``new_modules`` are the base model's newly initialised modules
        (a classification head) that must be trained and saved with the adapter (peft ``modules_to_save``).
        """
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module, cfg: Any) -> optim.Optimizer | None:
        """The method's own optimizer, or None for the loop's AdamW."""
        return None

    def begin_training(self, model: nn.Module, total_steps: int) -> None:
        """Called once before the first step, when the number of optimizer steps is known."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step, before the gradients are cleared (AdaLoRA's rank allocation)."""

    def before_training_save(self, model: nn.Module, run_dir: Any) -> None:
        """Called once on the writing process after ``apply``, before training (PiSSA saves its initial adapter)."""

    def save_kwargs(self, run_dir: Any) -> dict[str, Any]:
        """Extra ``save_pretrained`` arguments for the final adapter (PiSSA: convert to a plain LoRA)."""
        return {}

    # --- planner ---------------------------------------------------------------------------------------------

    #: Why the planner does not model this method (None: it does, through :meth:`plan_terms`).
    not_planned: ClassVar[str | None] = None

    def plan_terms(self, arch: Any, plan_input: Any) -> PlanTerms:
        """This method's terms of the memory plan for a model's shapes (``peftlab.plan``)."""
        raise NotImplementedError

    #: Training FLOPs per token (PaLM appendix B; N: :meth:`Arch.flop_weights`, T the sequence length, d_attn the
    #: attention width): a frozen weight costs 4 FLOPs per token (forward, and the gradient of the activations),
    #: a trained one 6 (plus its own gradient). What :meth:`train_flops_per_token` computes.
    flops_formula: ClassVar[str] = "4*N + 6*N_trainable + 12*L*T*d_attn"

    def train_flops_per_token(self, arch: Any, plan_input: Any) -> float:
        """Training FLOPs per token of this method on a model's shapes (:attr:`flops_formula`): the frozen base's
        matmuls, the trainable parameters of :meth:`plan_terms` and the attention term."""
        trainable = self.plan_terms(arch, plan_input).trainable_params
        return 4 * arch.flop_weights() + 6 * trainable + arch.attention_flops_per_token(plan_input.seq_len)

    def activation_element_bytes(self, plan_input: Any) -> int:
        """Bytes per saved activation element: the compute dtype's (a 4-bit base computes in it too)."""
        return DTYPE_BYTES[plan_input.dtype]
