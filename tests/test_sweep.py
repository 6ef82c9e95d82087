"""Sweeps: grid expansion and ids, validation before any run, the SQLite store, and real tiny sweeps in processes
(a SIGKILL partway then a rerun that finishes only the missing runs; a run with a bad target module fails alone)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.errors import UserError
from peftlab.record import FAILED_FILE, RunRecord
from peftlab.sweep.runner import (
    CALIBRATION_FILE,
    ROUGH_OVERHEAD_S,
    ROUGH_TOKENS_PER_S,
    check_store_matches,
    failure_message,
    format_preview,
    preview_sweep,
    rough_seconds,
    run_sweep,
)
from peftlab.sweep.spec import id_segment, load_sweep
from peftlab.sweep.store import SweepStore
from tests.conftest import REPO, SHARED_DATA

TINY_BASE = {"model": "tiny-llama", "train_subset": 8, "eval_subset": 2, "block_size": 32, "batch_size": 4,
             "grad_accum": 1, "max_new_tokens": 4, "eval_before": False}


def write_sweep(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- expansion and ids ---------------------------------------------------------------------------------------
def test_plain_and_coupled_axes_expand_to_the_product_in_order(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", {
        "base": {"model": "tiny-llama", "r": 4, "alpha": 8, "dropout": 0.05},
        "grid": {"model": ["tiny-llama", "tiny-mistral"],
                 "shape": [{"id": "full", "method": "full"}, {"method": "lora", "r": 8, "alpha": 16}],
                 "seed": [1, 2]}}))
    assert [r.id for r in spec.runs] == [
        "tiny-llama-full-seed1", "tiny-llama-full-seed2", "tiny-llama-lora-r8-a16-seed1",
        "tiny-llama-lora-r8-a16-seed2", "tiny-mistral-full-seed1", "tiny-mistral-full-seed2",
        "tiny-mistral-lora-r8-a16-seed1", "tiny-mistral-lora-r8-a16-seed2"]
    full, lora = spec.runs[0], spec.runs[2]
    # base method fields apply only where the method takes them: full runs drop r, alpha, dropout
    assert full.fields == {"model": "tiny-llama", "method": "full", "seed": 1}
    assert full.config.method == "full" and full.config.seed == 1
    assert lora.fields == {"model": "tiny-llama", "r": 8, "alpha": 16.0, "dropout": 0.05, "method": "lora",
                           "seed": 1}
    assert (lora.config.r, lora.config.alpha, lora.config.dropout) == (8, 16.0, 0.05)


def test_grids_union_parts_with_their_own_base_and_yaml_anchors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("""
base: {model: tiny-llama, lr: 1.0e-3}
grids:
  - id: lm
    base: {task: clm, lr: 2.0e-3}
    grid:
      shape: &shapes
        - {id: full, method: full}
        - {method: lora, r: 4, alpha: 8}
  - id: ft
    base: {task: clm, block_size: 64}
    grid: {shape: *shapes, seed: [7]}
