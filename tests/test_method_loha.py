"""LoHa: trains, reloads with identical logits, planned exactly, fields validated."""

from __future__ import annotations

from method_kit import check_method, check_traits

from peftlab.methods.loha import LOHA


def test_loha_trains_reloads_and_is_planned(tmp_path):
    model = check_method(LOHA, tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    assert model.peft_config["default"].r == 4


def test_loha_traits_and_fields():
    check_traits(LOHA, "LoHa", "num_virtual_tokens", {"r": 0, "alpha": -1, "rank_dropout": 1.0})
    assert LOHA.mergeable and LOHA.shows_rank
    assert LOHA.config_label(LOHA.fields().model_dump()) == "(8, 16)"
