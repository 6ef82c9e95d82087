"""QLoRA on CPU: a 4-bit NF4 base with double quantization, adapters that learn, and an adapter that loads onto both
the 4-bit base and the full-precision base."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.evaluate import run_eval
from peftlab.losses import causal_lm_loss_sum
from peftlab.methods import get_method
from peftlab.models import load_model, quantization_config
from peftlab.train import run_training
from tests.conftest import tiny_overrides

pytest.importorskip("bitsandbytes")


def linear4bit_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m.weight, "quant_state")]


def test_base_is_nf4_with_double_quant_and_fp32_compute_on_cpu():
    cfg = load_config(None, {"model": "tiny-llama", "method": "qlora"})
    model = load_model(cfg, quantize_4bit=True).model
    layers = linear4bit_layers(model)
    assert len(layers) == 2 * 7  # every projection of both layers; embeddings and head stay full precision
    for layer in layers:
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantization: the absmax constants are quantized too
        assert layer.compute_dtype == torch.float32
    assert type(model.lm_head).__name__ == "Linear"


def test_no_weight_stays_mapped_from_the_full_precision_checkpoint():
    cfg = load_config(None, {"model": "tiny-llama", "method": "qlora"})
    model = load_model(cfg, quantize_4bit=True).model
    maps = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end))
    assert not [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in maps)]


def test_adapters_get_gradients_after_an_inference_pass():
    """bitsandbytes repacks 4-bit CPU weights for a no-backward kernel on the first eval forward; we keep it off."""
    cfg = load_config(None, {"model": "tiny-llama", "method": "qlora"})
    model = get_method("qlora").apply(load_model(cfg, quantize_4bit=True).model, cfg, "causal_lm")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    model.eval()
    with torch.no_grad():
        causal_lm_loss_sum(model, batch)
    model.train()
    causal_lm_loss_sum(model, batch).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_bitsandbytes_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    cfg = load_config(None, {"model": "tiny-llama", "method": "qlora"})
    with pytest.raises(UserError, match="method qlora needs bitsandbytes, which cannot run here"):
        quantization_config(cfg, torch.float32)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    text = tmp / "repetitive.txt"
    text.write_text(" the quick brown fox jumps over the lazy dog .\n" * 400, encoding="utf-8")
    overrides = tiny_overrides(tmp, method="qlora", dataset=str(text), eval_dataset=str(text), train_subset=16,
                               eval_subset=4, grad_accum=1, lr=1e-2, max_new_tokens=4)
    results = run_training(load_config(None, overrides)).to_dict()
    return Path(results["run_dir"]), results


def test_qlora_trains_on_cpu(qlora_run):
    _, results = qlora_run
    assert results["model"]["device"] == "cpu"
    assert results["metrics"]["after"]["eval_loss"] < results["metrics"]["before"]["eval_loss"] - 0.05
    assert results["memory"]["train"]["cpu_peak_rss_gb"] > 0


def test_adapter_loads_onto_4bit_and_full_precision_bases(qlora_run):
    run_dir, results = qlora_run
    adapter = str(run_dir / "adapter")
    on_4bit = run_eval({}, adapter, base_precision="4bit")["metrics"]
    on_full = run_eval({}, adapter, base_precision="full")["metrics"]
    base_only = run_eval({k: results["config"][k] for k in ("model", "dataset", "eval_dataset", "eval_subset")},
                         None)["metrics"]
    # the 4-bit base reproduces training exactly; the full-precision base differs only by the quantization error
    assert on_4bit["eval_loss"] == pytest.approx(results["metrics"]["after"]["eval_loss"], rel=1e-6)
    assert on_full["eval_loss"] == pytest.approx(on_4bit["eval_loss"], abs=0.02)
    # and the adapter is really applied on the full-precision base (it moved the loss well beyond that)
    assert base_only["eval_loss"] - on_full["eval_loss"] > 0.05


def test_a_lora_adapter_evaluates_on_a_4bit_base(tmp_path):
    # the 4-bit settings come from the quantizing method's field defaults (a LoRA run has no quant_type)
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps=1, train_subset=4, eval_subset=2, grad_accum=1,
                                           eval_before=False, max_new_tokens=2))
    results = run_training(cfg).to_dict()
    adapter = str(Path(results["run_dir"]) / "adapter")
    on_4bit = run_eval({}, adapter, base_precision="4bit")["metrics"]
    on_full = run_eval({}, adapter, base_precision="auto")["metrics"]
    assert on_full["eval_loss"] == pytest.approx(results["metrics"]["after"]["eval_loss"], rel=1e-6)
    assert on_4bit["eval_loss"] != on_full["eval_loss"]
    assert on_4bit["eval_loss"] == pytest.approx(on_full["eval_loss"], abs=0.1)
