"""BOFT: trains, reloads with identical logits, planned exactly, its layout rule validated."""

from __future__ import annotations

import pytest
from method_kit import check_method, check_traits
from pydantic import ValidationError

from peftlab.errors import UserError
from peftlab.methods.boft import BOFT, boft_layout


def test_boft_trains_reloads_and_is_planned(tmp_path):
    check_method(BOFT, tmp_path, boft_block_size=8, target_modules=["q_proj", "v_proj"])


def test_boft_by_block_count_is_planned(tmp_path):
    check_method(BOFT, tmp_path, boft_block_num=4, boft_n_butterfly_factor=2)


def test_boft_layout_rule():
    assert BOFT.fields(boft_block_num=8).boft_block_size == 0
    with pytest.raises(ValidationError):
        BOFT.fields(boft_block_size=4, boft_block_num=8)
    with pytest.raises(UserError, match="boft_block_size"):
        boft_layout(100, 8, 0)


def test_boft_traits_and_fields():
    check_traits(BOFT, "BOFT", "r", {"boft_block_size": -4, "boft_dropout": 1.5, "boft_n_butterfly_factor": 0})
    assert BOFT.mergeable
