"""How the processes of a run share the model: a registry of strategies, each owning its traits and steps.

- ``ddp``: every process holds the whole model; gradients are all-reduced (PyTorch DDP through accelerate).
- ``fsdp``: PyTorch FSDP2 (``fully_shard``, :mod:`peftlab.fsdp`); parameters, gradients and optimizer states are
  sharded over the processes; checkpoints are sharded with ``torch.distributed.checkpoint``.

The loop asks the run's strategy to wrap the model, to open each micro-batch, to save and load checkpoints and to
save the final artefact; it never tests the strategy's name.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.errors import UserError


class Strategy:
    """Data parallelism with a full copy per process (DDP); also the one-process case."""

    name: ClassVar[str] = "ddp"
    shards: ClassVar[bool] = False  # parameters are split over the processes (each holds a part)
    summary: ClassVar[str] = "a full copy of the model per process; gradients all-reduced (PyTorch DDP)"

    def check(self, method: Any, device: torch.device) -> None:
        """Refuse, in one line, a method or device this strategy cannot train (before the model loads)."""

    def shard(self, model: nn.Module, precision: Any, device: torch.device) -> nn.Module:
        """Called before the optimizer is built (FSDP shards here, so the optimizer sees the shards)."""
        return model

    def prepare(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Called after the optimizer is built and a checkpoint is loaded: DDP wraps through accelerate."""
        return accelerator.prepare(model, optimizer)

    def micro_batch(self, accelerator, model: nn.Module, last: bool):
        """The context of one micro-batch's forward and backward: no gradient sync before the step's last."""
        return nullcontext() if last else accelerator.no_sync(model)

    def save_checkpoint(self, accelerator, run_dir: Path, state, model: nn.Module, optimizer, scheduler, cfg,
                        best: dict[str, Any] | None) -> None:
        from peftlab.checkpoint import save_checkpoint

        if accelerator.is_main_process:  # every rank holds the same weights: rank 0 writes them
            save_checkpoint(run_dir, state, accelerator.unwrap_model(model), optimizer.optimizer
                            if hasattr(optimizer, "optimizer") else optimizer, scheduler, cfg, cfg.keep_last, best,
                            accelerator.num_processes)
        accelerator.wait_for_everyone()

    def final_state_dict(self, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """The state dict to save the final model or adapter from (None: the model's own)."""
        return None


class FullySharded(Strategy):
    """PyTorch FSDP2: each process holds 1/N of the parameters, gradients and optimizer states."""

    name = "fsdp"
    shards = True
    summary = "PyTorch FSDP2: parameters, gradients and optimizer states sharded over the processes"

    def check(self, method: Any, device: torch.device) -> None:
        method.check_supports("fsdp")
        if method.quantizes_base:
            raise UserError(f"--strategy fsdp with method {method.name!r} is refused: FSDP2 turns 4-bit weights "
                            "into plain sharded tensors and loses their quantization state (bitsandbytes issue "
                            "#1945 reports wrong outputs even on one process); use --strategy ddp, or lora with "
                            "--strategy fsdp")

    def shard(self, model: nn.Module, precision: Any, device: torch.device) -> nn.Module:
        from peftlab.fsdp import shard_model

        return shard_model(model, precision, device)

    def prepare(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer  # sharded already; accelerate would wrap it in DDP

    def micro_batch(self, accelerator, model: nn.Module, last: bool):
        # Gradients are reduce-scattered after every micro-batch: accumulating them unsharded would hold a full
        # gradient copy per process, the memory FSDP exists to save.
        return nullcontext()

    def save_checkpoint(self, accelerator, run_dir: Path, state, model: nn.Module, optimizer, scheduler, cfg,
                        best: dict[str, Any] | None) -> None:
        from peftlab.checkpoint import save_sharded_checkpoint

        save_sharded_checkpoint(run_dir, state, model, optimizer, scheduler, cfg, cfg.keep_last, best,
                                accelerator.is_main_process, accelerator.num_processes, accelerator.wait_for_everyone)

    def final_state_dict(self, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        from peftlab.fsdp import full_state_dict

        return full_state_dict(model, trainable_only)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Strategy(), FullySharded())}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UserError(f"--strategy {name!r}: expected one of {', '.join(STRATEGIES)}") from None
