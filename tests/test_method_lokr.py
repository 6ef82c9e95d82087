"""LoKr: trains, reloads with identical logits, planned exactly (both Kronecker shapes), fields validated."""

from __future__ import annotations

from method_kit import check_method, check_traits

from peftlab.methods.lokr import LOKR, kronecker_tensors


def test_lokr_trains_reloads_and_is_planned(tmp_path):
    check_method(LOKR, tmp_path, r=2, target_modules=["q_proj", "v_proj", "up_proj"])


def test_lokr_decomposed_both_is_planned(tmp_path):
    check_method(LOKR, tmp_path, r=1, decompose_both=True, decompose_factor=4)


def test_lokr_shapes_follow_peft():
    # 576 = 24 x 24: rank 8 < 24/2, so the right factor is a low-rank product; the left one stays dense.
    assert kronecker_tensors(576, 576, 8, False, -1) == [24 * 24, 24 * 8, 8 * 24]
    assert kronecker_tensors(576, 576, 16, False, -1) == [24 * 24, 24 * 24]


def test_lokr_traits_and_fields():
    check_traits(LOKR, "LoKr", "oft_block_size", {"r": 0, "decompose_factor": 0, "module_dropout": -0.1})
    assert LOKR.mergeable and LOKR.shows_rank
