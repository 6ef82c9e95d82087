"""FSDP2 for peftlab's loop: shard a model with ``torch.distributed.fsdp.fully_shard``, gather it back, and write
and read sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

Sharding: every decoder layer (the model's ``_no_split_modules`` classes) is one FSDP unit, resharded after its
forward, then the HF model itself is the root unit (embeddings, final norm and LM head, which FSDP2 keeps unsharded
from forward through backward). For a peft model the root is the base model inside the PeftModel: peft's wrappers
hold no parameters, and generation (``PeftModel.generate`` -> ``base.generate`` -> ``base.forward``) then runs
through the root's hooks.

Gradient reduction: peftlab scales each rank's loss so that the *average* over ranks is the gradient of the global
mean (as DDP does). FSDP2 is told to reduce with SUM followed by a division by the world size instead of
``ReduceOp.AVG``: under gloo, AVG returned summed gradients in some torch releases (pytorch issue #162338), and
SUM-then-divide is correct on every backend. ``tests/test_fsdp.py`` checks the result against one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from peftlab.errors import UserError
from peftlab.precision import Precision


def ensure_process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size), starting a one-process group when none runs (FSDP2 needs one even alone)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def mixed_precision_policy(precision: Precision):
    """FSDP2's policy for a precision: bf16 all-gathers and compute with fp32 reduction under bf16-mixed.

    fp32 and bf16-true need none: their parameters are already in the compute dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.needs_fp32_master:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_root(model: nn.Module) -> nn.Module:
    """The module FSDP2's root unit wraps: the HF model (inside a PeftModel, its base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(root: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: instances of the classes it declares in ``_no_split_modules``."""
    names = set(getattr(root, "_no_split_modules", None) or ())
    layers = [m for m in root.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"--strategy fsdp: {type(root).__name__} declares no decoder layer classes "
                        "(_no_split_modules), so peftlab cannot tell what to shard; use --strategy ddp")
    return layers


def shard_model(model: nn.Module, precision: Precision, device: torch.device) -> nn.Module:
    """Apply ``fully_shard`` per decoder layer and to the root, in place; returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    _, world = ensure_process_group(device)
    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision_policy(precision)
    root = shard_root(model)
    for layer in decoder_layers(root):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # SUM, then / world: see the module docstring
    return model


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU (empty on the other ranks); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
