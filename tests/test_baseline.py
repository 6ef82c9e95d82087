"""Per-example evaluation values are written with each run and read back; the baseline evaluation is computed once
per key and reused, and recomputed when the model, the data or the precision differs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from peftlab.baseline import CACHE_ENV
from peftlab.configure import load_config
from peftlab.per_example import read_stages
from peftlab.tasks.clm import CausalLMTask
from peftlab.train import run_training
from tests.conftest import tiny_overrides


@pytest.fixture
def before_calls(monkeypatch) -> list[str]:
    """The model of each 'before' evaluation that really ran (spying on the task's evaluate)."""
    calls: list[str] = []
    real = CausalLMTask.evaluate

    def spy(self, data, model, stage):
        if stage == "before":
            calls.append(self.cfg.model)
        return real(self, data, model, stage)

    monkeypatch.setattr(CausalLMTask, "evaluate", spy)
    return calls


def tiny_run(tmp_path, name: str, **extra) -> dict:
    cfg = load_config(None, tiny_overrides(tmp_path, output_dir=str(tmp_path / name), train_subset=8,
                                           eval_subset=4, max_steps=1, **extra))
    return run_training(cfg).to_dict()


def test_per_example_values_are_written_and_read_back(tmp_path, data_dir):
    results = tiny_run(tmp_path, "lora")
    stages = read_stages(results["run_dir"])
    assert sorted(stages) == ["after", "before"]
    for stage in ("before", "after"):
        blocks = stages[stage].values.groups["blocks"]
        assert stages[stage].size("blocks") == 4 and len(blocks["tokens"]) == 4
        assert set(blocks["tokens"]) == {127}  # block_size 128: 127 predicted tokens per block
        ppl = math.exp(math.fsum(blocks["nll"]) / sum(blocks["tokens"]))  # the ratio estimator on the full sample
        assert ppl == pytest.approx(results["metrics"][stage]["perplexity"], rel=1e-12)
    assert stages["after"].metrics["perplexity"] == results["metrics"]["after"]["perplexity"]
    on_disk = json.loads((tmp_path / "lora" / "eval_examples.json").read_text())
    assert on_disk["format"] == 1 and on_disk["task"] == "clm"


def test_baseline_is_reused_when_the_key_matches(tmp_path, data_dir, before_calls):
    first = tiny_run(tmp_path, "lora-seed1", method="lora", seed=1)
    second = tiny_run(tmp_path, "full-seed2", method="full", seed=2)  # full and LoRA start as the base model
    third = tiny_run(tmp_path, "lora-r4", method="lora", r=4, alpha=8, seed=3)
    assert before_calls == ["tiny-llama"]  # only the first run evaluated the base model
    before = [r["metrics"]["before"] for r in (first, second, third)]
    assert before[0]["baseline_reused"] is False and before[1]["baseline_reused"] is True
    assert before[0]["perplexity"] == before[1]["perplexity"] == before[2]["perplexity"]
    assert len({b["baseline_key"] for b in before}) == 1
    stages = [read_stages(r["run_dir"])["before"].values for r in (first, second)]
    assert stages[0] == stages[1]  # the cached per-example values are the run's own 'before' stage
    assert len(list(Path(os.environ[CACHE_ENV]).glob("*.json"))) == 1  # one entry, in the test's own cache


@pytest.mark.parametrize("change", [dict(model="tiny-mistral"), dict(eval_subset=6), dict(precision="bf16-mixed"),
                                    dict(method="dora")], ids=["model", "data", "precision", "dora"])
def test_baseline_is_recomputed_when_the_key_differs(tmp_path, data_dir, before_calls, change):
    first = tiny_run(tmp_path, "first")
    overrides = {"eval_subset": 4, **change}
    cfg = load_config(None, tiny_overrides(tmp_path, output_dir=str(tmp_path / "second"), train_subset=8,
                                           max_steps=1, **overrides))
    second = run_training(cfg).to_dict()
    assert len(before_calls) == 2
    assert second["metrics"]["before"]["baseline_reused"] is False
    assert second["metrics"]["before"]["baseline_key"] != first["metrics"]["before"]["baseline_key"]


def classification_run(tmp_path, name: str, cache: Path, monkeypatch, **extra) -> dict:
    from tests.test_classification import sentiment_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(12, offset=100))
    monkeypatch.setenv(CACHE_ENV, str(cache))
    cfg = load_config(None, dict(task="classification", model="tiny-llama", dataset=str(train),
                                 eval_dataset=str(evaluation), output_dir=str(tmp_path / name), batch_size=4,
                                 grad_accum=1, max_steps=1, max_length=16, precision="fp32", **extra))
    return run_training(cfg).to_dict()


