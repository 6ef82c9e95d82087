"""Per-process plans on several processes: FSDP's shards scale as 1/N and its unsharded terms do not, one process
plans exactly as before, DDP adds its gradient buckets, the CLI's one-line errors, and the seed table's quoted
claims with the arithmetic that rules them out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.plan.arch import BUILTIN_ARCHS, load_arch
from peftlab.plan.memory import PlanInput, plan_input_from_config, plan_memory, root_params
from peftlab.plan.seed_table import SEED_CLAIMS, seed_table

# as tests/test_plan.py: V 10, hidden 8, MLP 16, 2 layers, q width 8, kv width 4, tied embeddings
TINY = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "tie_word_embeddings": True}
RUNTIME = 1000
LLAMA = BUILTIN_ARCHS["Llama-2-7B"]
SHARDED = ("base_weights", "trainable_weights", "optimizer_states", "gradients")
UNSHARDED = ("runtime", "activations", "logits_ce", "unsharded_layers", "root_parameters", "layer_gradient")
GPU = dict(device="cuda", precision="bf16-mixed", batch_size=4, seq_len=128)


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "peftlab", *argv], capture_output=True, text=True, env=env)


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return load_arch(str(tmp_path))


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_plans_as_before_for_either_strategy(method, strategy):
    common = dict(method=method, grad_accum=8, **GPU)
    before = plan_memory(LLAMA, PlanInput(**common))
    plan = plan_memory(LLAMA, PlanInput(**common, strategy=strategy, processes=1))
    assert (plan.components, plan.phases, plan.notes, plan.labels) == \
        (before.components, before.phases, before.notes, {})


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_shards_scale_as_one_over_n(method):
    """Stored weights, AdamW states and (with accumulation) gradients split N ways; activations, the logits, the
    all-gathered layers, the root group and a layer's unsharded gradient stay the same on every N."""
    plans = {n: plan_memory(LLAMA, PlanInput(method=method, grad_accum=8, strategy="fsdp", processes=n, **GPU))
             for n in (2, 4, 8)}
    one = plan_memory(LLAMA, PlanInput(method=method, grad_accum=8, **GPU)).components
    for n, plan in plans.items():
        c = plan.components
        for key in SHARDED:
            assert c[key] == -(-one[key] // n), (n, key)
        for key in UNSHARDED:
            assert c[key] == plans[2].components[key], (n, key)
        assert plan.labels["trainable_weights"] == f"trainable weights (sharded 1/{n})"
    assert plans[8].peak_bytes < plans[4].peak_bytes < plans[2].peak_bytes


def test_fsdp_unsharded_terms_by_hand(tiny):
    plan = plan_memory(tiny, PlanInput(method="full", batch_size=1, seq_len=4, grad_accum=2, strategy="fsdp",
                                       processes=4), RUNTIME)
    c, layer = plan.components, 64 + 32 + 32 + 64 + 3 * 128 + 2 * 8  # one layer's linears and two norms
    assert root_params(tiny) == 80 + 8  # the tied embedding and the final norm
    assert c["unsharded_layers"] == 2 * layer * 4  # fp32: two layers gathered in fp32
    assert c["root_parameters"] == 88 * 4
    assert c["layer_gradient"] == layer * 4
    assert c["trainable_weights"] == c["gradients"] == 1272 * 4 // 4
    assert plan.phases["optimizer_step"] == RUNTIME + 4 * 1272  # weights, gradients, two states: all 1/4
    lora = plan_memory(tiny, PlanInput(method="lora", r=2, batch_size=1, seq_len=4, grad_accum=1, strategy="fsdp",
                                       processes=2), RUNTIME).components
    adapters = 2 * (8 + 8) + 2 * (8 + 4)  # r(in+out) on q and v, one layer
    assert lora["layer_gradient"] == adapters * 4
    assert lora["unsharded_layers"] == 2 * (layer + adapters) * 4
    assert lora["base_weights"] == 1272 * 4 // 2


def test_fsdp_without_accumulation_holds_only_the_heads_gradient():
    plan = plan_memory(LLAMA, PlanInput(method="full", grad_accum=1, strategy="fsdp", processes=8, **GPU))
    assert plan.peak_phase == "forward_backward"
    assert plan.components["gradients"] == LLAMA.vocab_size * 4096 * 4  # the untied head's, in the root group
    assert plan.labels["gradients"] == "gradients (head, unsharded)"


def test_fsdp_bf16_mixed_has_no_autocast_copies():
    one = plan_memory(LLAMA, PlanInput(method="full", grad_accum=8, **GPU)).components["activations"]
    fsdp = plan_memory(LLAMA, PlanInput(method="full", grad_accum=8, strategy="fsdp", processes=8, **GPU))
    assert one - fsdp.components["activations"] == 2 * LLAMA.matmul_params()
    assert any("MixedPrecisionPolicy" in note for note in fsdp.notes)


def test_full_7b_fsdp_on_8_is_far_below_ddp_on_8():
    common = dict(method="full", grad_accum=8, processes=8, **GPU)
    one = plan_memory(LLAMA, PlanInput(method="full", grad_accum=8, **GPU))
    ddp = plan_memory(LLAMA, PlanInput(strategy="ddp", **common))
    fsdp = plan_memory(LLAMA, PlanInput(strategy="fsdp", **common))
    assert ddp.components["ddp_gradient_buckets"] == one.components["gradients"]
    assert ddp.peak_bytes == one.peak_bytes + one.components["gradients"]
    assert fsdp.peak_bytes < 0.2 * ddp.peak_bytes
    assert fsdp.peak_bytes / 1024**3 < 72  # fits one 80 GB GPU


@pytest.mark.parametrize(("kwargs", "match"), [({"processes": 0}, "processes 0"), ({"processes": 1.5}, "processes"),
                                               ({"strategy": "zero"}, "strategy 'zero'")])
def test_bad_run_inputs_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        plan_memory(LLAMA, PlanInput(method="lora", **kwargs))


def test_a_launched_rank_plans_itself_from_world_size(monkeypatch):
    cfg = load_config(None, {"model": "tiny-llama", "method": "full", "strategy": "fsdp", "device": "cpu",
                             "precision": "fp32"})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert plan_input_from_config(cfg).processes == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    inp = plan_input_from_config(cfg)
    assert (inp.processes, inp.strategy, inp.shards_parameters) == (4, "fsdp", True)
    assert plan_input_from_config(cfg, processes=2).processes == 2
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        plan_input_from_config(cfg)


def test_cli_plans_one_gpu_of_an_fsdp_run():
    proc = cli("plan", "--strategy", "fsdp", "--processes", "8", "--model", "meta-llama/Llama-2-7b-hf",
               "--method", "full")
    assert proc.returncode == 0, proc.stderr
    assert "cuda bf16-mixed" in proc.stdout and "fsdp on 8 processes (per process)" in proc.stdout
    assert "unsharded layers (2, all-gather + prefetch)" in proc.stdout
    proc = cli("plan", "--strategy", "fsdp", "--processes", "8", "--model", "meta-llama/Llama-2-7b-hf",
               "--method", "full", "--json")
    data = json.loads(proc.stdout)
    assert (data["inputs"]["processes"], data["inputs"]["strategy"]) == (8, "fsdp")
    assert data["labels"]["root_parameters"] == "root parameters (unsharded)"


@pytest.mark.parametrize(("argv", "match"), [(["--processes", "0"], "--processes 0"),
                                             (["--processes", "-2", "--seed-table"], "--processes -2"),
                                             (["--strategy", "zero"], "strategy")])
def test_cli_bad_processes_and_strategy_are_one_line_errors(argv, match):
    proc = cli("plan", "--model", "Llama-2-7B", *argv)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and match in proc.stderr


def test_seed_table_quotes_the_seed_and_rules_out_what_cannot_fit():
    rows = {(r["model"], r["method"], r["r"], r["processes"]): r for r in seed_table()}
    quoted = {key: rows[(*key, 1)]["seed_claimed"] for key in SEED_CLAIMS}
    assert quoted == {
        ("Mistral-7B-v0.1", "full", None): "16 GB at 120 min/epoch", ("Mistral-7B-v0.1", "lora", 8): "6 GB",
        ("Mistral-7B-v0.1", "lora", 16): "7 GB", ("Mistral-7B-v0.1", "lora", 128): "7 GB",
        ("Llama-2-7B", "full", None): "24 GB at 200 min/epoch", ("Llama-2-7B", "lora", 8): "9 GB",
        ("Llama-2-7B", "lora", 16): "10 GB", ("Llama-2-7B", "lora", 128): "10 GB"}
    assert rows[("Llama-2-7B", "qlora", 8, 1)]["seed_claimed"] == "-"
    assert "13.5 GB" in rows[("Llama-2-7B", "lora", 8, 1)]["not_possible"]
    full = rows[("Llama-2-7B", "full", None, 1)]["not_possible"]
    assert "107.8 GB" in full and "53.9 GB" in full and "16 bytes" in full and "8 bytes" in full
    assert rows[("Mistral-7B-v0.1", "lora", 8, 1)]["not_possible"].count("14.5 GB") == 1
    for model in ("Mistral-7B-v0.1", "Llama-2-7B"):
        for method, r in (("full", None), ("lora", 8)):
            row = rows[(model, method, r, 8)]
            assert (row["strategy"], row["fits"], row["seed_claimed"]) == ("fsdp", "yes", "-")
        assert rows[(model, "full", None, 1)]["fits"] == "no"


def test_cli_seed_table_shows_the_gpu_and_the_arithmetic():
    proc = cli("plan", "--seed-table")
    assert proc.returncode == 0, proc.stderr
    assert "80 GB (H100 / A100-80GB)" in proc.stdout
    assert sum("| 8 (FSDP) |" in line for line in proc.stdout.splitlines()) == 4
    assert "24 GB at 200 min/epoch (not possible, below)" in proc.stdout
    assert "Llama-2-7B LoRA (8, 16), seed 9 GB: not possible on one GPU" in proc.stdout
