"""Each new method plans the built-in decoders with its default fields (and BOFT's CUDA layout), without loading
a model: counts are positive, the largest tensor is part of them, and every note says it is approximate."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

NEW_METHODS = ("loha", "lokr", "oft", "boft", "vera", "adalora", "fourierft", "ln_tuning", "prompt_tuning",
               "p_tuning")


def _builtin_archs():
    try:
        from peftlab.plan.arch import BUILTIN_ARCHS
    except ImportError:  # before the planner became a package
        from peftlab.plan import BUILTIN_ARCHS
    return BUILTIN_ARCHS


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", NEW_METHODS)
def test_new_method_plans_builtin_archs(name, device):
    from peftlab.methods import METHODS

    importlib.import_module(f"peftlab.methods.{name}")
    method = METHODS[name]
    assert method.not_planned is None
    for arch in _builtin_archs().values():
        inp = SimpleNamespace(fields=method.fields().model_dump(), dtype="bfloat16", device=device, batch_size=4,
                              seq_len=128, dropout=0.1)
        terms = method.plan_terms(arch, inp)
        assert 0 < terms.largest_trainable <= terms.trainable_params < arch.total_params() // 10, arch.name
        assert terms.activation_bytes_fixed >= 0 and terms.activation_bytes_per_token_layer >= 0
        assert terms.notes and all("approximate" in note for note in terms.notes)


def test_lora_sized_counts_on_llama2():
    """Spot checks on Llama-2-7B (q/v targets, 32 layers, 4096 wide) against the papers' arithmetic."""
    from peftlab.methods.loha import LOHA
    from peftlab.methods.vera import VERA

    arch = _builtin_archs()["Llama-2-7B"]

    def count(method, **fields):
        return method.plan_terms(arch, SimpleNamespace(fields=method.fields(**fields).model_dump(), dtype="float32",
                                                       device="cpu", batch_size=1, seq_len=8)).trainable_params

    assert count(LOHA, r=8) == 32 * 2 * 2 * 8 * (4096 + 4096)  # two rank-8 pairs per target
    assert count(VERA, r=256) == 32 * 2 * (4096 + 256)  # lambda_b (out) and lambda_d (r) per target
