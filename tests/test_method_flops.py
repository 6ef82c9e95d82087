"""Each method states its training FLOPs per token; the planner looks its method up once per plan and asks the task
for the model kind."""

from __future__ import annotations

import pytest
import torch

from peftlab.configure import load_config
from peftlab.methods import get_method
from peftlab.plan import memory
from peftlab.plan.arch import arch_from_config
from peftlab.plan.memory import PlanInput, estimate_for_run, plan_memory
from tests.test_plan import TINY

T = 16


def palm_counts(config: dict, targets: tuple[str, ...], r: int) -> tuple[int, int, int]:
    """(N: weights of every nn.Linear, the LM head included; LoRA's A and B weights; 12 L T d_attn), counted on the
    transformers model built on the meta device, independently of the planner's shapes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.in_features * m.out_features for _, m in linears)
    adapter = sum(r * (m.in_features + m.out_features) for name, m in linears if name.rsplit(".", 1)[-1] in targets)
    attention = 12 * config["num_hidden_layers"] * T * config["num_attention_heads"] * config["head_dim"]
    return n, adapter, attention


def test_full_and_lora_count_the_palm_formula():
    arch = arch_from_config(TINY, "tiny")
    n, adapter, attention = palm_counts(TINY, ("q_proj", "v_proj"), 2)
    assert arch.flop_weights() == n
    full = get_method("full").train_flops_per_token(arch, PlanInput(method="full", seq_len=T))
    assert full == 6 * n + attention
    for name in ("lora", "qlora"):
        inp = PlanInput(method=name, r=2, target_modules=["q_proj", "v_proj"], seq_len=T)
        assert get_method(name).train_flops_per_token(arch, inp) == 4 * n + 6 * adapter + attention


def test_other_peft_methods_count_their_own_trainable_weights():
    arch = arch_from_config(TINY, "tiny")
    lora = get_method("lora").train_flops_per_token(arch, PlanInput(method="lora", seq_len=T))
    ia3 = get_method("ia3").train_flops_per_token(arch, PlanInput(method="ia3", seq_len=T))
    n, _, attention = palm_counts(TINY, (), 0)
    trainable = get_method("ia3").plan_terms(arch, PlanInput(method="ia3", seq_len=T)).trainable_params
    assert ia3 == 4 * n + 6 * trainable + attention and ia3 != lora


def test_a_plan_looks_its_method_up_once(monkeypatch):
    calls = []
    real = memory.get_method
    monkeypatch.setattr(memory, "get_method", lambda name: calls.append(name) or real(name))
    arch = arch_from_config(TINY, "tiny")
    plan_memory(arch, PlanInput(method="qlora", processes=2, strategy="fsdp", precision="bf16-mixed"))
    assert calls == ["qlora"]


def test_the_run_estimate_takes_the_model_kind_from_the_task():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}))
    for task, logits in (("clm", True), ("classification", False)):
        cfg = load_config(None, {"model": "tiny-llama", "task": task, "device": "cpu", "precision": "fp32"})
        estimate = estimate_for_run(cfg, model)
        assert estimate["available"], estimate
        assert estimate["inputs"]["vocab_logits"] is logits


@pytest.mark.parametrize("name", ["full", "lora", "ia3"])
def test_each_method_states_its_formula(name):
    assert "N" in get_method(name).flops_formula and "12*L*T*d_attn" in get_method(name).flops_formula
