"""Measurements: wall time, peak memory (CPU RSS and CUDA), and model sizes. Definitions are in the README."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

GB = 1024**3


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux)."""
    kb = _proc_status_kb("VmRSS")
    return kb * 1024 if kb is not None else None


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the process started or since the last :func:`reset_peak_rss` (Linux)."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kb * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS by writing 5 to /proc/self/clear_refs. False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class PhasePeak:
    """Peak memory of one phase (load or train)."""

    cpu_peak_rss_gb: float | None = None
    cuda_max_allocated_gb: float | None = None
    cuda_max_reserved_gb: float | None = None
    rss_reset_ok: bool | None = None


@dataclass
class MemoryMeter:
    """Peak memory per phase: on CPU the process's RSS high-water mark, on CUDA allocated and reserved."""

    device: torch.device
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    _current: str | None = None
    _reset_ok: bool = False

    def start(self, phase: str) -> None:
        """Begin a phase: reset the peaks so that it is measured on its own."""
        self._current = phase
        self._reset_ok = reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # blocks freed earlier (the load's temporaries) would otherwise stay reserved and set this phase's
            # reserved peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> PhasePeak:
        """End the current phase and record its peaks."""
        peak = PhasePeak(rss_reset_ok=self._reset_ok)
        rss = peak_rss_bytes()
        peak.cpu_peak_rss_gb = rss / GB if rss is not None else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak.cuda_max_allocated_gb = torch.cuda.max_memory_allocated(self.device) / GB
            peak.cuda_max_reserved_gb = torch.cuda.max_memory_reserved(self.device) / GB
        assert self._current is not None, "stop() without start()"
        self.phases[self._current] = peak
        self._current = None
        return peak

    def headline_gb(self, phase: str = "train") -> float | None:
        """The figure for a results table: CUDA max reserved on GPU, peak RSS on CPU."""
        peak = self.phases.get(phase)
        if peak is None:
            return None
        return peak.cuda_max_reserved_gb if self.device.type == "cuda" else peak.cpu_peak_rss_gb


class Stopwatch:
    """Accumulates wall time over several start/stop intervals (synchronizing CUDA)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.total = 0.0
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Total so far, including the running interval."""
        running = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return self.total + running

    def stop(self) -> float:
        self._sync()
        assert self._t0 is not None, "stop() without start()"
        elapsed = time.perf_counter() - self._t0
        self.total += elapsed
        self._t0 = None
        return elapsed


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (4-bit weights counted by their logical size), and the percentage."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 8 * param.element_size() // 4  # 4-bit values packed into the storage dtype (uint8 or bf16)
        total += n
        if param.requires_grad:
            trainable += n
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0}


def folder_size_bytes(path: Path) -> int:
    """Bytes of all files under a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

