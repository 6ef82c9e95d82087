"""Trackers (--report-to), model cards, and data in the shapes users have: headerless CSV, encodings, folders."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main
from peftlab.model_card import base_model_id, reproduce_command
from tests.conftest import tiny_overrides


def train_argv(tmp_path: Path, *extra: str, **over) -> list[str]:
    argv = ["train"]
    for key, value in tiny_overrides(tmp_path, train_subset=16, eval_subset=4, grad_accum=1, **over).items():
        if key in ("eval_before", "max_new_tokens"):
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + list(extra)


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("peftlab: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def front(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, head, rest = text.split("---\n", 2)
    return yaml.safe_load(head), rest


# --- trackers ---------------------------------------------------------------------------------------------------

needs = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("tensorboard", "mlflow")),
                           reason="tracking extra not installed")


@needs
def test_tensorboard_and_mlflow_hold_every_step(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(train_argv(tmp_path, "--report-to", "tensorboard,mlflow")) == 0
    results = json.loads((run / "results.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in steps if "loss" in row}
    assert len(losses) == results["timing"]["optimizer_steps"] == 4

    acc = EventAccumulator(str(run / "tracking" / "tensorboard" / "run"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == sorted(losses)
    assert all(abs(logged[s] - losses[s]) < 1e-5 for s in losses)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval_before/perplexity",
            "eval/perplexity", "final/train_time_s"} <= set(acc.Tags()["scalars"])

    client = MlflowClient(tracking_uri=(run / "tracking" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("peftlab")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_name == "run"
    assert found.data.params["method"] == "lora" and found.data.params["lr"] == "0.01"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == sorted(losses)
    assert abs(found.data.metrics["eval/perplexity"] - results["metrics"]["after"]["perplexity"]) < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_writes_its_run_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(train_argv(tmp_path, "--report-to", "wandb", "--set", "tracking_project=eco-sweep")) == 0
    runs = list((tmp_path / "run" / "tracking" / "wandb").rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb")), runs
    assert (tmp_path / "run" / "results.json").is_file()


@needs
def test_a_failing_tracker_never_loses_the_run(tmp_path, data_dir, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log folder should be")  # an unwritable log folder
    assert main(train_argv(tmp_path, "--report-to", "tensorboard", "--set", f"tracking_dir={blocked}")) == 0
    err = capsys.readouterr().err
    assert err.count("tracker tensorboard failed") == 1, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "done"


def test_unknown_tracker_and_missing_package(tmp_path, capsys, monkeypatch):
    line = error_line(capsys, train_argv(tmp_path, "--report-to", "comet"))
    assert "unknown tracker 'comet'" in line and "tensorboard" in line
    import peftlab.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda name: False)
    line = error_line(capsys, train_argv(tmp_path, "--report-to", "mlflow"))
    assert "pip install 'peftlab[tracking]'" in line and "mlflow" in line
    assert not (tmp_path / "run" / "results.json").exists()


# --- model cards ------------------------------------------------------------------------------------------------

def test_adapter_card_is_a_real_model_card(tmp_path, data_dir):
    assert main(train_argv(tmp_path)) == 0
    meta, text = front(tmp_path / "run" / "adapter" / "README.md")
    assert "base_model" not in meta  # tiny-llama stands for no hub model
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"peftlab", "lora"} <= set(meta["tags"]) and meta["datasets"] == ["wikitext-2-raw-v1"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert abs(metrics["perplexity"] - results["metrics"]["after"]["perplexity"]) < 1e-3
    assert "More Information Needed" not in text and str(Path.home()) not in text.split("## Data")[0]
    assert "| Model | Training Type |" in text and results["data"]["train"]["fingerprint"] in text
    assert "peftlab train --model tiny-llama" in text and "--train-subset 16" in text


def test_base_model_is_a_hub_id_never_a_path(tmp_path):
    assert base_model_id("smollm2-135m", "/root/.cache/peftlab/smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("tiny-llama") is None
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/base-7b"}))
    assert base_model_id(str(folder)) == "org/base-7b"
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/x"}))
    assert base_model_id(str(folder)) is None


def test_reproduce_command_lists_the_changed_fields():
    command = reproduce_command({"model": "smollm2-135m", "lr": 0.001, "warmup_ratio": 0.1, "output_dir": "x",
                                 "target_modules": ["q_proj", "v_proj"], "header": False})
    assert command == "peftlab train --lr 0.001 --set warmup_ratio=0.1 --set header=false"


# --- data in the shapes users have ------------------------------------------------------------------------------

def _headerless(path: Path, encoding: str = "utf-8") -> Path:
    rows = [f'{i % 2},"Title {i}","Body café {i} {"good" if i % 2 else "bad"}"' for i in range(24)]
    path.write_text("\n".join(rows) + "\n", encoding=encoding)
    return path


def _cls_argv(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--task", "classification", "--model", "tiny-llama", "--dataset", str(data), "--batch-size",
            "4", "--grad-accum", "1", "--max-steps", "2", "--output-dir", str(tmp_path / "run"), *extra]


def test_headerless_csv_with_joined_text_columns_trains(tmp_path):
    data = _headerless(tmp_path / "news.csv")
    assert main(_cls_argv(tmp_path, data, "--set", "header=false", "--text-column", "1,2",
                          "--label-column", "0")) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["train"]["source"] == f"file:{data}"  # no slice notation such as [:-1]
    assert "[" not in results["data"]["eval"]["source"]


def test_joined_text_uses_the_documented_separator(tmp_path):
    from peftlab.configure import load_config
    from peftlab.data.sources import TEXT_JOIN, load_splits

    data = _headerless(tmp_path / "news.csv")
    cfg = load_config(None, dict(task="classification", dataset=str(data), header=False, text_column="1,2",
                                 label_column="0"))
    splits = load_splits(cfg)
    assert splits.train.records[0]["1,2"] == "Title 0" + TEXT_JOIN + "Body café 0 bad"
    assert splits.eval.row_name(0) == "row 1 (line 24)"  # the last of 24 headerless lines is held out


def test_first_row_that_looks_like_data_suggests_header_false(tmp_path, capsys):
    data = _headerless(tmp_path / "news.csv")
    line = error_line(capsys, _cls_argv(tmp_path, data, "--text-column", "1", "--label-column", "0"))
    assert "first row looks like data" in line and "--set header=false" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_latin1_file_trains_with_encoding_and_the_utf8_error_names_the_option(tmp_path, capsys):
    data = _headerless(tmp_path / "latin.csv", encoding="latin-1")
    line = error_line(capsys, _cls_argv(tmp_path, data, "--set", "header=false", "--text-column", "2",
                                        "--label-column", "0"))
    assert "not valid UTF-8" in line and "--set encoding=" in line
    assert not (tmp_path / "run" / "results.json").exists()
    assert main(_cls_argv(tmp_path, data, "--set", "header=false", "--set", "encoding=latin-1", "--text-column",
                          "2", "--label-column", "0")) == 0


def test_unknown_encoding_is_one_line(tmp_path, capsys):
    line = error_line(capsys, _cls_argv(tmp_path, tmp_path / "x.csv", "--set", "encoding=latin-99"))
    assert "'encoding'" in line and "latin-99" in line


def test_directory_as_dataset_says_it_is_a_directory(tmp_path, capsys):
    folder = tmp_path / "mydata"
    folder.mkdir()
    line = error_line(capsys, _cls_argv(tmp_path, folder))
    assert "is a directory" in line and "does not exist" not in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_missing_joined_column_is_one_line(tmp_path, capsys):
    data = _headerless(tmp_path / "news.csv")
    line = error_line(capsys, _cls_argv(tmp_path, data, "--set", "header=false", "--text-column", "1,7",
                                        "--label-column", "0"))
    assert "no column '7'" in line


def test_folder_laid_out_as_a_hub_dataset_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hubdata"
    (folder / "data").mkdir(parents=True)
    rows = [{"text": f"sample {i} {'yes' if i % 2 else 'no'}", "label": i % 2} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows[:16]), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[16:]), folder / "data" / "validation-00000-of-00001.parquet")
    assert main(_cls_argv(tmp_path, folder)) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["eval"]["split"] == "validation"
    assert results["data"]["train"]["examples_used"] == 16


def test_folder_with_readme_configs_loads(tmp_path):
    from peftlab.configure import load_config
    from peftlab.data.sources import load_splits

    folder = tmp_path / "cfgdata"
    folder.mkdir()
    (folder / "all.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                                              for i in range(10)))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                      "  - split: train\n    path: all.jsonl\n---\n# data\n")
    plan = load_splits(load_config(None, dict(task="classification", dataset=str(folder))))
    assert len(plan.train.records) + len(plan.eval.records) == 10
    assert os.path.basename(plan.train.source).startswith("cfgdata")
