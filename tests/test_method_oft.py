"""OFT: trains, reloads with identical logits, planned exactly, its r/oft_block_size rule validated."""

from __future__ import annotations

import pytest
from method_kit import check_method, check_traits
from pydantic import ValidationError

from peftlab.methods.oft import OFT, oft_layout


def test_oft_trains_reloads_and_is_planned(tmp_path):
    check_method(OFT, tmp_path, oft_block_size=16, target_modules=["q_proj", "v_proj", "o_proj"])


def test_oft_by_blocks_is_planned(tmp_path):
    check_method(OFT, tmp_path, r=4, block_share=True)


def test_oft_layout_rule():
    assert OFT.fields(r=4).oft_block_size == 0  # --r alone: block size gives way
    assert OFT.fields().model_dump()["oft_block_size"] == 32
    with pytest.raises(ValidationError):
        OFT.fields(r=4, oft_block_size=16)
    with pytest.raises(ValidationError):
        OFT.fields(oft_block_size=0)
    assert oft_layout(576, 0, 32) == (18, 32)
    assert oft_layout(100, 0, 32) == (4, 25)  # peft adjusts the block size to the nearest divisor


def test_oft_traits_and_fields():
    check_traits(OFT, "OFT", "alpha", {"oft_block_size": -1, "module_dropout": 1.0, "eps": 0})
    assert OFT.mergeable and not OFT.shows_rank
