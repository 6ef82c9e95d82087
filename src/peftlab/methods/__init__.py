"""The registry of fine-tuning methods. Adding one means adding a module that calls :func:`register`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.methods.targets import TARGET_ALIASES, linear_module_names, resolve_targets  # noqa: F401

#: Config fields that belong to one method or another; a method rejects those it does not take.
METHOD_FIELDS = frozenset({"r", "alpha", "dropout", "target_modules", "bias", "loraplus_lr_ratio",
                           "num_virtual_tokens", "quant_type", "double_quant"})

@dataclass(frozen=True)
class Method:
    """How one fine-tuning method turns a loaded base model into the model to train."""

    name: str
    fields: frozenset[str]
    apply: Callable[..., nn.Module]
    summary: str
    quantized_base: bool = False
    mergeable: bool = False
    is_peft: bool = True
    make_optimizer: Callable[..., torch.optim.Optimizer] | None = field(default=None)
    #: The adapter's initialisation changes the base weights (PiSSA): save the initial adapter before training
    #: (adapters.save_initial_adapter) and convert at save time (adapters.adapter_save_kwargs), so that the saved
    #: adapter is a plain LoRA that loads onto the original base.
    converts_at_save: bool = False


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry under its name."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


# Importing the modules registers their methods.
from peftlab.methods import adapters, full  # noqa: E402,F401
