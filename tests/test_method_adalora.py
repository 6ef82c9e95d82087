"""AdaLoRA: trains, reloads with identical logits, planned exactly; the loop hooks run its rank allocation."""

from __future__ import annotations

import pytest
import torch
from method_kit import StandInCfg, check_method, check_traits, fixed_batch, tiny_base

from peftlab.errors import UserError
from peftlab.methods.adalora import ADALORA


def test_adalora_trains_reloads_and_is_planned(tmp_path):
    model = check_method(ADALORA, tmp_path, init_r=6, target_r=3)
    config = model.peft_config["default"]
    assert config.total_step == 2 and config.rank_pattern  # the final allocation ran at the last step


def _kept_ranks(model) -> list[int]:
    return [int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n]


def test_adalora_rejects_schedule_longer_than_run():
    cfg = StandInCfg(ADALORA, init_r=4, target_r=2, tinit=2, tfinal=1)
    model = ADALORA.apply(tiny_base(), cfg, "causal_lm", [])
    with pytest.raises(UserError, match="tinit"):
        ADALORA.begin_training(model, 3)


def test_adalora_hooks_mask_ranks_after_tinit():
    torch.manual_seed(0)
    cfg = StandInCfg(ADALORA, init_r=4, target_r=2, tinit=2, tfinal=1, dropout=0.0)
    model = ADALORA.apply(tiny_base(), cfg, "causal_lm", [])
    batch = fixed_batch(model.config.vocab_size)
    n_targets = len(_kept_ranks(model))
    ADALORA.begin_training(model, 5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kept = []
    for step in range(1, 6):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        ADALORA.after_optimizer_step(model, step)
        optimizer.zero_grad()
        kept.append(sum(_kept_ranks(model)))
    assert kept[:2] == [4 * n_targets] * 2  # warm-up (tinit = 2): every rank kept
    assert kept[-1] == 2 * n_targets  # after the final allocation: the target budget
    assert model.peft_config["default"].rank_pattern


def test_adalora_traits_and_fields():
    check_traits(ADALORA, "AdaLoRA", "r", {"init_r": 0, "deltaT": 0, "beta1": 1.0, "orth_reg_weight": -1})
    with pytest.raises(Exception, match="target_r"):
        ADALORA.fields(init_r=4, target_r=8)
    assert ADALORA.mergeable and not ADALORA.shows_rank
    assert ADALORA.config_label(ADALORA.fields().model_dump()) == "(12->8, 16)"
