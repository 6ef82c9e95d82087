"""`peftlab merge`: merged logits match base + adapter (1e-4 relative, fp32), QLoRA merges into the dequantized
base, and prefix adapters or adapters of another model size are refused with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.configure import load_config
from peftlab.evaluate import attach_adapter
from peftlab.merge import fixed_batch, logits_of, run_merge
from peftlab.models import load_model, smollm2_tokenizer_dir
from peftlab.train import run_training
from tests.conftest import tiny_overrides

FAST = dict(train_subset=8, eval_subset=4, grad_accum=1, lr=1e-2, eval_before=False, max_new_tokens=4)


def relative_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).abs().max() / reference.abs().max())


@pytest.fixture(scope="module", params=["lora", "qlora", "ia3"])
def trained_adapter(request, tmp_path_factory):
    if request.param == "qlora":
        pytest.importorskip("bitsandbytes")
    tmp = tmp_path_factory.mktemp(request.param)
    text = tmp / "repetitive.txt"
    text.write_text(" the quick brown fox jumps over the lazy dog .\n" * 200, encoding="utf-8")
    overrides = tiny_overrides(tmp, method=request.param, dataset=str(text), eval_dataset=str(text), **FAST)
    results = run_training(load_config(None, overrides)).to_dict()
    return request.param, Path(results["run_dir"]) / "adapter"


def test_merged_model_matches_base_plus_adapter(trained_adapter, tmp_path):
    method, adapter = trained_adapter
    out = tmp_path / "merged"
    report = run_merge(str(adapter), str(out))
    assert report["merged_vs_adapter"]["max_rel_diff"] <= 1e-4
    assert json.loads((out / "merge_info.json").read_text())["merged_vs_adapter"] == report["merged_vs_adapter"]
    card = (out / "README.md").read_text()  # the merged folder's model card
    assert card.startswith("---\nlibrary_name: transformers") and "peftlab merge" in card and "merge" in card

    # Independently: reload the saved folder as a plain model and compare with a fresh base + adapter.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cfg = load_config(None, {"model": "tiny-llama", "method": method} if method == "qlora" else {"model": "tiny-llama"})
    base = load_model(cfg, quantize_4bit=method == "qlora").model
    ids = fixed_batch(merged.config.vocab_size, torch.device("cpu"))
    plain_base = logits_of(load_model(load_config(None, {"model": "tiny-llama"})).model, ids)
    with_adapter = logits_of(attach_adapter(base, adapter), ids)
    merged_logits = logits_of(merged, ids)
    assert relative_diff(with_adapter, merged_logits) <= 1e-4
    assert relative_diff(plain_base, merged_logits) > 1e-3  # the adapter really changed the weights
    # a plain model: no adapter files, no adapter or 4-bit tensors, no quantization config
    assert not (out / "adapter_config.json").exists()
    assert not [k for k in load_file(out / "model.safetensors") if "lora" in k or "ia3" in k or "absmax" in k]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    if method == "qlora":
        assert report["merged_vs_4bit_adapter"]["max_rel_diff"] <= 1e-4


def _merge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab", "merge", *args], capture_output=True, text=True)


def test_prefix_adapter_cannot_be_merged(tmp_path):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    model = get_peft_model(load_model(load_config(None, {"model": "tiny-llama"})).model,
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "adapter")
    proc = _merge_cli("--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out"),
                      "--model", "tiny-llama")
    assert proc.returncode == 2
    assert "PREFIX_TUNING" in proc.stderr and "cannot be merged" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_model_size_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "narrow-llama"  # hidden 32 instead of tiny-llama's 64
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    shutil.copytree(smollm2_tokenizer_dir(), other, dirs_exist_ok=True)
    model = get_peft_model(load_model(load_config(None, {"model": "tiny-llama"})).model,
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    proc = _merge_cli("--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out"),
                      "--model", str(other))
    assert proc.returncode == 2
    assert "does not fit this base model" in proc.stderr


def test_output_dir_with_other_content_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    proc = _merge_cli("--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    proc = _merge_cli("--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out"), "--overwrite")
    assert proc.returncode == 2 and "other than a model" in proc.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_a_prefix_runs_refusal_comes_from_its_method(tmp_path):
    from peftlab.errors import UserError
    from peftlab.methods import get_method

    results = run_training(load_config(None, tiny_overrides(tmp_path, method="prefix", max_steps=1, **FAST))).to_dict()
    with pytest.raises(UserError) as err:
        run_merge(str(Path(results["run_dir"]) / "adapter"), str(tmp_path / "out"))
    assert get_method("prefix").unsupported["merge"] in str(err.value) and "PREFIX_TUNING" in str(err.value)
    assert not (tmp_path / "out").exists()
