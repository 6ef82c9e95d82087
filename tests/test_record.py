"""The run record: schema-1 files written by the old code load, records round-trip, bad files are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftlab.errors import UserError
from peftlab.record import RESULTS_FILE, RESULTS_SCHEMA, FailedRecord, RunRecord
from peftlab.summary import format_result_row

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMA1 = {"clm": FIXTURES / "results_schema1_clm.json", "instruction": FIXTURES / "results_schema1_inst.json"}


def run_dir_with(tmp_path: Path, fixture: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(fixture, run / RESULTS_FILE)
    return run


def test_a_schema1_results_json_loads_through_the_record(tmp_path):
    record = RunRecord.read(run_dir_with(tmp_path, SCHEMA1["clm"]))
    assert record.schema_version == RESULTS_SCHEMA == 2
    assert (record.model.name, record.method.name, record.task.name) == ("tiny-llama", "lora", "clm")
    assert record.method.fields == {"r": 8, "alpha": 16}  # schema 1 kept r and alpha at the top of the section
    assert record.method.target_modules == ["q_proj", "v_proj"]
    assert record.data.train.used == 16 and record.data.train.total == 2085 and record.data.eval.split == "test"
    assert record.params.trainable_params == 3584
    assert record.headline() == pytest.approx(46149.60716223635)
    assert record.metric("perplexity", "before") == pytest.approx(46152.468357655125)
    assert record.timing.optimizer_steps == 1 and record.memory.train.cpu_peak_rss_gb > 0
    assert record.memory.estimate["peak_phase"] == "forward_backward"  # the planner's open-ended dict is kept
    # the row that `peftlab train` printed for this run with the old code
    row = format_result_row(record).splitlines()
    assert row[0] == ("| Model | Training Type | LoRA Config (r, alpha) | Time/Epoch (min) | Perplexity ↓ "
                      "(before → after) | Memory (GB) |")
    assert row[2] == "| tiny-llama | LoRA | (8, 16) | 0.13 | 46152.47 → 46149.61 | 0.55 |"


def test_the_instruction_fixture_keeps_its_task_specific_keys(tmp_path):
    record = RunRecord.read(run_dir_with(tmp_path, SCHEMA1["instruction"]))
    assert record.task.metric == "rougeL" and record.task.higher_is_better is True
    extra = record.data.model_dump()
    assert extra["packing"] is False and extra["max_new_tokens"] == 4  # keys the record does not name survive
    assert record.metrics.after["generated_examples"] == 2
    assert record.sample["reference"] == "The capital city of South Korea is Seoul."
    header = format_result_row(record).splitlines()[0]
    assert "ROUGE-L ↑ (before → after)" in header and "BLEU ↑" in header and "Perplexity ↓" in header


@pytest.mark.parametrize("name", sorted(SCHEMA1))
def test_dumping_keeps_every_schema1_key(name):
    old = json.loads(SCHEMA1[name].read_text())
    new = RunRecord.from_dict(old).to_dict()
    assert new["schema"] == 2
    assert new["method"]["fields"] == {"r": 8, "alpha": 16}
    expected = {**old, "schema": 2, "method": {**old["method"], "fields": {"r": 8, "alpha": 16}}}
    assert new == expected  # the same keys and values, plus the additions


def test_a_record_round_trips_through_write_and_read(tmp_path):
    record = RunRecord.from_dict(json.loads(SCHEMA1["clm"].read_text()))
    path = record.write(tmp_path)
    assert path == tmp_path / RESULTS_FILE
    again = RunRecord.read(tmp_path)
    assert again == record
    assert again.to_dict() == record.to_dict()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_partial_record_writes_back_only_what_it_holds(tmp_path):
    record = RunRecord.from_dict({"status": "done", "config": {"model": "m"}, "task": {"metric": "x"}})
    assert record.to_dict() == {"status": "done", "config": {"model": "m"}, "task": {"metric": "x"}}
    assert record.headline() is None and record.data.train is None


def test_a_truncated_results_json_is_a_one_line_error_naming_the_file(tmp_path):
    text = SCHEMA1["clm"].read_text()
    (tmp_path / RESULTS_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(UserError) as err:
        RunRecord.read(tmp_path)
    message = str(err.value)
    assert str(tmp_path / RESULTS_FILE) in message and "not valid JSON" in message
    assert "\n" not in message
    assert RunRecord.read_if_valid(tmp_path) is None


def test_a_future_schema_is_refused_clearly(tmp_path):
    data = json.loads(SCHEMA1["clm"].read_text())
    data["schema"] = RESULTS_SCHEMA + 1
    (tmp_path / RESULTS_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"schema 3 is newer than this peftlab reads \(up to 2\); upgrade peftlab"):
        RunRecord.read(tmp_path)
    with pytest.raises(UserError, match="is not a results.json schema version"):
        RunRecord.from_dict({**data, "schema": "two"}, "x.json")


def test_a_wrong_type_names_the_field_and_a_missing_file_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=r"^x.json: params.trainable_params: "):
        RunRecord.from_dict({"params": {"trainable_params": "many"}}, "x.json")
    with pytest.raises(UserError, match="no results.json here"):
        RunRecord.read(tmp_path)
    with pytest.raises(UserError, match="expected a JSON object"):
        RunRecord.from_json("[1, 2]", "y.json")


def test_failed_json_round_trips_and_a_cut_one_reads_as_none(tmp_path):
    FailedRecord(error="out of memory", time="t", step=4).write(tmp_path)
    failed = FailedRecord.read(tmp_path)
    assert (failed.status, failed.error, failed.model_extra["step"]) == ("failed", "out of memory", 4)
    (tmp_path / "failed.json").write_text('{"status": "fai')
    assert FailedRecord.read(tmp_path) is None
