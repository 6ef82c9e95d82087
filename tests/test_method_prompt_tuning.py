"""Prompt Tuning: trains, reloads with identical logits, planned exactly, cannot merge or pack."""

from __future__ import annotations

import pytest
from method_kit import check_method, check_traits, loop_loss_works
from pydantic import ValidationError

from peftlab.errors import UserError
from peftlab.methods.prompt_tuning import PROMPT_TUNING


def test_prompt_tuning_trains_reloads_and_is_planned(tmp_path):
    check_method(PROMPT_TUNING, tmp_path, num_virtual_tokens=5)


def test_prompt_tuning_from_text_is_planned(tmp_path):
    model = check_method(PROMPT_TUNING, tmp_path, num_virtual_tokens=4, prompt_tuning_init="text",
                         prompt_tuning_init_text="Summarize the text")
    assert model.peft_config["default"].prompt_tuning_init == "TEXT"


def test_prompt_tuning_traits_and_fields():
    check_traits(PROMPT_TUNING, "Prompt Tuning", "r", {"num_virtual_tokens": 0, "prompt_tuning_init": "vocab"})
    with pytest.raises(ValidationError, match="prompt_tuning_init_text"):
        PROMPT_TUNING.fields(prompt_tuning_init="text")
    assert not PROMPT_TUNING.mergeable
    for capability in ("merge", "packing"):
        with pytest.raises(UserError, match=f"method 'prompt_tuning' .*{capability[:4]}"):
            PROMPT_TUNING.check_supports(capability)
    assert PROMPT_TUNING.supports("classification")


# Prompt learning prepends its virtual positions to the outputs; the loop's loss reads only the real ones.
def test_prompt_tuning_works_with_the_loops_loss():
    assert loop_loss_works(PROMPT_TUNING, num_virtual_tokens=4)
