"""Portable adapters: adapter_config.json names the base by its hub id (never a cache path), so peft's
AutoPeftModelForCausalLM loads it on another machine; the card says when the base was dequantized from a GGUF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlab.cli import main
from peftlab.models import cache_dir, tiny_model_dir
from peftlab.portable import portable_base_name

HUB_ID = "peftlab-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
IDS = [[1, 504, 3458, 282, 260, 1345, 314, 7, 2]]

LOAD_WITH_PEFT = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
json.dump({"base": model.peft_config["default"].base_model_name_or_path, "logits": logits.tolist()}, sys.stdout)
"""


def hub_cache_with(folder: Path, hub_id: str, root: Path) -> Path:
    """A hub cache (HF_HUB_CACHE) holding ``folder`` as ``hub_id``'s main revision, as a download leaves it."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA run on a local copy of tiny-llama whose config declares a hub id (as a downloaded folder does)."""
    tmp = tmp_path_factory.mktemp("portable")
    base = tmp / "my-base"
    shutil.copytree(tiny_model_dir("tiny-llama"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}))
    rows = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("yes", "no", "maybe", "never") * 2]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = tmp / "run"
    assert main(["train", "--task", "instruction", "--model", str(base), "--dataset", str(data), "--eval-dataset",
                 str(data), "--output-dir", str(run), "--batch-size", "4", "--grad-accum", "1", "--lr", "5e-2",
                 "--max-steps", "2", "--set", "precision=fp32", "--set", "eval_before=false",
                 "--set", "max_new_tokens=2"]) == 0
    return run


def test_adapter_config_names_the_hub_id_and_never_a_cache_path(trained: Path) -> None:
    text = (trained / "adapter" / "adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == HUB_ID
    assert str(cache_dir()) not in text and str(trained.parent) not in text and "/" + ".cache" not in text
    model = json.loads((trained / "results.json").read_text())["model"]
    assert model["adapter_base"] == HUB_ID and model["source"] == str(trained.parent / "my-base")


def test_auto_peft_model_loads_it_offline_from_the_hub_cache(trained: Path, tmp_path: Path) -> None:
    """A fresh process, offline, with the base only where the hub cache keeps HUB_ID: peft's own loader finds it
    and gives peftlab's logits."""
    from peftlab.evaluate import eval_config, load_for_eval

    hub = hub_cache_with(trained.parent / "my-base", HUB_ID, tmp_path / "hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_PEFT, str(trained / "adapter"), json.dumps(IDS)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded_by_peft = json.loads(proc.stdout)
    assert loaded_by_peft["base"] == HUB_ID
    adapter = str(trained / "adapter")
    _, model = load_for_eval(eval_config(adapter, {}), adapter, "auto")
    with torch.no_grad():
        ours = model(input_ids=torch.tensor(IDS)).logits
    assert ours.abs().max() > 0
    torch.testing.assert_close(torch.tensor(loaded_by_peft["logits"]), ours, rtol=1e-5, atol=1e-5)


def test_peftlab_eval_still_finds_the_base_offline(trained: Path, capsys) -> None:
    """`peftlab eval --adapter` loads the base the run used (its config), not the hub id, which no cache holds."""
    results = json.loads((trained / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(trained / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out) == results["metrics"]["after"]


def test_portable_base_name() -> None:
    assert portable_base_name("smollm2-135m", str(cache_dir() / "models" / "x")) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base_name("tiny-llama", str(tiny_model_dir("tiny-llama"))) == "tiny-llama"  # no hub model
    assert portable_base_name("org/model", "org/model") == "org/model"
    assert portable_base_name("./models/mine", "/abs/models/mine") == "./models/mine"  # the path as given


def test_card_says_the_base_was_dequantized_from_a_gguf() -> None:
    from peftlab.model_card import render

    def card(name: str) -> str:
        return render({"model": {"name": name, "source": "/somewhere"}, "method": {"name": "lora"}})

    smollm2 = card("smollm2-135m")
    sentence = ("The base weights are `HuggingFaceTB/SmolLM2-135M-Instruct` dequantized from a Q4_1 GGUF file, not "
                "the original bf16 release")
    assert sentence in smollm2
    assert smollm2.index("fine-tune of `smollm2-135m`") < smollm2.index(sentence) < smollm2.index("## Result")
    assert "dequantized from a Q4_K_M GGUF file" in card("gemma3-270m")
    assert "dequantized" not in card("tiny-llama") and "dequantized" not in card("org/model")