def test_classification_values_and_a_new_head_shares_only_within_its_seed(tmp_path, monkeypatch):
    # full and LoRA with the same seed, each computed in its own cache: the same new head, the same baseline
    full = classification_run(tmp_path, "full", tmp_path / "cache-a", monkeypatch, method="full", seed=1)
    lora = classification_run(tmp_path, "lora", tmp_path / "cache-b", monkeypatch, method="lora", seed=1)
    values = [read_stages(r["run_dir"]) for r in (full, lora)]
    assert values[0]["before"].values == values[1]["before"].values
    assert full["metrics"]["before"]["baseline_key"] == lora["metrics"]["before"]["baseline_key"]
    examples = values[1]["after"].values
    assert examples.classes == 2 and sorted(examples.groups["examples"]) == ["correct", "label", "prediction"]
    assert sum(examples.groups["examples"]["correct"]) / 12 == pytest.approx(lora["metrics"]["after"]["accuracy"])
    predictions = [json.loads(x) for x in open(Path(lora["run_dir"]) / "predictions.jsonl")]
    assert [p["correct"] for p in predictions] == [bool(c) for c in examples.groups["examples"]["correct"]]
    # in one cache: the same seed reuses, another seed (another random head) evaluates its own
    again = classification_run(tmp_path, "lora-again", tmp_path / "cache-a", monkeypatch, method="lora", seed=1)
    other = classification_run(tmp_path, "lora-seed2", tmp_path / "cache-a", monkeypatch, method="lora", seed=2)
    assert again["metrics"]["before"]["baseline_reused"] is True
    assert other["metrics"]["before"]["baseline_reused"] is False
    base_predictions = [json.loads(x)["base_prediction"] for x in open(Path(again["run_dir"]) / "predictions.jsonl")]
    assert len(base_predictions) == 12  # the cached outputs give the base model's predictions too


def test_instruction_values_per_response_and_generation(tmp_path):
    from tests.test_classification import write_jsonl
    from tests.test_instruction import qa_rows

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(8))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", qa_rows(4))
    cfg = load_config(None, dict(task="instruction", model="tiny-llama", dataset=str(train),
                                 eval_dataset=str(evaluation), output_dir=str(tmp_path / "run"), batch_size=4,
                                 grad_accum=1, max_steps=1, max_length=96, max_new_tokens=4, generation_subset=3,
                                 precision="fp32"))
    results = run_training(cfg).to_dict()
    for stage in ("before", "after"):
        groups = read_stages(results["run_dir"])[stage].values.groups
        responses, generations = groups["responses"], groups["generations"]
        assert len(responses["nll"]) == 4 and len(generations["rougeL"]) == 3
        metrics = results["metrics"][stage]
        assert math.exp(math.fsum(responses["nll"]) / sum(responses["tokens"])) == pytest.approx(
            metrics["perplexity"], rel=1e-12)
        assert sum(generations["rougeL"]) / 3 == pytest.approx(metrics["rougeL"])
        assert sum(generations["exact_match"]) / 3 == pytest.approx(metrics["exact_match"])


def test_a_sweep_shares_its_baseline_in_its_folder_and_reports_intervals(tmp_path, data_dir):
    import yaml

    from peftlab.report import build_tables, markdown_table, read_sweep
    from peftlab.sweep.runner import run_sweep

    base = {"model": "tiny-llama", "train_subset": 8, "eval_subset": 6, "block_size": 32, "batch_size": 4,
            "grad_accum": 1, "max_steps": 2, "lr": 1e-2, "max_new_tokens": 4, "precision": "fp32"}
    grid = {"shape": [{"method": "lora", "r": 8, "alpha": 16}, {"id": "full", "method": "full"}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": base, "grid": grid}), encoding="utf-8")
    outcome = run_sweep(path, tmp_path / "out")
    assert outcome.failed == {}
    assert len(list((tmp_path / "out" / "baselines").glob("*.json"))) == 1  # the sweep's own cache, one entry
    (table,) = build_tables(read_sweep(tmp_path / "out").finished)
    rows = {g.first.method.name: g for g in table.groups}
    assert [rows["full"].first.metrics.before["baseline_reused"],
            rows["lora"].first.metrics.before["baseline_reused"]] == [True, False]  # lora ran first
    assert rows["full"].stats.ci is not None and rows["full"].stats.diff is not None
    assert rows["lora"].stats.is_reference
    assert "95% CI" in "\n".join(table.notes) and "| reference |" in markdown_table(table)
