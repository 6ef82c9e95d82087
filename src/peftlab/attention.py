"""Attention in fp32 for bf16 runs on CPU.

PyTorch's CPU flash-attention kernel is several times slower backward in bf16 than in fp32 (smollm2-135m, 4 x 128
tokens, 2 threads: 0.28 s against 0.055 s per micro-batch), while the projections around it gain from bf16. So under a
bf16 precision on CPU, attention runs through :func:`sdpa_fp32`: transformers' own SDPA path on fp32 copies of q, k
and v, its output cast back. CUDA keeps bf16 attention (its flash kernels are fast in bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.precision import Precision

NAME = "peftlab_sdpa_fp32"
_registered = False


def sdpa_fp32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention computed in fp32 (autocast off inside), returned in the query's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def register() -> None:
    """Make ``peftlab_sdpa_fp32`` a transformers attention implementation (once per process)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, sdpa_fp32)
        _registered = True


def use_fp32_attention(model: nn.Module, precision: Precision, device: torch.device, enabled: bool) -> bool:
    """Switch a model that uses SDPA to fp32 attention under a bf16 precision on CPU; True if it was switched."""
    config = getattr(model, "config", None)
    if not (enabled and precision.is_bf16 and device.type == "cpu"):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):  # a model without transformers' attention interface keeps its own SDPA
        return False
    return True
