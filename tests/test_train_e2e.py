"""End to end on a tiny model: the loss falls, results.json is complete, the adapter reloads exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftlab.configure import load_config
from peftlab.evaluate import run_eval
from peftlab.loop import step_micro_batches
from peftlab.models import load_model
from peftlab.train import run_training
from tests.conftest import tiny_overrides

RESULT_FIELDS = {
    "timing": ["train_time_s", "time_per_epoch_s", "tokens_per_s", "eval_time_s", "optimizer_steps"],
    "memory": ["load", "train", "headline_gb"],
    "params": ["trainable_params", "total_params", "trainable_percent"],
    "artifact": ["path", "size_bytes"],
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = load_config(None, tiny_overrides(tmp, epochs=3))
    return cfg, run_training(cfg).to_dict()


def test_loss_falls_and_results_are_complete(lora_run):
    cfg, results = lora_run
    run_dir = results["run_dir"]
    rows = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl")]
    lines = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    assert len(lines) == results["timing"]["optimizer_steps"] == 12  # 32 blocks / (4 x 2) x 3 epochs
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert [e["epoch"] for e in evals] == [1, 2]  # evaluation at each epoch end (the last is "after")
    assert [e["epoch"] for e in results["metrics"]["per_epoch"]] == [1, 2]
    assert results["metrics"]["after"]["perplexity"] < results["metrics"]["before"]["perplexity"]
    for section, keys in RESULT_FIELDS.items():
        for key in keys:
            assert results[section][key] is not None, f"{section}.{key}"
    assert results["memory"]["train"]["cpu_peak_rss_gb"] > 0
    assert len(results["timing"]["epoch_times_s"]) == 3
    assert results["data"]["train"]["split"] == "validation" and results["data"]["eval"]["split"] == "test"
    assert results["data"]["notes"], "the offline split substitution must be recorded"
    assert results["versions"]["torch"] and results["seed"] == 42
    assert results["params"]["trainable_params"] == 2 * (2 * 8 * 64 + 8 * 64 + 8 * 32)  # q: 64->64, v: 64->32
    assert json.load(open(f"{run_dir}/results.json"))["status"] == "done"


def test_eval_of_saved_adapter_reproduces_perplexity(lora_run):
    cfg, results = lora_run
    again = run_eval({}, f"{results['run_dir']}/adapter")
    recorded = results["metrics"]["after"]["perplexity"]
    assert math.isclose(again["metrics"]["perplexity"], recorded, rel_tol=1e-4)


def test_eval_uses_the_requested_thread_count(lora_run, monkeypatch):
    cfg, results = lora_run
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run_eval({"threads": 1, "eval_subset": 2}, f"{results['run_dir']}/adapter")
    assert calls == [1]


def test_adapter_reload_gives_identical_logits(lora_run):
    from peft import PeftModel

    cfg, results = lora_run
    ids = torch.tensor([[1, 50, 300, 7, 9, 1000]])
    base = load_model(cfg).model
    reloaded = PeftModel.from_pretrained(base, f"{results['run_dir']}/adapter").eval()
    trained_logits = reloaded(input_ids=ids).logits
    plain = load_model(cfg).model.eval()
    assert not torch.allclose(plain(input_ids=ids).logits, trained_logits), "the adapter must change outputs"
    again = PeftModel.from_pretrained(load_model(cfg).model, f"{results['run_dir']}/adapter").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, trained_logits, rtol=0, atol=0)


def test_full_finetuning_saves_a_model(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, method="full", lr=1e-3, eval_before=False))
    results = run_training(cfg).to_dict()
    assert results["artifact"]["kind"] == "model"
    assert results["params"]["trainable_percent"] == 100.0
    assert results["metrics"]["before"] is None and results["metrics"]["after"]["perplexity"] > 0
    again = run_eval({"model": results["artifact"]["path"], "eval_subset": 8}, None)
    assert math.isclose(again["metrics"]["perplexity"], results["metrics"]["after"]["perplexity"], rel_tol=1e-4)


def test_micro_batches_split_across_ranks_cover_the_step():
    perm = torch.arange(32)
    one = step_micro_batches(perm, 1, batch=4, accum=2, world=1, rank=0)
    two = [step_micro_batches(perm, 1, batch=4, accum=1, world=2, rank=r) for r in (0, 1)]
    assert one == [two[0][0], two[1][0]] == [[8, 9, 10, 11], [12, 13, 14, 15]]
