"""P-Tuning: trains, reloads with identical logits, planned exactly (MLP and LSTM encoders), fields validated."""

from __future__ import annotations

import pytest
from method_kit import check_method, check_traits, loop_loss_works

from peftlab.errors import UserError
from peftlab.methods.p_tuning import P_TUNING


def test_p_tuning_trains_reloads_and_is_planned(tmp_path):
    check_method(P_TUNING, tmp_path, num_virtual_tokens=4, encoder_hidden_size=32)


def test_p_tuning_lstm_is_planned(tmp_path):
    check_method(P_TUNING, tmp_path, num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                 encoder_hidden_size=16)


def test_p_tuning_traits_and_fields():
    check_traits(P_TUNING, "P-Tuning", "alpha", {"num_virtual_tokens": -1, "encoder_hidden_size": 0,
                                                 "encoder_reparameterization_type": "GRU"})
    assert not P_TUNING.mergeable
    with pytest.raises(UserError, match="packing"):
        P_TUNING.check_supports("packing")


# Prompt learning prepends its virtual positions to the outputs; the loop's loss reads only the real ones.
def test_p_tuning_works_with_the_loops_loss():
    assert loop_loss_works(P_TUNING, num_virtual_tokens=4)
