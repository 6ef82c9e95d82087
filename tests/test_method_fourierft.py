"""FourierFT: trains, reloads with identical logits, planned exactly, fields validated."""

from __future__ import annotations

import pytest
from method_kit import StandInCfg, arch_of, check_method, check_traits, plan_input, tiny_base

from peftlab.errors import UserError
from peftlab.methods.fourierft import FOURIERFT


def test_fourierft_trains_reloads_and_is_planned(tmp_path):
    check_method(FOURIERFT, tmp_path, n_frequency=200, scaling=100.0)


def test_fourierft_too_many_frequencies_is_one_line():
    base = tiny_base()
    cfg = StandInCfg(FOURIERFT, n_frequency=5000)  # v_proj of tiny-llama has 64 x 32 = 2048 weights
    with pytest.raises(UserError, match="n_frequency"):
        FOURIERFT.plan_terms(arch_of(base), plan_input(cfg))
    with pytest.raises(UserError, match="fourierft"):
        FOURIERFT.apply(base, cfg, "causal_lm", [])


def test_fourierft_traits_and_fields():
    check_traits(FOURIERFT, "FourierFT", "r", {"n_frequency": 0, "scaling": -1.0})
    assert FOURIERFT.mergeable and FOURIERFT.fields().n_frequency == 1000