""", encoding="utf-8")
    spec = load_sweep(path)
    assert [r.id for r in spec.runs] == ["lm-full", "lm-lora-r4-a8", "ft-full-seed7", "ft-lora-r4-a8-seed7"]
    assert spec.runs[0].config.lr == 2e-3  # the part's base wins over the top base
    assert spec.runs[2].config.lr == 1e-3 and spec.runs[2].config.block_size == 64


def test_id_segments_are_readable():
    assert id_segment("model", "mistralai/Mistral-7B-v0.1") == "Mistral-7B-v0.1"
    assert id_segment("lr", 0.0002) == "lr0.0002"
    assert id_segment("alpha", 16.0) == "a16"
    assert id_segment("seed", 3) == "seed3"
    assert id_segment("packing", True) == "packing" and id_segment("packing", False) == "no-packing"
    assert id_segment("target_modules", ["q_proj", "v_proj"]) == "q_proj+v_proj"
    assert id_segment("dataset", "data/my file.jsonl") == "my_file.jsonl"


def test_ids_and_fingerprint_are_stable_and_track_the_definition(tmp_path):
    data = {"base": TINY_BASE, "grid": {"r": [4, 8]}}
    a = load_sweep(write_sweep(tmp_path / "a.yaml", data))
    b = load_sweep(write_sweep(tmp_path / "b.yaml", data))
    assert [r.id for r in a.runs] == [r.id for r in b.runs] == ["r4", "r8"]
    assert a.fingerprint == b.fingerprint
    changed = load_sweep(write_sweep(tmp_path / "c.yaml", {"base": {**TINY_BASE, "lr": 1e-3}, "grid": {"r": [4, 8]}}))
    assert changed.fingerprint != a.fingerprint


# --- validation before any run -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"base": {"trian_subset": 8}, "grid": {"r": [4]}},
     "unknown config field 'trian_subset' (did you mean 'train_subset'?)"),
    ({"grid": {"sed": [1, 2]}}, "unknown config field 'sed' (did you mean 'seed'?)"),
    ({"grid": {"shape": [{"method": "lora", "rank": 4}]}}, "entry 1: unknown config field 'rank'"),
    ({"grid": {"r": []}}, "expands to zero runs"),
    ({"grids": []}, "expands to zero runs"),
    ({"base": {"output_dir": "x"}, "grid": {"r": [4]}}, "the sweep sets 'output_dir' itself"),
    ({"grid": {"r": [4], "shape": [{"r": 8}]}}, "field 'r' is set by both axes 'r' and 'shape'"),
    ({"grid": {"shape": [{"id": "a", "r": 4}, {"id": "a", "r": 8}]}}, "both get the id 'a'"),
    ({"grid": {"r": [4, 0]}}, "(run r0)"),
    ({"grid": {"shape": [{"method": "full", "r": 8}]}}, "method 'full' does not take r"),
    ({"grid": {"r": [4, {"r": 8}]}}, "mixes mappings and plain values"),
    ({"grid": {"r": 4}}, "must be a list of values"),
    ({"grid": {"r": [4]}, "grids": []}, "exactly one of grid"),
    ({"gird": {"r": [4]}}, "unknown top-level key 'gird'"),
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, data, message):
    path = write_sweep(tmp_path / "bad.yaml", data)
    with pytest.raises(UserError) as err:
        run_sweep(path, tmp_path / "out")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing was created


# --- store semantics ---------------------------------------------------------------------------------------------
def _store_with(tmp_path: Path, spec, statuses: dict[str, str], wall: float = 100.0) -> SweepStore:
    store = SweepStore.open(tmp_path / "out")
    store.set_meta({"fingerprint": spec.fingerprint})
    store.add_runs([(r.id, r.fields) for r in spec.runs])
    for run in spec.runs:
        state = statuses.get(run.id)
        if state in ("running", "done", "failed"):
            store.mark_running(run.id, None)
        if state == "done":
            store.mark_done(run.id, RunRecord.from_dict({"config": run.config.model_dump(mode="json")}), wall, 0)
        elif state == "failed":
            store.mark_failed(run.id, "boom", 1.0, 2, "tail")
    return store


def test_store_refuses_a_different_sweep_definition(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [4, 8]}}))
    _store_with(tmp_path, spec, {}).close()
    other = load_sweep(write_sweep(tmp_path / "b.yaml", {"base": TINY_BASE, "grid": {"r": [4, 16]}}))
    store = SweepStore.open(tmp_path / "out")
    with pytest.raises(UserError, match="different sweep definition .*added: r16; removed: r8"):
        check_store_matches(store, other)
    check_store_matches(store, spec)  # the same definition is accepted
    with pytest.raises(UserError, match="different sweep definition"):
        run_sweep(tmp_path / "b.yaml", tmp_path / "out")


def test_a_new_store_appears_with_its_tables(tmp_path, monkeypatch):
    """A reader polling the folder must never find a sweep.sqlite without tables (a race CI once hit)."""
    import peftlab.sweep.store as store_module

    seen = []
    real_link = os.link

    def link_and_read(src, dst):  # the instant the store becomes visible, a reader opens it
        real_link(src, dst)
        reader = SweepStore.open(Path(dst).parent, create=False, read_only=True)
        seen.append(reader.counts())
        reader.close()

    monkeypatch.setattr(store_module.os, "link", link_and_read)
    SweepStore.open(tmp_path / "out").close()
    assert seen == [dict.fromkeys(("queued", "running", "done", "failed"), 0)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")) == []
    SweepStore.open(tmp_path / "out").close()  # an existing store is opened, not replaced


def test_store_transitions_and_interrupted_runs(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [1, 2, 3, 4]}}))
    store = _store_with(tmp_path, spec, {"r1": "done", "r2": "failed", "r3": "running"})
    assert store.counts() == {"queued": 1, "running": 1, "done": 1, "failed": 1}
    assert store.add_runs([(r.id, r.fields) for r in spec.runs]) == 0  # existing rows are kept as they are
    assert store.requeue_interrupted() == ["r3"]
    row = store.row("r3")
    assert row.status == "queued" and row.note.startswith("interrupted") and row.attempts == 1
    failed = store.row("r2")
    assert (failed.status, failed.error, failed.exit_code, failed.output_tail) == ("failed", "boom", 2, "tail")
    assert store.row("r1").results == {"config": spec.runs[0].config.model_dump(mode="json")}
    store.close()


def test_dry_run_lists_actions_and_estimates(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [1, 2, 3]}}))
    fresh = preview_sweep(tmp_path / "a.yaml", tmp_path / "none")
    assert not (tmp_path / "none").exists()
    expected = ROUGH_OVERHEAD_S + 8 * 32 / ROUGH_TOKENS_PER_S["tiny-llama"]  # 8 blocks of 32 tokens, one epoch
    assert [(line.action, line.estimate_kind) for line in fresh.lines] == [("run", "rough")] * 3
    assert fresh.lines[0].estimate_s == pytest.approx(expected)
    assert rough_seconds(spec.runs[0].config) == pytest.approx(expected)
    _store_with(tmp_path, spec, {"r1": "done", "r2": "failed", "r3": "running"}, wall=100.0).close()
    preview = preview_sweep(tmp_path / "a.yaml", tmp_path / "out")
    assert [(line.id, line.status, line.action) for line in preview.lines] == [
        ("r1", "done", "skip"), ("r2", "failed", "skip"), ("r3", "interrupted", "run")]
    assert (preview.lines[2].estimate_s, preview.lines[2].estimate_kind) == (100.0, "measured")
    retry = preview_sweep(tmp_path / "a.yaml", tmp_path / "out", retry_failed=True)
    assert [line.action for line in retry.lines] == ["skip", "run", "run"]
    assert retry.estimate_s == 200.0
    assert "2 to run, 1 to skip; estimated 3m20s" in format_preview(retry)


def test_dry_run_uses_the_calibration_until_a_similar_run_has_finished(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [1, 2], "seed": [1, 2]}}))
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"fields": {k: v for k, v in run.fields.items() if k != "seed"}, "seconds": 60.0 * run.fields["r"]}
            for run in spec.runs if run.fields["seed"] == 1]
    (out / CALIBRATION_FILE).write_text(json.dumps({"rows": rows}))
    preview = preview_sweep(tmp_path / "a.yaml", out)
    # every seed of a row gets the row's calibrated time
    assert [(line.estimate_s, line.estimate_kind) for line in preview.lines] == [
        (60.0, "calibrated"), (60.0, "calibrated"), (120.0, "calibrated"), (120.0, "calibrated")]
    assert "estimated 6m00s" in format_preview(preview)
    _store_with(tmp_path, spec, {spec.runs[0].id: "done"}, wall=75.0).close()  # r1 seed 1 finished in 75 s
    after = preview_sweep(tmp_path / "a.yaml", out)
    # its other seed takes the measured time; the other row keeps its calibration
    assert [(line.estimate_s, line.estimate_kind) for line in after.to_run] == [
        (75.0, "measured"), (120.0, "calibrated"), (120.0, "calibrated")]
    (out / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(UserError, match="calibration.json: not a calibration file"):
        preview_sweep(tmp_path / "a.yaml", out)


def test_a_calibration_shipped_with_the_sweep_file(tmp_path):
    from peftlab.sweep.runner import adopt_calibration

    sweep = {"base": TINY_BASE, "grid": {"r": [1, 2]}, "calibration": "cal/study.json"}
    (tmp_path / "cal").mkdir()
    spec = load_sweep(write_sweep(tmp_path / "cal" / "missing.yaml", {"base": TINY_BASE, "grid": {"r": [1, 2]}}))
    rows = [{"fields": run.fields, "seconds": 30.0 * run.fields["r"]} for run in spec.runs]
    (tmp_path / "cal" / "study.json").write_text(json.dumps({"rows": rows}))
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", sweep))
    assert spec.calibration == (tmp_path / "cal" / "study.json").resolve()
    out = tmp_path / "out"
    preview = preview_sweep(tmp_path / "a.yaml", out)  # the folder has none: the shipped one estimates
    assert [(line.estimate_s, line.estimate_kind) for line in preview.lines] == [(30.0, "calibrated"),
                                                                                (60.0, "calibrated")]
    assert not out.exists()  # a dry run writes nothing
    out.mkdir()
    adopt_calibration(out, spec.calibration)  # what run_sweep does first: the folder records its estimates' source
    assert json.loads((out / CALIBRATION_FILE).read_text()) == {"rows": rows}
    (out / CALIBRATION_FILE).write_text(json.dumps({"rows": [{**rows[0], "seconds": 5.0}]}))
    adopt_calibration(out, spec.calibration)  # the folder's own calibration is kept, and wins
    assert [line.estimate_s for line in preview_sweep(tmp_path / "a.yaml", out).lines][0] == 5.0
    with pytest.raises(UserError, match=r"calibration: 'nope.json' does not exist .*relative to the sweep file"):
        load_sweep(write_sweep(tmp_path / "b.yaml", {**sweep, "calibration": "nope.json"}))


def test_failure_message_prefers_failed_json_then_signal_then_error_line(tmp_path):
    tail = "loading\nTraceback (most recent call last):\nValueError: bad shape"
    assert failure_message(tmp_path, 1, tail) == "ValueError: bad shape"
    assert failure_message(tmp_path, 2, "x\npeftlab: error: dataset 'foo' not found\n") == "dataset 'foo' not found"
    assert "killed by SIGKILL" in failure_message(tmp_path, -9, "")
    (tmp_path / FAILED_FILE).write_text(json.dumps({"status": "failed", "error": "out of memory"}))
    assert failure_message(tmp_path, 2, tail) == "out of memory"


def test_an_interrupted_run_that_had_finished_is_adopted_without_rerunning(tmp_path):
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [4]}}))
    _store_with(tmp_path, spec, {"r4": "running"}).close()  # the sweep died after the run wrote results.json
    results = {"status": "done", "config": spec.runs[0].config.model_dump(mode="json"), "task": {"metric": "x"}}
    (tmp_path / "out" / "runs" / "r4").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "r4" / "results.json").write_text(json.dumps(results))
    outcome = run_sweep(tmp_path / "a.yaml", tmp_path / "out")
    assert outcome.ran == ["r4"] and outcome.failed == {}
    store = SweepStore.open(tmp_path / "out", create=False)
    row = store.row("r4")
    store.close()
    assert (row.status, row.results, row.attempts) == ("done", results, 1)
    assert row.note.startswith("adopted")
    assert not (tmp_path / "out" / "logs").exists()  # no process was started


def test_a_run_adopted_from_kept_records_keeps_its_wall_time(tmp_path):
    # what a report's records/<id>/ holds, copied back into a fresh sweep folder: results and the measured wall time
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [4, 8]}}))
    for run_id, wall in (("r4", 123.5), ("r8", None)):
        kept = tmp_path / "out" / "runs" / run_id
        kept.mkdir(parents=True)
        config = next(r for r in spec.runs if r.id == run_id).config.model_dump(mode="json")
        (kept / "results.json").write_text(json.dumps({"status": "done", "config": config, "task": {"metric": "x"}}))
        if wall is not None:
            (kept / "sweep_wall.json").write_text(json.dumps({"wall_s": wall}))
    outcome = run_sweep(tmp_path / "a.yaml", tmp_path / "out")
    assert sorted(outcome.ran) == ["r4", "r8"] and outcome.failed == {}
    store = SweepStore.open(tmp_path / "out", create=False)
    walls = {r.id: r.wall_s for r in store.rows()}
    store.close()
    assert walls == {"r4": 123.5, "r8": None}  # no kept time: unknown, never a made-up one
    assert not (tmp_path / "out" / "logs").exists()


def test_a_missing_sweep_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="sweep file .* does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    path = write_sweep(tmp_path / "a.yaml", {"base": TINY_BASE, "grid": {"r": [4]}})
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "sweep.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `peftlab sweep` is running"):
            run_sweep(path, tmp_path / "out")


def test_shipped_studies_expand_and_validate():
    cpu = load_sweep(REPO / "configs" / "cpu.yaml")
    assert {r.config.task for r in cpu.runs} == {"clm", "classification", "instruction"}
    shapes = {(r.config.task, r.config.method, r.config.r if r.config.method != "full" else None,
               r.config.alpha if r.config.method != "full" else None) for r in cpu.runs}
    for task in ("clm", "instruction"):
        assert {s[1:] for s in shapes if s[0] == task} == {
            ("full", None, None), ("lora", 8, 16), ("lora", 16, 32), ("lora", 128, 256), ("qlora", 8, 16)}
    assert {s[1:] for s in shapes if s[0] == "classification"} == {("full", None, None), ("lora", 4, 16),
                                                                    ("lora", 8, 32)}
    assert all(r.config.train_subset for r in cpu.runs)  # subsets keep the CPU study short
    for path in sorted((REPO / "configs" / "studies").glob("*.yaml")):
        spec = load_sweep(path)
        assert {r.config.model for r in spec.runs} == {"mistralai/Mistral-7B-v0.1", "meta-llama/Llama-2-7b-hf"}


# --- real sweeps: each run in its own process -------------------------------------------------------------------
def _sweep_cmd(sweep_file: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peftlab", "sweep", str(sweep_file), "--output-dir", str(out), *extra]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _status(out: Path, run_id: str) -> str | None:
    if not (out / "sweep.sqlite").is_file():
        return None
    store = SweepStore.open(out, create=False, read_only=True)
    try:
        return store.row(run_id).status
    except KeyError:
        return None
    finally:
        store.close()


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """Run a 3-run sweep, SIGKILL it while its 2nd run is running, then rerun it to the end."""
    if not (SHARED_DATA / "wikitext-2-raw-v1").is_dir():
        pytest.skip(f"dataset mirror not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_file = write_sweep(tmp / "tiny.yaml", {"name": "tiny", "base": {**TINY_BASE, "lr": 1e-2}, "grid": {
        "shape": [{"id": "lora-r4", "method": "lora", "r": 4, "alpha": 8},
                  {"id": "bad-target", "method": "lora", "target_modules": ["not_a_module"]},
                  {"id": "full", "method": "full"}]}})
    out = tmp / "out"
    env = {**os.environ, "PEFTLAB_DATA_DIR": str(SHARED_DATA)}
    with open(tmp / "first.log", "wb") as log:
        first = subprocess.Popen(_sweep_cmd(sweep_file, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: _status(out, "bad-target") == "running" or first.poll() is not None, 600,
                  "the second run to start")
        assert first.poll() is None, (tmp / "first.log").read_text()
        store = SweepStore.open(out, create=False, read_only=True)
        child = store.row("bad-target").pid
        store.close()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    store = SweepStore.open(out, create=False, read_only=True)
    before = {r.id: r for r in store.rows()}
    store.close()
    results_file = out / "runs" / "lora-r4" / "results.json"
    mtime = results_file.stat().st_mtime_ns
    _wait_for(lambda: not _alive(child), 30, "the killed sweep's run process to die with it")
    rerun = subprocess.run(_sweep_cmd(sweep_file, out), capture_output=True, text=True, env=env, timeout=900)
    store = SweepStore.open(out, create=False, read_only=True)
    after = {r.id: r for r in store.rows()}
    store.close()
    return {"sweep_file": sweep_file, "out": out, "before": before, "after": after, "rerun": rerun,
            "mtime": mtime, "results_file": results_file, "child": child, "env": env}


def test_sigkill_then_rerun_completes_only_the_missing_runs(killed_then_rerun):
    k = killed_then_rerun
    before, after = k["before"], k["after"]
    assert [before[i].status for i in ("lora-r4", "bad-target", "full")] == ["done", "running", "queued"]
    assert after["lora-r4"] == before["lora-r4"]  # the finished run's row is untouched, results included
    assert k["results_file"].stat().st_mtime_ns == k["mtime"]
    assert "lora-r4: running" not in k["rerun"].stdout
    assert "bad-target: running" in k["rerun"].stdout and "full: running" in k["rerun"].stdout
    assert after["full"].status == "done" and after["full"].attempts == 1
    assert after["bad-target"].attempts == 2 and after["bad-target"].note.startswith("interrupted")
    results = after["full"].results
    assert results["status"] == "done" and results["method"]["name"] == "full"
    assert results == json.loads((k["out"] / "runs" / "full" / "results.json").read_text())


def test_a_failing_run_is_recorded_with_its_message_and_the_others_finish(killed_then_rerun):
    k = killed_then_rerun
    bad = k["after"]["bad-target"]
    assert bad.status == "failed" and bad.exit_code == 2
    assert "no linear module named not_a_module" in bad.error
    assert bad.error in k["rerun"].stderr
    assert k["rerun"].returncode == 1  # some run failed
    assert {k["after"][i].status for i in ("lora-r4", "full")} == {"done"}
    assert (k["out"] / "logs" / "bad-target.log").is_file()


def test_rerun_after_completion_runs_nothing_unless_retry_failed(killed_then_rerun, monkeypatch):
    k = killed_then_rerun
    outcome = run_sweep(k["sweep_file"], k["out"])
    assert outcome.ran == [] and sorted(outcome.skipped) == ["bad-target", "full", "lora-r4"]
    assert outcome.failed == {"bad-target": k["after"]["bad-target"].error}
    preview = preview_sweep(k["sweep_file"], k["out"], retry_failed=True)
    assert [line.id for line in preview.to_run] == ["bad-target"]
    assert preview.to_run[0].estimate_kind == "measured"


def test_report_reads_the_real_store(killed_then_rerun, tmp_path):
    from peftlab.report import read_sweep, write_report

    records = read_sweep(killed_then_rerun["out"])
    assert sorted(r.id for r in records.finished) == ["full", "lora-r4"]
    assert [rid for rid, _ in records.failed] == ["bad-target"]
    made = write_report(killed_then_rerun["out"], tmp_path / "report")
    text = made.markdown.read_text()
    assert "| tiny-llama | Full | - |" in text and "| tiny-llama | LoRA | (4, 8) |" in text
    assert "no linear module named not_a_module" in text
    assert len([p for p in made.plots if p.suffix == ".png"]) == 4
