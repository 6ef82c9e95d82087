"""Every registered method (the registry, so a new method joins by registering): trains 2 steps on tiny-llama
through run_training, and its saved adapter (or model) reloads with the trained model's logits on a fixed batch;
it plans or says why not; its traits are complete; the loop calls its hooks."""

from __future__ import annotations

import json
import re
from typing import ClassVar

import pytest
import torch
from method_kit import causal_lm_method_or_skip

from peftlab import train
from peftlab.cli import main
from peftlab.configure import load_config
from peftlab.evaluate import eval_config, load_for_eval
from peftlab.merge import fixed_batch, logits_of
from peftlab.methods import METHODS, get_method, method_names, register
from peftlab.methods.base import CAPABILITIES
from peftlab.methods.lora import Lora
from peftlab.plan.arch import load_arch
from peftlab.plan.memory import NotPlanned, PlanInput, plan_memory
from tests.conftest import tiny_overrides

TWO_STEPS = dict(max_steps=2, train_subset=8, eval_subset=2, batch_size=2, grad_accum=1, eval_before=False,
                 max_new_tokens=2)


@pytest.mark.parametrize("name", method_names())
def test_trains_two_steps_and_reloads_with_identical_logits(name, tmp_path, monkeypatch):
    method = causal_lm_method_or_skip(name)
    trained_logits = {}
    save = train.save_trained

    def save_and_keep_logits(model, loaded, method, run, accelerator, extra_files=None):
        unwrapped = accelerator.unwrap_model(model)
        ids = fixed_batch(loaded.model.config.vocab_size, loaded.device)
        trained_logits["ids"], trained_logits["logits"] = ids, logits_of(unwrapped, ids)
        return save(model, loaded, method, run, accelerator, extra_files)

    monkeypatch.setattr(train, "save_trained", save_and_keep_logits)
    results = train.run_training(load_config(None, tiny_overrides(tmp_path, method=name, **TWO_STEPS))).to_dict()
    assert results["timing"]["optimizer_steps"] == 2
    assert results["params"]["trainable_params"] > 0
    artifact = results["artifact"]["path"]
    if method.is_peft:
        cfg = eval_config(artifact, {})
        _, model = load_for_eval(cfg, artifact, "auto")
    else:
        cfg = eval_config(None, {"model": artifact})
        _, model = load_for_eval(cfg, None, "auto")
    reloaded = logits_of(model, trained_logits["ids"])
    # a method that converts at save time (PiSSA -> plain LoRA of rank 2r) is equal up to float rounding
    tolerance = 1e-4 if method.converts_at_save else 1e-6
    assert torch.allclose(reloaded, trained_logits["logits"], atol=tolerance, rtol=0), \
        f"{name}: max diff {(reloaded - trained_logits['logits']).abs().max():.3e}"


@pytest.mark.parametrize("name", method_names())
def test_plans_or_says_why_not(name, capsys):
    method = get_method(name)
    try:
        plan = plan_memory(load_arch("tiny-llama"), PlanInput(method=name))
    except NotPlanned as reason:
        assert method.not_planned and method.not_planned in str(reason)
    else:
        assert method.not_planned is None and plan.counts["trainable_params"] > 0 and plan.peak_bytes > 0
    assert main(["plan", "--model", "tiny-llama", "--method", name]) == 0
    out = capsys.readouterr().out
    assert ("note: method" in out and "not modelled" in out) if method.not_planned else "peak (" in out


@pytest.mark.parametrize("name", method_names())
def test_traits_are_complete(name):
    method = get_method(name)
    assert method.name == name and method.display_name and method.family and method.summary
    assert set(method.unsupported) <= set(CAPABILITIES)
    assert all(reason and "\n" not in reason and not reason.endswith(".") for reason in method.unsupported.values())
    assert method.mergeable == ("merge" not in method.unsupported)
    defaults = load_config(None, {"method": name}).method_fields()
    assert set(defaults) == method.field_names()


def test_table_order_is_stable_and_unique():
    orders = [get_method(n).order for n in method_names()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    assert method_names()[:9] == ["full", "lora", "rslora", "dora", "pissa", "loraplus", "qlora", "ia3", "prefix"]


class Hooked(Lora):
    """LoRA that records the loop's calls to its hooks."""

    name = "hooked_test_method"
    display_name = "Hooked"
    order = 10_000
    calls: ClassVar[list] = []

    def begin_training(self, model, total_steps):
        self.calls.append(("begin", total_steps))

    def after_optimizer_step(self, model, step):
        # called before the gradients are cleared
        has_grads = any(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.calls.append(("after_step", step, has_grads))


def test_the_loop_calls_the_method_hooks(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, Hooked.name, Hooked())
    Hooked.calls.clear()
    train.run_training(load_config(None, tiny_overrides(tmp_path, method=Hooked.name, **TWO_STEPS)))
    assert Hooked.calls == [("begin", 2), ("after_step", 1, True), ("after_step", 2, True)]


def test_register_takes_a_class_or_an_instance(monkeypatch):
    monkeypatch.setattr("peftlab.methods.METHODS", dict(METHODS))
    from peftlab import methods

    assert register(Hooked) is Hooked and isinstance(methods.METHODS[Hooked.name], Hooked)
    with pytest.raises(TypeError):
        register(object())


def test_readme_methods_table_matches_the_registry():
    from pathlib import Path

    from peftlab.methods.table import readme_section

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert readme_section() in readme, "stale README table: run python -m peftlab.methods.table --write README.md"


def test_packing_refusal_comes_from_the_methods_traits(tmp_path):
    from peftlab.errors import UserError

    cannot = [n for n in method_names() if not get_method(n).supports("packing")]
    assert "prefix" in cannot
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"})
                              for i in range(8)), encoding="utf-8")
    for name in cannot:
        overrides = tiny_overrides(tmp_path / name, method=name, task="instruction", packing=True,
                                   dataset=str(data), eval_dataset=str(data), **TWO_STEPS)
        with pytest.raises(UserError, match=re.escape(f"method '{name}' {get_method(name).unsupported['packing']}")):
            train.run_training(load_config(None, overrides))


def test_run_names_show_what_the_method_adds():
    from peftlab.record import default_run_name

    assert "-lora-r4a32-" in default_run_name(load_config(None, {"model": "tiny-llama", "r": 4, "alpha": 32}))
    assert "-full-2" in default_run_name(load_config(None, {"model": "tiny-llama", "method": "full"}))
