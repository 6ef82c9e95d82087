"""`peftlab export`: GGUF files (f16, q8_0) load back with transformers and match the merged model within the pinned
tolerances, a safetensors export is `peftlab merge`'s output, and bad inputs are one line, exit code 2, no file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.configure import load_config
from peftlab.export import TOLERANCES, run_export
from peftlab.merge import run_merge
from peftlab.models import load_model, smollm2_tokenizer_dir
from peftlab.train import run_training
from tests.conftest import tiny_overrides

FAST = dict(train_subset=8, eval_subset=4, grad_accum=1, lr=1e-2, eval_before=False, max_new_tokens=4)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter trained for two steps on tiny-llama (tiny-mistral has the same shapes: it fits both)."""
    tmp = tmp_path_factory.mktemp("export")
    text = tmp / "repetitive.txt"
    text.write_text(" the quick brown fox jumps over the lazy dog .\n" * 200, encoding="utf-8")
    results = run_training(load_config(None, tiny_overrides(tmp, method="lora", dataset=str(text),
                                                            eval_dataset=str(text), **FAST))).to_dict()
    return Path(results["run_dir"]) / "adapter"


def _check_gguf_file(out: Path, outtype: str) -> None:
    """Architecture, tokenizer keys and tensor types, read with transformers' fast header reader."""
    from gguf import GGMLQuantizationType as Q
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(out))
    assert metadata["general.architecture"] == "llama" and metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "gpt-2"  # the SmolLM2 tokenizer: byte-level, GPT-2's regex
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.rope.dimension_count", "llama.attention.head_count_kv"):
        assert key in metadata, key
    types = GgufHeader.from_file(str(out)).ggml_types
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["output_norm.weight"] == Q.F32
    matrix = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    assert types["blk.0.attn_q.weight"] == matrix and types["token_embd.weight"] == matrix


@pytest.mark.parametrize("model,outtype", [
    ("tiny-llama", "f16"), ("tiny-llama", "q8_0"),
    pytest.param("tiny-mistral", "q8_0", marks=pytest.mark.slow)])  # the same shapes as tiny-llama: +12 s
def test_gguf_loads_back_and_matches(adapter, tmp_path, model, outtype):
    out = tmp_path / "new" / "folder" / f"model-{outtype}.gguf"  # export creates the folder
    report = run_export(str(adapter), str(out), "gguf", outtype, {"model": model})
    # the command loaded the file back with transformers; merged vs base + adapter closes the chain
    assert report["gguf_vs_merged"]["max_rel_diff"] <= TOLERANCES[outtype]
    assert report["merged_vs_adapter"]["max_rel_diff"] <= 1e-4
    assert report["tokenizer_matches"] and report["model_type"] == model.removeprefix("tiny-")
    assert json.loads(Path(f"{out}.json").read_text())["gguf_vs_merged"] == report["gguf_vs_merged"]
    assert "peftlab export" in Path(f"{out}.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, f"{out.name}.json", f"{out.name}.md"])
    _check_gguf_file(out, outtype)


def test_mistral_gguf_is_written_as_llama(adapter, tmp_path):
    """tiny-mistral without the transformers round trip (see the slow case above): GGUF arch llama, same layout."""
    from peftlab.export import write_gguf
    from peftlab.merge import merge_adapter, merge_config

    path, cfg = merge_config(str(adapter), {"model": "tiny-mistral"})
    write_gguf(merge_adapter(path, cfg), tmp_path / "mistral.gguf", "f16", name="mistral-test")
    _check_gguf_file(tmp_path / "mistral.gguf", "f16")


def test_a_file_outside_tolerance_is_not_kept(adapter, tmp_path, monkeypatch):
    import peftlab.export as export
    from peftlab.errors import UserError

    off = {"gguf_vs_merged": {"max_abs_diff": 1.0, "max_rel_diff": float("nan")}, "tokenizer_matches": True}
    monkeypatch.setattr(export, "verify_gguf", lambda *args: off)
    with pytest.raises(UserError, match="GGUF check failed"):
        run_export(str(adapter), str(tmp_path / "bad.gguf"), "gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_export_is_the_merge(adapter, tmp_path):
    report = run_export(str(adapter), str(tmp_path / "exported"), "safetensors")
    run_merge(str(adapter), str(tmp_path / "merged"))
    assert report["format"] == "safetensors"
    exported, merged = (load_file(tmp_path / d / "model.safetensors") for d in ("exported", "merged"))
    assert exported.keys() == merged.keys()
    assert all(torch.equal(exported[k], merged[k]) for k in exported)
    assert (tmp_path / "exported" / "README.md").is_file() and (tmp_path / "exported" / "tokenizer.json").is_file()


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab", "export", *args], capture_output=True, text=True)


def _prefix_adapter(tmp_path: Path) -> Path:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    model = get_peft_model(load_model(load_config(None, {"model": "tiny-llama"})).model,
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "prefix")
    return tmp_path / "prefix"


def _gpt2_model(tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path / "tiny-gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=49152, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        folder)
    shutil.copytree(smollm2_tokenizer_dir(), folder, dirs_exist_ok=True)
    return folder


def _classification_run(tmp_path: Path) -> Path:
    """A classification run's folder as the CLI sees it: its config.yaml beside the adapter."""
    run = tmp_path / "cls-run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny-llama", "task": "classification",
                                                     "method": "lora", "dataset": "sst2"}))
    return run / "adapter"


def test_bad_inputs_are_one_line_and_leave_no_file(adapter, tmp_path):
    out = tmp_path / "out.gguf"
    existing = tmp_path / "existing.gguf"
    existing.write_text("keep me")
    cases = [
        (["--adapter", str(_prefix_adapter(tmp_path)), "--model", "tiny-llama"], "cannot be merged", out),
        (["--adapter", str(adapter), "--model", str(_gpt2_model(tmp_path))], "'gpt2'", out),
        (["--adapter", str(_classification_run(tmp_path))], "classification task", out),
        (["--adapter", str(adapter), "--outtype", "q4_k"], "--outtype 'q4_k'", out),
        (["--adapter", str(adapter), "--format", "onnx"], "--format 'onnx'", out),
        (["--adapter", str(adapter)], "pass --overwrite", existing),
    ]
    for args, message, target in cases:
        proc = _export_cli(*args, "--output", str(target))
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("peftlab: error:") and message in lines[0], (args, lines)
        assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    assert existing.read_text() == "keep me"
