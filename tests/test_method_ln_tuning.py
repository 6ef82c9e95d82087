"""LN Tuning: trains, reloads with identical logits, planned exactly, takes no rank."""

from __future__ import annotations

import pytest
from method_kit import StandInCfg, check_method, check_traits, tiny_base

from peftlab.errors import UserError
from peftlab.methods.ln_tuning import LN_TUNING, resolve_norms


def test_ln_tuning_trains_reloads_and_is_planned(tmp_path):
    model = check_method(LN_TUNING, tmp_path)
    assert set(model.peft_config["default"].target_modules) == {"input_layernorm", "post_attention_layernorm", "norm"}


def test_ln_tuning_some_norms_is_planned(tmp_path):
    check_method(LN_TUNING, tmp_path, target_modules="input_layernorm")


def test_ln_tuning_targets_must_be_norms():
    base = tiny_base()
    with pytest.raises(UserError, match="target_modules: the model has no normalisation module named q_proj"):
        LN_TUNING.apply(base, StandInCfg(LN_TUNING, target_modules=["q_proj"]), "causal_lm", [])
    assert resolve_norms(base, ["LayerNorm"], user_set=False) == ["input_layernorm", "norm",
                                                                  "post_attention_layernorm"]


def test_ln_tuning_traits_and_fields():
    check_traits(LN_TUNING, "LN Tuning", "r", {"target_modules": []})
    assert LN_TUNING.fields(target_modules="norm").target_modules == ["norm"]
    assert LN_TUNING.mergeable and not LN_TUNING.shows_rank
