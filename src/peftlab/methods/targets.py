"""Adapter targets: the model's linear layers, and the default q/v names mapped across architectures."""

from __future__ import annotations

from torch import nn

from peftlab.errors import UserError

#: Equivalent projection names across architectures, used when the user kept the default targets.
TARGET_ALIASES = {"q_proj": ("query", "q_lin", "c_attn"), "v_proj": ("value", "v_lin")}


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted unique last-name components of the model's linear layers (adapter targets)."""
    names = set()
    for full_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in {"Linear4bit", "Linear8bitLt", "Conv1D"}:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: nn.Module, targets: list[str], user_set: bool) -> list[str]:
    """Check that every target names a linear layer; map the default q/v names for other architectures."""
    available = linear_module_names(model)
    if not user_set:
        targets = [t if t in available else next((a for a in TARGET_ALIASES.get(t, ()) if a in available), t)
                   for t in targets]
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(f"target_modules: the model has no linear module named {', '.join(missing)}; "
                        f"its linear modules are {', '.join(available)}")
    return targets
