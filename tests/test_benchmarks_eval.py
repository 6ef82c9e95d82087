"""General-ability benchmarks through lm-eval, offline: the shipped tasks on a tiny model, per-item values in
eval_examples.json, forgetting with its paired interval, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from peftlab.cli import main
from peftlab.configure import load_config
from peftlab.evals import SHIPPED, BenchmarkStages, forgetting
from peftlab.evals.harness import BenchmarkScore
from peftlab.evals.suite import TEMPLATES
from peftlab.per_example import read_benchmark_stages, read_stages
from peftlab.record import RunRecord
from peftlab.train import run_training
from tests.conftest import tiny_overrides
from tests.test_bad_input import assert_one_line_error, run_cli

ITEMS = 8


@pytest.fixture(scope="module")
def untrained_lora():
    """tiny-llama with a fresh LoRA adapter (B = 0: the same function as its base)."""
    from peftlab.methods import get_method
    from peftlab.models import load_model

    cfg = load_config(None, dict(model="tiny-llama", method="lora", precision="fp32"))
    loaded = load_model(cfg)
    return loaded, get_method("lora").apply(loaded.model, cfg, "causal_lm", [])


def test_every_shipped_task_scores_items_offline_and_untrained_forgets_nothing(untrained_lora, tmp_path, data_dir,
                                                                               monkeypatch):
    import socket

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"

    def no_network(*args, **kwargs):
        raise AssertionError(f"the benchmark path opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded, model = untrained_lora
    cfg = load_config(None, dict(model="tiny-llama", benchmarks=",".join(SHIPPED), benchmark_limit=ITEMS,
                                 precision="fp32", batch_size=8))
    stages = BenchmarkStages.for_config(cfg)
    before = stages.score("before", model, loaded, tmp_path)
    after = stages.score("after", model, loaded, tmp_path)
    assert list(before) == list(SHIPPED)
    for name, s in before.items():
        assert s.items["doc_id"] == list(range(ITEMS)), name
        assert set(s.items["acc"]) <= {0.0, 1.0}
        assert s.metrics["acc"] == pytest.approx(sum(s.items["acc"]) / ITEMS)  # per-item values make the metric
        assert ("acc_norm" in s.metrics) == (name not in ("winogrande", "boolq"))  # as lm-eval's own tasks
    saved = read_benchmark_stages(tmp_path)
    assert set(saved) == {"before", "after"} and set(saved["after"]) == set(SHIPPED)
    assert saved["before"]["piqa"]["items"]["acc"] == before["piqa"].items["acc"]
    record = stages.record()
    for name in SHIPPED:
        change = record["benchmarks"][name].forgetting["acc"]
        assert (change.estimate, change.lo, change.hi) == (0.0, 0.0, 0.0), name
        assert record["benchmarks"][name].items == ITEMS
    assert after["hellaswag"].items == before["hellaswag"].items


def test_forgetting_is_a_paired_bootstrap_over_items():
    ids = list(range(10))
    before = BenchmarkScore("x", {"acc": 0.5}, {"doc_id": ids, "acc": [1.0] * 5 + [0.0] * 5})
    after = BenchmarkScore("x", {"acc": 0.2}, {"doc_id": ids, "acc": [1.0, 1.0] + [0.0] * 8})
    change = forgetting(before, after)["acc"]
    assert change.estimate == pytest.approx(-0.3)
    assert change.lo < -0.3 < change.hi <= 0.0  # only losses: the interval never crosses into gains
    with pytest.raises(Exception, match="different items"):
        forgetting(before, BenchmarkScore("x", {"acc": 0.0}, {"doc_id": ids[:5], "acc": [0.0] * 5}))


def test_training_records_benchmarks_before_and_after(tmp_path, data_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps=1, benchmarks="arc_easy,winogrande",
                                           benchmark_limit=ITEMS))
    record = RunRecord.read(run_training(cfg).run_dir)
    assert set(record.benchmarks) == {"arc_easy", "winogrande"}
    arc = record.benchmarks["arc_easy"]
    assert arc.items == ITEMS and arc.limit == ITEMS
    assert set(arc.before) == set(arc.after) == {"acc", "acc_norm"}
    assert arc.forgetting["acc"].estimate == pytest.approx(arc.after["acc"] - arc.before["acc"])
    assert arc.forgetting["acc"].lo <= arc.forgetting["acc"].estimate <= arc.forgetting["acc"].hi
    assert record.benchmark_time_s > 0
    stored = read_benchmark_stages(record.run_dir)
    assert len(stored["after"]["winogrande"]["items"]["acc"]) == ITEMS
    assert set(read_stages(record.run_dir)) == {"before", "after"}  # the task's own stages are kept beside


def test_eval_command_scores_benchmarks_only(tmp_path, capsys, data_dir):
    code = main(["eval", "--model", "tiny-llama", "--precision", "fp32", "--benchmarks", "boolq",
                 "--benchmark-limit", "4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["metrics"]) == {"boolq/acc"} and out["benchmarks"]["boolq"]["items"] == 4
    assert len(out["benchmarks"]["boolq"]["per_item"]["acc"]) == 4


def test_a_local_task_file(tmp_path, capsys, data_dir):
    """A task YAML given by path: here the shipped boolq under another name, read from its rendered copy."""
    from peftlab.evals.suite import render_shipped

    text = (render_shipped(["boolq"], data_dir) / "boolq.yaml").read_text().replace("task: boolq", "task: my_boolq")
    (tmp_path / "mine.yaml").write_text(text)
    code = main(["eval", "--model", "tiny-llama", "--precision", "fp32", "--benchmarks", str(tmp_path / "mine.yaml"),
                 "--benchmark-limit", "2"])
    assert code == 0
    assert set(json.loads(capsys.readouterr().out)) == {"my_boolq/acc"}


def test_shipped_templates_parse_and_name_their_files():
    for name in SHIPPED:
        config = yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text().replace("!function ", ""))
        assert config["task"] == name and config["dataset_path"] == "json"
        assert "${BENCHMARKS_DIR}" in json.dumps(config["dataset_kwargs"])


# --- bad input: one line, exit 2 ---------------------------------------------------------------------------------
def test_unknown_benchmark_names_the_nearest(capsys):
    code, line = run_cli(["eval", "--model", "tiny-llama", "--benchmarks", "arc_esay"], capsys)
    assert_one_line_error(code, line, "unknown benchmark 'arc_esay'", "arc_easy")


def test_task_file_that_does_not_parse(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n  dataset_path: json\n")
    code, line = run_cli(["eval", "--model", "tiny-llama", "--benchmarks", str(bad)], capsys)
    assert_one_line_error(code, line, "bad.yaml", "does not parse")


def test_limit_zero(capsys):
    code, line = run_cli(["eval", "--model", "tiny-llama", "--benchmarks", "piqa", "--benchmark-limit", "0"], capsys)
    assert_one_line_error(code, line, "benchmark_limit")


def test_data_dir_without_benchmark_files(tmp_path, capsys):
    code, line = run_cli(["eval", "--model", "tiny-llama", "--benchmarks", "piqa", "--data-dir", str(tmp_path)],
                         capsys)
    assert_one_line_error(code, line, "benchmark piqa", "PEFTLAB_DATA_DIR")


def test_train_refuses_before_loading_the_model(tmp_path, capsys, data_dir):
    args = ["train", "--model", "tiny-llama", "--max-steps", "1", "--output-dir", str(tmp_path / "run"),
            "--benchmarks", "hellaswag,nope_task"]
    code, line = run_cli(args, capsys)
    assert_one_line_error(code, line, "unknown benchmark 'nope_task'")


# --- reports: a column per benchmark, forgetting named in the findings ---------------------------------------------
def _with_benchmarks(results: dict, arc: tuple[float, float, float], piqa: tuple[float, float, float]) -> dict:
    def block(change):
        est, lo, hi = change
        return {"items": 500, "limit": 500, "before": {"acc": 0.5, "acc_norm": 0.5},
                "after": {"acc": 0.5 + est, "acc_norm": 0.5 + est},
                "forgetting": {m: {"estimate": est, "lo": lo, "hi": hi, "resamples": 2000}
                               for m in ("acc", "acc_norm")}}

    return {**results, "benchmarks": {"arc_easy": block(arc), "piqa": block(piqa)}}


def test_tables_and_findings_show_forgetting(tmp_path):
    from peftlab.report.findings import table_findings
    from peftlab.report.tables import build_tables, read_sweep
    from tests.test_report import make_results, make_store

    full = _with_benchmarks(make_results("a", task="instruction", method="full", seed=1, after={"rougeL": 0.3}),
                            arc=(-0.06, -0.09, -0.03), piqa=(0.0, -0.02, 0.02))
    lora = _with_benchmarks(make_results("b", task="instruction", method="lora", seed=1, after={"rougeL": 0.25}),
                            arc=(-0.01, -0.03, 0.01), piqa=(0.03, 0.01, 0.05))
    folder = make_store(tmp_path / "sweep", [("full", full), ("lora", lora)])
    (table,) = build_tables(read_sweep(folder).finished)
    headers = table.headers()
    assert headers[-2:] == ["arc_easy Δacc_norm ↑", "piqa Δacc_norm ↑"]
    cells = {g.first.method.name: table.cells(g) for g in table.groups}
    assert cells["full"][-2] == "-0.060 [-0.090, -0.030] *"
    assert cells["lora"][-2] == "-0.010 [-0.030, +0.010]"
    note = next(n for n in table.notes if n.startswith("Benchmarks"))
    assert "arc_easy (grade-school science questions (4 choices), chance 25%; 500 items)" in note
    sentence = next(s for s in table_findings(table) if s.startswith("Forgetting"))
    forgot = sentence.split(". Gains")[0]
    assert "Full on arc_easy Δacc_norm -0.060 [-0.090, -0.030]" in forgot and "LoRA" not in forgot
    assert "Gains beyond noise: LoRA (8, 16) on piqa Δacc_norm +0.030" in sentence
