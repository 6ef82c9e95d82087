"""The new methods train a new classification head: applied to MiniLM with modules_to_save, the head is trainable
and gets a gradient, and the loss is finite."""

from __future__ import annotations

import importlib

import pytest
import torch
from method_kit import StandInCfg

NEW_METHODS = ("loha", "lokr", "oft", "boft", "vera", "adalora", "fourierft", "ln_tuning", "prompt_tuning",
               "p_tuning")


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_METHODS)
def test_new_method_trains_classification_head(name):
    from transformers import AutoModelForSequenceClassification

    from peftlab.methods import METHODS
    from peftlab.models import resolve_model_source

    importlib.import_module(f"peftlab.methods.{name}")
    method = METHODS[name]
    assert method.supports("classification")
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_source("minilm-l6"), num_labels=3)
    model = method.apply(base, StandInCfg(method), "seq_cls", ["classifier"])
    method.begin_training(model, 4)
    ids = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    head = {n: p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad}
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.values())
