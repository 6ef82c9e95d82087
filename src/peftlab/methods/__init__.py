"""The registry of fine-tuning methods: one module per method, each registering one :class:`Method`.

Adding a method means writing its module (a :class:`~peftlab.methods.base.Method` subclass, registered with
:func:`register`) and adding its module name to :data:`METHOD_MODULES`. Importing this package imports neither
torch nor peft: methods import them inside ``apply`` and friends.
"""

from __future__ import annotations

import importlib

from peftlab.errors import UserError
from peftlab.methods.base import Method, MethodFields, PlanTerms  # noqa: F401

METHODS: dict[str, Method] = {}


def register(method):
    """Add a method to the registry under its name: an instance, or a class (then usable as a class decorator)."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method):
        raise TypeError(f"register() takes a Method subclass or instance, not {type(instance).__name__}")
    METHODS[instance.name] = instance
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Registered method names in table order."""
    return [m.name for m in sorted(METHODS.values(), key=lambda m: (m.order, m.name))]


def all_method_fields() -> frozenset[str]:
    """Every field some registered method takes (a field of another method is rejected by name, not as unknown)."""
    return frozenset().union(*(m.field_names() for m in METHODS.values()))


#: The method modules, imported in this order; importing one registers its method. A new method: one line here.
METHOD_MODULES = (
    "full",
    "lora",
    "rslora",
    "dora",
    "pissa",
    "loraplus",
    "qlora",
    "ia3",
    "prefix",
    "loha",
    "lokr",
    "oft",
    "boft",
    "vera",
    "adalora",
    "fourierft",
    "ln_tuning",
    "prompt_tuning",
    "p_tuning",
)

for _module in METHOD_MODULES:
    importlib.import_module(f"peftlab.methods.{_module}")

#: Config fields that belong to one method or another.
METHOD_FIELDS = all_method_fields()
