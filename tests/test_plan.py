"""The memory planner: component arithmetic by hand, activations against what autograd really saves, 4-bit weight
bytes against a loaded model, published parameter counts, the seed table, and errors for unknown models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.losses import causal_lm_loss_sum
from peftlab.methods import get_method
from peftlab.plan.arch import BUILTIN_ARCHS, arch_from_config, load_arch
from peftlab.plan.memory import (
    GIB,
    PlanInput,
    estimate_for_run,
    loaded_weight_bytes,
    plan_input_from_config,
    plan_memory,
)
from peftlab.plan.seed_table import seed_table

# V 10, hidden 8, MLP 16, 2 layers, 2 heads of 4 (q width 8), 1 kv head (kv width 4), tied embeddings.
TINY = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "tie_word_embeddings": True}
RUNTIME = 1000


@pytest.fixture
def tiny_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return tmp_path


def test_counts_from_a_local_config_json(tiny_folder):
    arch = load_arch(str(tiny_folder))
    # embedding 10*8; per layer q 64, k 32, v 32, o 64, gate/up/down 128 each; norms 8 per layer x 2 + final 8
    assert arch.total_params() == 80 + 2 * (64 + 32 + 32 + 64 + 3 * 128) + 5 * 8 == 1272


def test_lora_components_by_hand(tiny_folder):
    arch = load_arch(str(tiny_folder))
    plan = plan_memory(arch, PlanInput(method="lora", r=2, batch_size=1, seq_len=4, grad_accum=1), RUNTIME)
    trainable = 2 * (2 * (8 + 8) + 2 * (8 + 4)) * 4  # r(in+out) on q and v, 2 layers, fp32
    # per token per layer: fp32 x (2h norm inputs + 2 q width + 2 kv width + 3 MLP) + fp32 x (2 norm stats + 2 heads)
    layer = 4 * (16 + 16 + 8 + 48) + 4 * (2 + 2)
    lora = 2 * (4 * 2 + 2 * 4 * 8)  # per target: r outputs + dropout noise and output of width 8 (CPU)
    activations = 4 * (2 * (layer + lora) + 4 * 8)  # 4 tokens; the final norm's input once
    assert plan.peak_phase == "forward_backward"
    assert plan.components == {"runtime": RUNTIME, "base_weights": 1272 * 4, "trainable_weights": trainable,
                               "optimizer_states": 2 * trainable, "gradients": trainable,
                               "activations": activations, "logits_ce": 4 * 4 * 10 + 4 * 8 * 4,
                               "optimizer_step_temp": 0}  # logits: 4 B per logit + the hidden-state gradient
    assert plan.peak_bytes == 1000 + 5088 + 448 + 896 + 448 + 4224 + 160 + 128


def test_full_finetuning_peaks_at_the_optimizer_step(tiny_folder):
    arch = load_arch(str(tiny_folder))
    unfused = PlanInput(method="full", batch_size=1, seq_len=4, grad_accum=1, fused_optimizer=False,
                        chunked_ce=False)
    plan = plan_memory(arch, unfused, RUNTIME)
    weights = 1272 * 4
    assert plan.peak_phase == "optimizer_step"
    # step: weights + gradients + two AdamW states + two copies of the largest tensor (a 16x8 MLP weight)
    assert plan.components == {"runtime": RUNTIME, "base_weights": 0, "trainable_weights": weights,
                               "optimizer_states": 2 * weights, "gradients": weights, "activations": 0,
                               "logits_ce": 0, "optimizer_step_temp": 2 * 128 * 4}
    # forward/backward: only the output layer's gradient (10x8) is held; activations add the weight-grad inputs
    layer = 4 * (16 + 16 + 8 + 48) + 4 * (2 + 2) + 4 * (4 * 8 + 16)
    acts = 4 * (2 * layer + 3 * 4 * 8)
    assert plan.phases["forward_backward"] == RUNTIME + weights + 2 * weights + 80 * 4 + acts + 480
    # the fused AdamW that training uses by default needs no step temporaries
    fused = plan_memory(arch, PlanInput(method="full", batch_size=1, seq_len=4, grad_accum=1), RUNTIME)
    assert fused.phases["optimizer_step"] == RUNTIME + 4 * weights


def test_chunked_cross_entropy_holds_one_chunk_of_logits(tiny_folder):
    arch = load_arch(str(tiny_folder))
    common = dict(method="lora", r=2, batch_size=4, seq_len=512, grad_accum=1)  # 2048 tokens, chunks of 1024
    chunked = plan_memory(arch, PlanInput(**common), RUNTIME).components["logits_ce"]
    plain = plan_memory(arch, PlanInput(**common, chunked_ce=False), RUNTIME).components["logits_ce"]
    assert chunked == 4 * 1024 * 10 + 2048 * 8 * 4  # one reused chunk buffer + the hidden-state gradient
    assert plain == 12 * 2048 * 10
    # 1500 tokens: a full chunk and a shorter last one, both buffered; bf16 adds a chunk's fp32 copy and gradient
    odd = dict(common, batch_size=3, seq_len=500)
    assert plan_memory(arch, PlanInput(**odd), RUNTIME).components["logits_ce"] == 4 * 1500 * 10 + 1500 * 8 * 4
    bf16 = plan_memory(arch, PlanInput(**common, precision="bf16-true"), RUNTIME).components["logits_ce"]
    assert bf16 == (2 * 1024 + 6 * 1024) * 10 + 2048 * 8 * 2


def test_gradient_checkpointing_keeps_layer_inputs_only(tiny_folder):
    arch = load_arch(str(tiny_folder))
    common = dict(method="lora", r=2, batch_size=1, seq_len=4, grad_accum=1, dropout=0.0)
    full = plan_memory(arch, PlanInput(**common), RUNTIME).components["activations"]
    ckpt = plan_memory(arch, PlanInput(**common, gradient_checkpointing=True), RUNTIME).components["activations"]
    layer = 4 * (16 + 16 + 8 + 48) + 4 * (2 + 2) + 2 * 4 * 2 + 4 * 8  # + r per target + the shared q/v input
    assert full == 4 * (2 * layer + 4 * 8)
    assert ckpt == 4 * (2 * 4 * 8 + layer + 4 * 8)  # two layer inputs + one layer recomputed + the final norm


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one forward."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss_sum(model, batch)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(v for k, v in saved.items() if k not in own)


@pytest.mark.parametrize("extra", [
    {"method": "full"}, {"method": "lora"}, {"method": "lora", "dropout": 0.0}, {"method": "ia3"},
    {"method": "lora", "dropout": 0.0, "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
])
def test_activations_match_what_autograd_saves(extra):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    cfg = load_config(None, dict(model="tiny-llama", batch_size=2, block_size=64, grad_accum=1, **extra))
    model = get_method(cfg.method).apply(model, cfg, "causal_lm").train()
    ids = torch.randint(0, 1000, (2, 64))
    measured = saved_activation_bytes(model, {"input_ids": ids, "labels": ids})
    plan = plan_memory(arch_from_config(config, "tiny"), plan_input_from_config(cfg), RUNTIME)
    saved_logprobs = 2 * 64 * 1000 * 4  # the log-softmax output over the vocabulary, saved by cross-entropy
    assert plan.components["activations"] + saved_logprobs == pytest.approx(measured, rel=0.05)


def test_4bit_weight_bytes_match_a_loaded_model():
    pytest.importorskip("bitsandbytes")
    from peftlab.models import load_model

    cfg = load_config(None, dict(model="tiny-llama", method="qlora"))
    loaded = load_model(cfg, quantize_4bit=True)
    model = get_method("qlora").apply(loaded.model, cfg, "causal_lm")
    exact = loaded_weight_bytes(model)
    plan = plan_memory(load_arch("tiny-llama"), plan_input_from_config(cfg), RUNTIME)
    assert plan.components["base_weights"] == exact["base"]
    assert plan.components["trainable_weights"] == exact["trainable"]
    estimate = estimate_for_run(cfg, model)
    assert estimate["available"] and estimate["components_gb"]["base_weights"] == exact["base"] / GIB


def test_published_parameter_counts():
    expected = {"Llama-2-7B": 6_738_415_616, "Mistral-7B-v0.1": 7_241_732_096, "Gemma-7B": 8_537_680_896,
                "Gemma-2B": 2_506_172_416, "Llama-3-8B": 8_030_261_248, "Gemma-3-270M": 268_098_176}
    assert {name: arch.total_params() for name, arch in BUILTIN_ARCHS.items()} == expected
    assert load_arch("mistralai/Mistral-7B-v0.1") is BUILTIN_ARCHS["Mistral-7B-v0.1"]


def test_seed_table_rows_and_the_6gb_claim():
    rows = seed_table()
    assert [(r["model"], r["method"], r["r"]) for r in rows if r["processes"] == 1] == [
        (m, k, r) for m in ("Mistral-7B-v0.1", "Llama-2-7B")
        for k, r in (("full", None), ("lora", 8), ("lora", 16), ("lora", 128), ("qlora", 8))]
    for row in (r for r in rows if r["processes"] == 1):
        weights_bf16 = 2 * BUILTIN_ARCHS[row["model"]].total_params()
        if row["method"] == "lora":  # the seed's ~6 GB is below the bf16 weights alone
            assert row["plan"].peak_bytes > weights_bf16 > 6 * GIB
        if row["method"] == "qlora":
            assert row["plan"].peak_bytes < weights_bf16
    assert sum(r["seed_claimed"] != "-" for r in rows) == 8  # full and three LoRA rows per model (issue 15)


def test_cli_seed_table_prints_every_row():
    proc = subprocess.run([sys.executable, "-m", "peftlab", "plan", "--seed-table"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| Mistral") or line.startswith("| Llama")]
    assert len(rows) == 14  # the seed's 10 rows and 4 under FSDP on 8 GPUs
    assert any("| 6 GB (not possible, below) |" in line for line in rows)


def test_unknown_models_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder or config.json"):
        load_arch(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="could not be fetched"):
        load_arch("nobody/no-such-model")  # offline in tests
    with pytest.raises(UserError, match="not a Llama-style decoder"):
        arch_from_config({"model_type": "bert", "vocab_size": 3, "hidden_size": 4}, "bert-ish")
    proc = subprocess.run([sys.executable, "-m", "peftlab", "plan", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "peftlab: error: model" in proc.stderr


def test_estimate_for_an_unsupported_model_is_marked_unavailable():
    class Encoder(torch.nn.Module):
        config = {"model_type": "bert", "vocab_size": 3, "hidden_size": 4}

    estimate = estimate_for_run(load_config(None, {"model": "tiny-llama"}), Encoder())
    assert estimate["available"] is False and "Llama-style" in estimate["reason"]


def test_each_precision_has_its_weight_terms(tiny_folder):
    """fp32: every weight 4 bytes; bf16-mixed: a frozen base's matmul weights 2 bytes (embeddings, a tied head and
    norms 4), fp32 adapters, and for full fine-tuning fp32 masters plus autocast's bf16 copies of the matmuls;
    bf16-true: everything 2 bytes."""
    arch = load_arch(str(tiny_folder))
    total, matmuls = arch.total_params(), arch.matmul_params()
    assert 0 < matmuls < total

    def plan(method: str, precision: str):
        return plan_memory(arch, PlanInput(method=method, precision=precision, batch_size=1, seq_len=8,
                                           grad_accum=1), RUNTIME).components

    assert plan("lora", "fp32")["base_weights"] == 4 * total
    assert plan("lora", "bf16-mixed")["base_weights"] == 2 * matmuls + 4 * (total - matmuls)
    assert plan("lora", "bf16-true")["base_weights"] == 2 * total
    assert plan("lora", "bf16-mixed")["trainable_weights"] == plan("lora", "fp32")["trainable_weights"]
    full_fp32, full_mixed = plan("full", "fp32"), plan("full", "bf16-mixed")
    assert full_mixed["trainable_weights"] == full_fp32["trainable_weights"] == 4 * total
    assert full_mixed["optimizer_states"] == full_fp32["optimizer_states"]
    # bf16 activations halve, but autocast keeps a bf16 copy of every matmul weight through forward/backward
    acts_fp32 = full_fp32["activations"]
    assert full_mixed["activations"] > 2 * matmuls > 0 and full_mixed["activations"] - 2 * matmuls < acts_fp32
    with pytest.raises(UserError, match="precision"):
        plan("lora", "fp16")
