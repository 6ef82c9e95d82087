"""`peftlab sweep SWEEP.yaml --calibrate`: one short run per row, projected; `--dry-run` then estimates from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftlab.configure import load_config
from peftlab.errors import UserError
from peftlab.sweep.calibrate import WORK_DIR, calibration_rows, project, sweep_rows
from peftlab.sweep.runner import CALIBRATION_FILE, read_calibration, row_key
from peftlab.sweep.spec import load_sweep
from tests.conftest import SHARED_DATA
from tests.test_sweep import TINY_BASE, write_sweep

MEASURED = {"wall_s": 20.0, "first_step_s": 2.0, "step_s": 1.0, "load_s": 3.0, "train_s": 5.0, "eval_s": 8.0,
            "eval_used": 4, "eval_total": 100, "steps_per_epoch": 2.0, "generations": None, "precision": "fp32",
            "train_subset": 8}


def _peftlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTLAB_DATA_DIR": str(SHARED_DATA)}
    return subprocess.run([sys.executable, "-m", "peftlab", *args], capture_output=True, text=True, env=env,
                          timeout=900, check=False)


def test_rows_drop_the_seed_and_count_its_runs(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", {"base": TINY_BASE, "grid": {
        "method": ["lora", "full"], "seed": [1, 2, 3]}}))
    rows = sweep_rows(spec.runs)
    assert [r.run.id for r in rows] == ["lora-seed1", "full-seed1"]
    assert [r.runs for r in rows] == [3, 3]
    assert rows[0].key == row_key(spec.runs[1].fields)  # another seed of the row: the same key


def test_projection_scales_steps_and_evaluation_to_the_full_run():
    cfg = load_config(None, {**TINY_BASE, "train_subset": 16, "eval_subset": 10, "epochs": 2})
    p = project(cfg, MEASURED, gen_s=0.0, generations=2)
    # 2 steps per epoch measured on 8 examples -> 4 per epoch on 16, 2 epochs: 8 steps
    assert p["steps"] == 8
    assert p["train_s"] == pytest.approx(2.0 + 1.0 * 7)
    assert p["eval_s"] == pytest.approx(8.0 / 2 / 4 * 10)  # two evaluations of 4 examples; 10 in the full run
    assert p["rest_s"] == pytest.approx(20.0 - 5.0 - 8.0)
    assert p["run_s"] == pytest.approx(p["train_s"] + p["eval_s"] + p["rest_s"])


def test_generation_time_is_taken_out_of_the_examples_and_charged_per_generation():
    p = project(load_config(None, {**TINY_BASE, "generation_subset": 6}), MEASURED, gen_s=0.5, generations=2)
    assert p["eval_s"] == pytest.approx((8.0 / 2 - 2 * 0.5) / 4 * 2 + 6 * 0.5)


def test_a_shared_baseline_is_charged_once_to_the_first_row_that_needs_it(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", {"base": TINY_BASE, "grid": {
        "method": ["lora", "full"], "seed": [1, 2]}}))
    rows = sweep_rows(spec.runs)
    measured = {r.key: MEASURED for r in rows}
    calibration, table, total = calibration_rows(rows, measured, 0.0, 2)
    first, second = table
    assert calibration[0]["seconds"] == pytest.approx(first["run_s"] + first["eval_s"] / 2)
    assert calibration[1]["seconds"] == pytest.approx(second["run_s"])
    assert total == pytest.approx(2 * first["run_s"] + 2 * second["run_s"] + first["eval_s"])
    assert "seed" not in calibration[0]["fields"]


def test_a_malformed_calibration_names_the_command_that_writes_one(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text('{"rows": [{"fields": {}}]}')
    with pytest.raises(UserError, match=r"peftlab sweep SWEEP.yaml --calibrate"):
        read_calibration(tmp_path)


def test_calibrate_writes_the_calibration_that_the_dry_run_then_uses(tmp_path):
    if not (SHARED_DATA / "wikitext-2-raw-v1").is_dir():
        pytest.skip(f"dataset mirror not found at {SHARED_DATA}")
    sweep_file = write_sweep(tmp_path / "tiny.yaml", {"name": "tiny", "base": TINY_BASE, "grid": {
        "method": ["lora", "full"], "seed": [1, 2]}})
    out = tmp_path / "out"
    before = _peftlab("sweep", str(sweep_file), "--output-dir", str(out), "--dry-run")
    assert before.returncode == 0, before.stderr
    assert "(calibrated)" not in before.stdout

    done = _peftlab("sweep", str(sweep_file), "--output-dir", str(out), "--calibrate")
    assert done.returncode == 0, done.stderr + done.stdout
    calibration = json.loads((out / CALIBRATION_FILE).read_text())
    assert [row["fields"]["method"] for row in calibration["rows"]] == ["lora", "full"]
    assert all(row["seconds"] > 0 for row in calibration["rows"])
    runs = sorted(p.name for p in (out / WORK_DIR / "runs").iterdir())
    assert runs == ["full-seed1", "lora-seed1"]  # one short run per row, not per seed
    # the rows share a baseline, yet each short run computed its own (its evaluation time counts two evaluations)
    caches = list((out / WORK_DIR / "baselines").iterdir())
    assert len(caches) == 2 and all(any(c.iterdir()) for c in caches)
    assert not (out / "sweep.sqlite").exists()  # calibrating runs none of the sweep's runs

    after = _peftlab("sweep", str(sweep_file), "--output-dir", str(out), "--dry-run")
    assert after.returncode == 0, after.stderr
    lines = [line for line in after.stdout.splitlines() if "-seed" in line]
    assert len(lines) == 4 and all("(calibrated)" in line for line in lines)
    estimates = read_calibration(out)
    spec = load_sweep(sweep_file)
    assert set(estimates) == {row_key(r.fields) for r in spec.runs}

    again = _peftlab("sweep", str(sweep_file), "--output-dir", str(out), "--calibrate")  # measured rows are kept
    assert again.returncode == 0, again.stderr
    assert "calibrating" not in again.stdout
    assert json.loads((out / CALIBRATION_FILE).read_text())["rows"] == calibration["rows"]
