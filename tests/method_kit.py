"""Checks shared by the tests of the peft methods added one module each (tests/test_method_<name>.py).

Each method is applied to tiny-llama through its own ``apply``, trained two optimizer steps in a standalone loop
that calls the method's hooks, saved as safetensors and reloaded onto a fresh base with ``PeftModel.from_pretrained``
(identical logits), and its planner count is compared with the real model's trainable parameters.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

RUN_FIELDS = dict(lr=1e-2, weight_decay=0.0, seed=0, gradient_checkpointing=False, model="tiny-llama", device="cpu",
                  precision="fp32", max_steps=2)


class StandInCfg:
    """The cfg API that ``Method.apply`` sees: method fields as attributes, ``is_set``, ``method_fields``."""

    def __init__(self, method, **values: Any) -> None:
        names = method.field_names()
        self._fields = method.fields(**{k: v for k, v in values.items() if k in names})
        self._run = dict(RUN_FIELDS, **{k: v for k, v in values.items() if k not in names})
        self._set = {k for k in values if k in names}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in type(self._fields).model_fields:
            return getattr(self._fields, name)
        try:
            return self._run[name]
        except KeyError:
            raise AttributeError(name) from None

    def is_set(self, name: str) -> bool:
        return name in self._set

    def method_fields(self) -> dict[str, Any]:
        return self._fields.model_dump()


def tiny_base():
    from transformers import AutoModelForCausalLM

    from peftlab.models import tiny_model_dir

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny-llama"), dtype=torch.float32)


def fixed_batch(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch, labels=batch["input_ids"]).loss)


def train_steps(method, model, cfg, batch, steps: int = 2) -> list[float]:
    """The loop's contract, standalone: begin_training, AdamW (or the method's optimizer), after_optimizer_step."""
    method.begin_training(model, steps)
    optimizer = method.make_optimizer(model, cfg) or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, step)
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def trainable_counts(model) -> tuple[int, int]:
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(sizes), max(sizes)


def arch_of(model):
    try:
        from peftlab.plan.arch import arch_from_config
    except ImportError:  # before the planner became a package
        from peftlab.plan import arch_from_config
    return arch_from_config(model.config, "tiny-llama")


def plan_input(cfg: StandInCfg, **extra: Any) -> SimpleNamespace:
    values = dict(fields=cfg.method_fields(), dtype="float32", precision="fp32", device="cpu", batch_size=2, seq_len=12,
                  dropout=cfg.method_fields().get("dropout", 0.0))
    values.update(extra)
    return SimpleNamespace(**values)


def check_method(method, tmp_path, steps: int = 2, **values: Any):
    """Apply, train, save, reload with identical logits, and check the planner's count. Returns the trained model."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = tiny_base()
    arch = arch_of(base)
    cfg = StandInCfg(method, **values)
    model = method.apply(base, cfg, "causal_lm", [])
    n_trainable, largest = trainable_counts(model)
    terms = method.plan_terms(arch, plan_input(cfg))
    assert (terms.trainable_params, terms.largest_trainable) == (n_trainable, largest), (terms, n_trainable, largest)

    batch = fixed_batch(model.config.vocab_size)
    before = eval_loss(model, batch)
    train_steps(method, model, cfg, batch, steps)
    after = eval_loss(model, batch)
    assert after != before, "two optimizer steps left the loss unchanged"

    probe = fixed_batch(model.config.vocab_size, seed=1)
    model.eval()
    with torch.no_grad():
        expected = model(**probe).logits
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(**probe).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), float((got - expected).abs().max())
    if method.mergeable:  # the trait promises peft's merge_and_unload: same logits from a plain model
        merged = reloaded.merge_and_unload()
        assert not any(n for n, _ in merged.named_parameters() if "base_layer" in n)
        with torch.no_grad():
            got_merged = merged(**probe).logits
        assert torch.allclose(got_merged, expected, atol=1e-4, rtol=0), float((got_merged - expected).abs().max())
    return model


def check_traits(method, display_name: str, forbidden_field: str, bad_values: dict[str, Any]) -> None:
    """Registered, display name, order in the new methods' range, one-line reasons; another method's field and
    out-of-range values are rejected by the fields model."""
    from peftlab.methods import METHODS
    from peftlab.methods.base import CAPABILITIES

    assert METHODS[method.name] is method
    assert method.display_name == display_name
    assert 100 <= method.order < 200
    assert set(method.unsupported) <= set(CAPABILITIES)
    assert all("\n" not in why and not why.endswith(".") for why in method.unsupported.values())
    assert forbidden_field not in method.field_names()
    with pytest.raises(ValidationError):
        method.fields(**{forbidden_field: 8})
    for name, value in bad_values.items():
        with pytest.raises(ValidationError):
            method.fields(**{name: value})
    if method.not_planned is not None:
        assert "\n" not in method.not_planned


def loop_loss_works(method, **values: Any) -> bool:
    """peftlab's own loss (plain and chunked) on the applied model agree; False if it raises a shape mismatch."""
    from peftlab.losses import causal_lm_loss_sum

    model = method.apply(tiny_base(), StandInCfg(method, **values), "causal_lm", [])
    batch = fixed_batch(model.config.vocab_size)
    batch["labels"] = batch["input_ids"]
    plain, chunked = causal_lm_loss_sum(model, batch), causal_lm_loss_sum(model, batch, chunked=True)
    return bool(torch.allclose(plain, chunked, rtol=1e-4))


def causal_lm_method_or_skip(name: str):
    """The registered method, skipping the test where it cannot train a causal LM (with its reason) or where
    bitsandbytes is missing for one that quantizes the base."""
    from peftlab.methods import get_method

    method = get_method(name)
    if not method.supports("causal_lm"):
        pytest.skip(f"method {name!r} {method.unsupported_reasons()['causal_lm']}")
    if method.quantizes_base:
        pytest.importorskip("bitsandbytes")
    return method
