"""The CUDA paths read against their libraries (issue 24), checked on CPU: the load path's dtypes, the QLoRA + FSDP
refusal, one-rank FSDP's process group, RNG state on resume with fewer GPUs, the loss's host syncs, and the
benchmark contenders without TRL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from peftlab import models
from peftlab.configure import load_config
from peftlab.models import load_model, resolve_model_source
from tests.conftest import tiny_overrides


def bf16_checkpoint(tmp_path: Path) -> Path:
    """tiny-llama saved in bf16 (as most released LLMs are), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    src = Path(resolve_model_source("tiny-llama"))
    dst = tmp_path / "tiny-llama-bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, dst / f.name)
    return dst


def linear_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {m.weight.dtype for m in model.modules() if type(m) is nn.Linear
            and m.weight is not model.get_input_embeddings().weight}


def test_bf16_checkpoint_loads_without_an_fp32_copy_of_its_linears(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = bf16_checkpoint(tmp_path)
    assert models.stored_float_dtypes(str(folder)) == {"BF16"}
    loaded_dtypes: list[set[torch.dtype]] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded_dtypes.append(linear_dtypes(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = load_config(None, tiny_overrides(tmp_path, model=str(folder), precision="bf16-mixed"))
    direct = load_model(cfg).model
    assert loaded_dtypes == [{torch.bfloat16}]  # the linears came off the file in bf16, never in fp32
    # the same tensors as the fp32 load-then-cast path
    monkeypatch.setattr(models, "stored_float_dtypes", lambda *a, **k: set())
    via_fp32 = load_model(cfg).model
    assert loaded_dtypes[-1] == {torch.float32}
    a, b = direct.state_dict(), via_fp32.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert direct.get_input_embeddings().weight.dtype == torch.float32
    assert linear_dtypes(direct) == {torch.bfloat16}


def test_fp32_checkpoint_casts_before_moving_to_the_device(tmp_path, monkeypatch):
    """The move to the device comes after the bf16 cast, so the GPU never holds the fp32 linears."""
    at_move: list[set[torch.dtype]] = []
    original = nn.Module.to

    def spy(self, *args, **kwargs):
        if hasattr(self, "get_input_embeddings") and args and isinstance(args[0], torch.device):
            at_move.append(linear_dtypes(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    cfg = load_config(None, tiny_overrides(tmp_path, precision="bf16-mixed"))
    load_model(cfg)
    assert at_move == [{torch.bfloat16}]
