"""Every extra PEFT method trains tiny-llama (eval loss falls), reloads with identical outputs, records its
trainable-parameter count, and rejects config fields that do not apply to it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.evaluate import run_eval, run_generate
from peftlab.plan.arch import load_arch
from peftlab.plan.memory import PlanInput, trainable_params
from peftlab.train import run_training
from tests.conftest import tiny_overrides

# 16 blocks of a repetitive text, batch 4, no accumulation: 4 optimizer steps, evaluated on the same text, so that
# even a random tiny model's loss falls visibly in a few steps. IA3 and prefix tuning need a higher learning rate.
FAST = dict(train_subset=16, eval_subset=4, grad_accum=1, max_new_tokens=6)
LR = {"ia3": 0.1, "prefix": 0.1}
METHODS = ["dora", "rslora", "pissa", "loraplus", "ia3", "prefix", "qlora", "full"]
# tiny-llama: hidden 64, 2 layers, 4 heads of 16, 2 kv heads (kv width 32), MLP 128, vocabulary 49,152 (tied).
H, KV, MLP, LAYERS, VOCAB = 64, 32, 128, 2, 49152
# Trainable parameters counted by hand (defaults: r 8 on q_proj (64->64) and v_proj (64->32)).
LORA_QV = LAYERS * (8 * (64 + 64) + 8 * (64 + 32))
EXPECTED_TRAINABLE = {
    "dora": LORA_QV + LAYERS * (64 + 32),  # + one magnitude per output feature
    "rslora": LORA_QV, "pissa": LORA_QV, "loraplus": LORA_QV, "qlora": LORA_QV,
    "ia3": LAYERS * (KV + KV + MLP),  # k_proj and v_proj outputs, down_proj input (feed-forward)
    "prefix": 20 * LAYERS * 2 * KV,  # 20 virtual tokens x layers x (key, value) x kv width
    "full": VOCAB * H + LAYERS * (2 * H * H + 2 * H * KV + 3 * H * MLP + 2 * H) + H,
}


@pytest.fixture(scope="module", params=METHODS)
def trained(request, tmp_path_factory):
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    text = tmp / "repetitive.txt"
    text.write_text(" the quick brown fox jumps over the lazy dog .\n" * 400, encoding="utf-8")
    overrides = tiny_overrides(tmp, method=method, dataset=str(text), eval_dataset=str(text),
                               lr=LR.get(method, 1e-2), **FAST)
    results = run_training(load_config(None, overrides)).to_dict()
    return method, Path(results["run_dir"]), results


def test_eval_loss_falls(trained):
    method, _, results = trained
    before, after = results["metrics"]["before"]["eval_loss"], results["metrics"]["after"]["eval_loss"]
    assert math.isfinite(after)
    assert after < before - 0.02, f"{method}: eval loss {before:.4f} -> {after:.4f}"


def test_records_trainable_parameter_count(trained):
    method, _, results = trained
    assert results["params"]["trainable_params"] == EXPECTED_TRAINABLE[method]
    # the planner counts the same from the shapes alone
    planned, _ = trainable_params(load_arch("tiny-llama"), PlanInput(method=method))
    assert planned == EXPECTED_TRAINABLE[method]


def test_reload_gives_identical_outputs(trained):
    method, run_dir, results = trained
    if method == "full":
        data = {k: results["config"][k] for k in ("dataset", "eval_dataset", "eval_subset")}
        metrics = run_eval({"model": str(run_dir / "model"), **data}, None)["metrics"]
        text = run_generate({"model": str(run_dir / "model")}, None, results["sample"]["prompt"], 6)
    else:
        metrics = run_eval({}, str(run_dir / "adapter"))["metrics"]
        text = run_generate({}, str(run_dir / "adapter"), results["sample"]["prompt"], 6)
    after = results["metrics"]["after"]
    assert metrics["eval_tokens"] == after["eval_tokens"]
    assert metrics["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-6, abs=1e-6)
    assert text == results["sample"]["generation"]


@pytest.mark.parametrize(("method", "field", "value"), [
    ("ia3", "r", 4), ("ia3", "alpha", 8), ("prefix", "target_modules", "q_proj"), ("full", "r", 4),
    ("lora", "num_virtual_tokens", 4), ("dora", "loraplus_lr_ratio", 2.0), ("lora", "quant_type", "fp4"),
])
def test_field_that_does_not_apply_is_rejected(method, field, value):
    with pytest.raises(UserError, match=f"method '{method}' does not take {field}"):
        load_config(None, {"method": method, field: value})


def test_cli_rejects_r_with_ia3_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftlab", "train", "--model", "tiny-llama", "--method", "ia3",
                           "--r", "4", "--output-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "method 'ia3' does not take r" in proc.stderr
    assert not (tmp_path / "x").exists()
