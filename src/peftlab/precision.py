"""Training precision: what each ``--precision`` means, and what ``auto`` picks on this machine.

* ``fp32``: every weight, activation and optimizer state in float32.
* ``bf16-mixed``: matmuls in bfloat16; trainable weights and optimizer states stay float32. PEFT methods keep the
  frozen base in bf16 (half its memory); full fine-tuning keeps fp32 master weights under autocast.
* ``bf16-true``: every weight and optimizer state in bfloat16 (as torchtune does).
* ``auto``: ``bf16-mixed`` on a CUDA device with bf16 support and on a CPU with native bf16 instructions
  (AVX512-BF16 or AMX), ``fp32`` elsewhere.

The detection is a pure function of the CPU's flags and the CUDA device's answer, so it is tested for both kinds of
machine; :func:`detect` reads them from this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import UserError

PRECISIONS = ("fp32", "bf16-mixed", "bf16-true", "auto")
#: CPU flags (as /proc/cpuinfo spells them) that give native bf16 matrix instructions.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: The old ``--dtype`` spellings, as precisions.
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16-true", "auto": "auto"}


@dataclass(frozen=True)
class Capabilities:
    """What the training device can do in bf16."""

    device: str  # "cpu" | "cuda"
    cpu_flags: frozenset[str] = frozenset()
    cuda_bf16: bool = False
    cuda_name: str | None = None

    @property
    def native_bf16(self) -> str | None:
        """The reason bf16 is native here (a CPU flag or the CUDA device), or None when it is emulated."""
        if self.device == "cuda":
            return f"CUDA device {self.cuda_name or ''} supports bf16".replace("  ", " ") if self.cuda_bf16 else None
        return next((f"CPU has {flag}" for flag in NATIVE_BF16_FLAGS if flag in self.cpu_flags), None)


@dataclass(frozen=True)
class Precision:
    """A resolved precision and why it was chosen (recorded in results.json)."""

    name: str  # fp32 | bf16-mixed | bf16-true
    requested: str
    reason: str
    emulated: bool = False  # bf16 on a CPU without native bf16: works, but slower than fp32

    @property
    def is_bf16(self) -> bool:
        """Matmuls run in bf16 (either bf16 precision)."""
        return self.name != "fp32"

    @property
    def is_bf16_true(self) -> bool:
        """Every weight, gradient and optimizer state is bf16: weights load in bf16, adapters are cast to it."""
        return self.name == "bf16-true"

    @property
    def autocasts(self) -> bool:
        """Forward passes run under bf16 autocast (bf16-mixed), over fp32 trainable weights."""
        return self.name == "bf16-mixed"

    @property
    def needs_fp32_master(self) -> bool:
        """Trainable weights keep fp32 master copies while computing in bf16 (bf16-mixed): FSDP gathers them in
        bf16 and reduces gradients in fp32; the planner counts autocast's bf16 copies."""
        return self.name == "bf16-mixed"

    def stores_base_in_bf16(self, trainable_base: bool) -> bool:
        """A frozen base's matmul weights are cast to bf16 after loading (bf16-mixed; bf16-true loads everything
        in bf16 already, and a trainable base keeps fp32 master weights)."""
        return self.name == "bf16-mixed" and not trainable_base

    def warning(self) -> str | None:
        """A one-line warning for an explicit bf16 run on a CPU that emulates bf16."""
        if not self.emulated:
            return None
        return (f"precision {self.name}: this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)}), so bf16 is "
                "emulated and slower than fp32; use --precision fp32 (or auto) here")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(cpuinfo_path: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name as /proc/cpuinfo gives it, if there is one."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return None


def resolve(requested: str, caps: Capabilities) -> Precision:
    """The precision a run uses, for a requested one (``auto`` or explicit) on a device with these capabilities."""
    if requested not in PRECISIONS:
        raise UserError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    native = caps.native_bf16
    if requested == "auto":
        if native:
            return Precision("bf16-mixed", requested, f"auto: {native}")
        where = "CUDA device has no bf16" if caps.device == "cuda" else "CPU has no native bf16"
        return Precision("fp32", requested, f"auto: {where}")
    if requested == "fp32":
        return Precision("fp32", requested, "requested")
    if caps.device == "cuda" and not caps.cuda_bf16:
        raise UserError(f"precision {requested}: this CUDA device does not support bf16; use --precision fp32")
    return Precision(requested, requested, "requested" + (f" ({native})" if native else ""),
                     emulated=caps.device == "cpu" and native is None)


def named(name: str) -> Precision:
    """A resolved precision by its name (a plan's input, a record's field): its answers, with no device behind it."""
    if name not in PRECISIONS or name == "auto":
        raise UserError(f"precision {name!r}: choose one of {', '.join(p for p in PRECISIONS if p != 'auto')}")
    return Precision(name, name, "named")


def from_dtype(dtype: str) -> str:
    """The precision for an old ``--dtype`` value (kept as an alias)."""
    try:
        return DTYPE_ALIASES[dtype]
    except KeyError:
        raise UserError(f"dtype {dtype!r}: use --precision with one of {', '.join(PRECISIONS)} "
                        f"(--dtype takes {', '.join(DTYPE_ALIASES)})") from None


def detect(device: str, cpuinfo_path: str | Path = "/proc/cpuinfo") -> Capabilities:
    """This machine's capabilities for a device type ("cpu" or "cuda")."""
    if device == "cuda":
        import torch

        return Capabilities("cuda", cuda_bf16=bool(torch.cuda.is_bf16_supported()),
                            cuda_name=torch.cuda.get_device_name(0))
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:  # no /proc (macOS, Windows): no flags, so fp32 under auto
        text = ""
    return Capabilities("cpu", cpu_flags=parse_cpu_flags(text))


def for_device(requested: str, device_type: str) -> Precision:
    """The precision a run uses on this machine's ``device_type`` ("cpu" or "cuda")."""
    return resolve(requested, detect(device_type))


def weight_dtype(precision: Precision):
    """The dtype weights are loaded in: bf16 only under bf16-true (bf16-mixed casts frozen matmul weights after
    loading, see :func:`cast_frozen_matmuls`)."""
    import torch

    return torch.bfloat16 if precision.is_bf16_true else torch.float32


def cast_frozen_matmuls(model, keep: set[str] | frozenset[str] = frozenset()) -> int:
    """bf16-mixed with a frozen base: store the base's linear weights in bf16; return how many were cast.

    Autocast runs those matmuls in bf16 anyway, so storing them in bf16 computes the same and saves the per-step
    casts and half their memory. Everything else stays fp32: embeddings (so the residual stream, the norms and the
    loss stay fp32; bf16 element-wise work is slow on CPUs), a linear head tied to the embeddings, and the modules
    in ``keep`` (newly initialised heads, which are trained).
    """
    import torch
    from torch import nn

    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    cast = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.weight is embedding:
            continue
        if any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in keep):
            continue
        module.to(torch.bfloat16)
        cast += 1
    return cast


def compute_context(precision: Precision, device_type: str):
    """The context a forward pass runs in: bf16 autocast under bf16-mixed, nothing otherwise."""
    from contextlib import nullcontext

    import torch

    if precision.autocasts:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()
