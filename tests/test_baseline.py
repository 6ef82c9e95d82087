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
    return run_training(cfg)


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
    second = run_training(cfg)
    assert len(before_calls) == 2
    assert second["metrics"]["before"]["baseline_reused"] is False
    assert second["metrics"]["before"]["baseline_key"] != first["metrics"]["before"]["baseline_key"]
