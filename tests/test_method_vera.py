"""VeRA: trains, reloads with identical logits (projections saved), planned exactly, takes r."""

from __future__ import annotations

from method_kit import check_method, check_traits

from peftlab.methods.vera import VERA


def test_vera_trains_reloads_and_is_planned(tmp_path):
    model = check_method(VERA, tmp_path, r=8)
    assert model.peft_config["default"].r == 8


def test_vera_planned_for_wider_targets(tmp_path):
    check_method(VERA, tmp_path, r=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def test_vera_traits_and_fields():
    check_traits(VERA, "VeRA", "alpha", {"r": 0, "vera_dropout": 1.0, "d_initial": 0})
    assert "r" in VERA.field_names()  # --method vera --r 8 is accepted
    assert VERA.fields().r == 256 and VERA.mergeable
    assert VERA.run_id_part({"r": 8}) == "-r8"
