"""Sweep executors on tiny-llama: ``local --parallel 2`` (overlapping runs, metrics equal to the serial sweep's,
explicit thread shares, a shared baseline cache), Ray (a local instance with 2 pretend GPUs: distinct
CUDA_VISIBLE_DEVICES, a killed worker recorded failed then redone by --retry-failed), submitit's local executor
(the same store as the local executor), SIGKILL faults, bad input, and the shared caches under concurrency."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from peftlab.cli import main
from peftlab.record import atomic_write_text
from peftlab.sweep.executor import ExecutorOptions, build_executor
from peftlab.sweep.local_executor import LocalExecutor
from peftlab.sweep.runner import parallel_seconds, preview_sweep, run_sweep
from peftlab.sweep.store import SweepStore
from tests.conftest import SHARED_DATA
from tests.test_sweep import TINY_BASE, _alive, _status, _sweep_cmd, _wait_for, write_sweep

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw-v1").is_dir(),
                                reason=f"dataset mirror not found at {SHARED_DATA}")

SEEDS = {"name": "seeds", "base": {**TINY_BASE, "method": "lora", "r": 4, "alpha": 8, "eval_before": True},
         "grid": {"seed": [1, 2, 3, 4]}}


def _rows(out: Path) -> dict:
    store = SweepStore.open(out, create=False, read_only=True)
    try:
        return {r.id: r for r in store.rows()}
    finally:
        store.close()


#: The environment of a sweep driver started as its own process.
DRIVER_ENV = {**os.environ, "PEFTLAB_DATA_DIR": str(SHARED_DATA)}


def _start_parallel_driver(seeds_file: Path, out: Path, log_path: Path) -> subprocess.Popen:
    """`peftlab sweep --parallel 2` in its own process, its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(_sweep_cmd(seeds_file, out, "--parallel", "2"), stdout=log,
                                stderr=subprocess.STDOUT, env=DRIVER_ENV)


def _when(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)


def _overlapping(rows: dict) -> list[tuple[str, str]]:
    """Pairs of runs whose [started, finished] intervals overlap."""
    ids = sorted(rows)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if _when(rows[a].started_at) < _when(rows[b].finished_at)
            and _when(rows[b].started_at) < _when(rows[a].finished_at)]


def _metrics(rows: dict) -> dict:
    """Each run's metrics; whether its baseline came from the cache depends on timing, so that flag is left out."""
    out = {}
    for rid, row in rows.items():
        metrics = dict(row.results["metrics"])
        if metrics.get("before"):
            metrics["before"] = {k: v for k, v in metrics["before"].items() if k != "baseline_reused"}
        out[rid] = metrics
    return out


@pytest.fixture(scope="module")
def seeds_file(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep-file") / "seeds.yaml", SEEDS)


@pytest.fixture(scope="module")
def local_sweeps(seeds_file, tmp_path_factory):
    """The same 4-run sweep serially and with --parallel 2."""
    tmp = tmp_path_factory.mktemp("local")
    serial = run_sweep(seeds_file, tmp / "serial", executor=LocalExecutor(1, 1, [], 2))
    parallel = run_sweep(seeds_file, tmp / "parallel", executor=LocalExecutor(2, 1, [], 2))
    return {"serial": serial, "parallel": parallel, "tmp": tmp}


def test_local_parallel_runs_overlap_and_match_the_serial_sweep(local_sweeps):
    serial, parallel = _rows(local_sweeps["tmp"] / "serial"), _rows(local_sweeps["tmp"] / "parallel")
    assert {r.status for r in (*serial.values(), *parallel.values())} == {"done"}
    assert _overlapping(parallel) and not _overlapping(serial)
    assert _metrics(parallel) == _metrics(serial)  # deterministic runs: the executor changes nothing
    for rid, row in parallel.items():
        machine = row.results["machine"]
        assert (machine["executor"], machine["torch_threads"], row.results["config"]["threads"]) == ("local", 1, 1)
        assert serial[rid].results["machine"]["torch_threads"] == 2  # one run at a time: both cores
        assert machine["host"] == socket.gethostname()


def test_parallel_runs_share_one_baseline_entry_written_whole(local_sweeps):
    folder = local_sweeps["tmp"] / "parallel" / "baselines"
    entries = sorted(p.name for p in folder.iterdir())
    assert len(entries) == 1 and entries[0].endswith(".json")  # LoRA seeds share the base's evaluation
    json.loads((folder / entries[0]).read_text())  # whole, whoever wrote it
    metrics = _metrics(_rows(local_sweeps["tmp"] / "parallel")).values()
    befores = {json.dumps(m["before"], sort_keys=True) for m in metrics}
    assert len(befores) == 1


def test_eta_and_dry_run_divide_by_the_parallelism(seeds_file, tmp_path):
    one = preview_sweep(seeds_file, tmp_path / "none")
    two = preview_sweep(seeds_file, tmp_path / "none", slots=2)
    assert two.estimate_s == pytest.approx(one.estimate_s / 2)
    assert parallel_seconds([10.0, 10.0, 40.0], 4) == 40.0  # never below the longest run
    assert not (tmp_path / "none").exists()


# --- Ray: one local instance for the module ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _kill_worker_of(run_id: str, out: Path, stop: threading.Event) -> None:
    """SIGKILL the worker (a Ray worker, a SLURM task) whose child trains ``run_id``; the run dies with it."""
    marker = str(out / "configs" / f"{run_id}.yaml").encode()
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes():
                    parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    time.sleep(2)  # let it get going
                    os.kill(parent, signal.SIGKILL)
                    return
            except (OSError, ValueError):
                continue
        time.sleep(0.2)


def test_ray_runs_get_distinct_gpus_and_a_killed_worker_is_redone_by_retry_failed(ray_instance, tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", {**SEEDS, "grid": {"seed": [1, 2, 3]}})
    out = tmp_path / "out"
    executor = build_executor("ray", ExecutorOptions())
    assert (executor.slots, executor.gpus_per_run, executor.cpus_per_run) == (2, 1, 1)
    stop = threading.Event()
    killer = threading.Thread(target=_kill_worker_of, args=("seed2", out, stop), daemon=True)
    killer.start()
    try:
        outcome = run_sweep(sweep, out, executor=executor)
    finally:
        stop.set()
    rows = _rows(out)
    assert (rows["seed1"].status, rows["seed2"].status, rows["seed3"].status) == ("done", "failed", "done")
    assert "the Ray task did not finish" in outcome.failed["seed2"]
    devices = {rid: row.results["machine"]["visible_devices"] for rid, row in rows.items() if row.results}
    assert set(devices.values()) <= {"0", "1"}
    pairs = [(a, b) for a, b in _overlapping(rows) if a in devices and b in devices]
    assert all(devices[a] != devices[b] for a, b in pairs)
    assert {row.results["machine"]["executor"] for row in rows.values() if row.results} == {"ray"}
    retry = run_sweep(sweep, out, retry_failed=True, executor=build_executor("ray", ExecutorOptions()))
    assert retry.ran == ["seed2"] and retry.failed == {}
    again = _rows(out)
    assert again["seed2"].status == "done" and again["seed2"].attempts == 2
    assert again["seed1"] == rows["seed1"]  # untouched
    assert again["seed2"].results["machine"]["visible_devices"] in ("0", "1")


def test_ray_rejects_more_gpus_per_run_than_the_cluster_has(ray_instance):
    from peftlab.errors import UserError

    with pytest.raises(UserError, match="--gpus-per-run 3: the Ray cluster has 2 GPU"):
        build_executor("ray", ExecutorOptions(gpus_per_run=3))


# --- SLURM through submitit's local executor -------------------------------------------------------------------
def test_submitit_local_executor_gives_the_local_executors_store(seeds_file, local_sweeps, tmp_path):
    pytest.importorskip("submitit")
    executor = build_executor("slurm", ExecutorOptions(slurm={"cluster": "local", "array_parallelism": 2,
                                                              "cpus_per_task": 1}))
    outcome = run_sweep(seeds_file, tmp_path / "out", executor=executor)
    assert outcome.failed == {} and sorted(outcome.ran) == ["seed1", "seed2", "seed3", "seed4"]
    slurm, local = _rows(tmp_path / "out"), _rows(local_sweeps["tmp"] / "parallel")
    assert {rid: (r.status, r.definition) for rid, r in slurm.items()} == \
        {rid: (r.status, r.definition) for rid, r in local.items()}
    assert _metrics(slurm) == _metrics(local)
    assert {r.results["machine"]["executor"] for r in slurm.values()} == {"slurm"}


def test_a_dead_slurm_job_is_a_failed_run_with_the_reason(tmp_path):
    pytest.importorskip("submitit")
    sweep = write_sweep(tmp_path / "s.yaml", {**SEEDS, "base": {**SEEDS["base"], "eval_before": False},
                                              "grid": {"seed": [1]}})
    out = tmp_path / "out"
    stop = threading.Event()
    killer = threading.Thread(target=_kill_worker_of, args=("seed1", out, stop), daemon=True)
    killer.start()
    try:
        outcome = run_sweep(sweep, out, executor=build_executor("slurm", ExecutorOptions(slurm={"cluster": "local"})))
    finally:
        stop.set()
    assert list(outcome.failed) == ["seed1"] and "the SLURM job" in outcome.failed["seed1"]
    assert _rows(out)["seed1"].status == "failed"


def test_a_slurm_worker_that_cannot_see_the_sweep_folder_says_so(tmp_path):
    from peftlab.sweep.jobs import VISIBILITY_FILE, RunJob, run_job

    (tmp_path / VISIBILITY_FILE).write_text("another")
    job = RunJob("r", ("-c", "pass"), {}, tmp_path / "r.log", tmp_path / "runs" / "r", tmp_path, "mine")
    result = run_job(job)
    assert result.code is None and "is not visible from worker" in result.error
    assert "shares" in result.error and not (tmp_path / "r.log").exists()  # nothing started


# --- faults: SIGKILL of a run, then of the driver ------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_parallel(seeds_file, tmp_path_factory):
    """--parallel 2: SIGKILL seed1's process, then SIGKILL the driver once seed2 is done, then rerun."""
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "out"
    first = _start_parallel_driver(seeds_file, out, tmp / "first.log")
    try:
        _wait_for(lambda: _status(out, "seed1") == "running" or first.poll() is not None, 300, "seed1 to start")
        victim = _rows(out)["seed1"].pid
        time.sleep(1)
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: _status(out, "seed2") == "done" or first.poll() is not None, 300, "seed2 to finish")
        _wait_for(lambda: _status(out, "seed4") == "running" or first.poll() is not None, 300, "seed4 to start")
        assert first.poll() is None, (tmp / "first.log").read_text()
        before = _rows(out)
        children = [before[r].pid for r in ("seed3", "seed4") if before[r].status == "running"]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    for pid in children:
        _wait_for(lambda pid=pid: not _alive(pid), 30, "the killed driver's runs to die with it")
    results_file = out / "runs" / "seed2" / "results.json"
    mtime = results_file.stat().st_mtime_ns
    rerun = subprocess.run(_sweep_cmd(seeds_file, out, "--parallel", "2"), capture_output=True, text=True,
                           env=DRIVER_ENV, timeout=600)
    return {"before": before, "after": _rows(out), "rerun": rerun, "mtime": mtime, "results_file": results_file}


def test_a_killed_run_fails_alone_and_the_others_finish(killed_parallel):
    before, after = killed_parallel["before"], killed_parallel["after"]
    assert before["seed1"].status == "failed" and "killed by SIGKILL" in before["seed1"].error
    assert after["seed1"].status == "failed" and after["seed1"].attempts == 1  # not retried without --retry-failed
    assert {after[r].status for r in ("seed2", "seed3", "seed4")} == {"done"}
    assert killed_parallel["rerun"].returncode == 1


def test_a_killed_driver_leaves_a_store_the_rerun_finishes(killed_parallel):
    before, after = killed_parallel["before"], killed_parallel["after"]
    assert before["seed2"].status == "done" and before["seed4"].status == "running"
    assert after["seed2"] == before["seed2"]  # finished runs untouched
    assert killed_parallel["results_file"].stat().st_mtime_ns == killed_parallel["mtime"]
    assert "seed2: running" not in killed_parallel["rerun"].stdout
    assert "seed4: running" in killed_parallel["rerun"].stdout  # requeued, then redone once
    assert (after["seed4"].status, after["seed4"].attempts) == ("done", 2)
    assert after["seed3"].status == "done"


def test_ctrl_c_stops_the_parallel_runs_and_queues_them_again(seeds_file, tmp_path):
    out = tmp_path / "out"
    driver = _start_parallel_driver(seeds_file, out, tmp_path / "log")
    try:
        _wait_for(lambda: {_status(out, "seed1"), _status(out, "seed2")} == {"running"} or driver.poll() is not None,
                  300, "two runs to start")
        pids = [_rows(out)[r].pid for r in ("seed1", "seed2")]
        driver.send_signal(signal.SIGINT)  # to the driver alone: it must stop its runs itself
        assert driver.wait(timeout=60) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not any(_alive(pid) for pid in pids)
    rows = _rows(out)
    assert {rows[r].status for r in rows} == {"queued"}
    assert rows["seed1"].note.startswith("interrupted") and rows["seed1"].attempts == 1


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--executor", "dask"], "--executor 'dask': expected one of local, ray, slurm"),
    (["--parallel", "0"], "--parallel 0: expected 1 or more"),
    (["--gpus-per-run", "9"], "--gpus-per-run 9: only"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:{port}"], "no Ray cluster answers there"),
    (["--executor", "ray", "--ray-address", "nonsense"], "expected auto or HOST:PORT"),
    (["--executor", "slurm"], "no `sbatch` on PATH"),
    (["--executor", "slurm", "--slurm-time", "0"], "time must be a positive integer"),
])
def test_bad_executor_input_is_one_line_exit_2_and_writes_nothing(flags, message, seeds_file, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch here
    out = tmp_path / "out"
    flags = [f.format(port=_closed_port()) for f in flags]
    assert main(["sweep", str(seeds_file), "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


@pytest.mark.parametrize("executor, module", [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_extra_names_it(executor, module, seeds_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["sweep", str(seeds_file), "--output-dir", str(tmp_path / "out"), "--executor", executor,
                 "--slurm-cluster", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'peftlab[cluster]'" in err and module in err
    assert not (tmp_path / "out").exists()


def test_a_slurm_block_with_an_unknown_key_is_one_line(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "s.yaml", {**SEEDS, "slurm": {"partition": "gpu", "gres": "gpu:1"}})
    assert main(["sweep", str(sweep), "--output-dir", str(tmp_path / "out"), "--executor", "slurm"]) == 2
    assert "unknown key 'gres'" in capsys.readouterr().err


def test_processes_in_a_sweep_file_takes_that_many_slots(tmp_path):
    from peftlab.sweep.jobs import RunJob
    from peftlab.sweep.runner import run_command
    from peftlab.sweep.spec import load_sweep

    spec = load_sweep(write_sweep(tmp_path / "s.yaml", {**SEEDS, "grid": {"processes": [1, 2]}}))
    assert [(r.id, r.processes) for r in spec.runs] == [("processes1", 1), ("processes2", 2)]
    assert "processes" not in spec.runs[1].config.model_dump()
    assert run_command(Path("c.yaml"), 2)[-2:] == ["--processes", "2"]
    pool = LocalExecutor(2, 1, ["0", "1"], 8)
    two = RunJob("two", ("-c", "pass"), {}, tmp_path / "l", tmp_path, tmp_path, "t", processes=2)
    one = RunJob("one", ("-c", "pass"), {}, tmp_path / "l", tmp_path, tmp_path, "t")
    assert pool.has_room(two)
    pool.submit(two)
    assert not pool.has_room(one)  # both GPUs are the 2-process run's
    assert [rid for rid, _ in pool.wait(timeout_s=10)] == ["two"] and pool.has_room(one)
    with pytest.raises(Exception, match="processes must be a whole number"):
        load_sweep(write_sweep(tmp_path / "b.yaml", {**SEEDS, "grid": {"processes": [0]}}))


# --- shared caches under concurrency -------------------------------------------------------------------------
def _write_many(path: str, marker: int) -> None:
    for i in range(40):
        atomic_write_text(Path(path), json.dumps({"writer": marker, "i": i, "pad": "x" * 200_000}))


def test_concurrent_atomic_writes_never_show_a_torn_file(tmp_path):
    """The baseline cache's entries (and results.json) are written by atomic_write_text: readers see whole files."""
    target = tmp_path / "entry.json"
    atomic_write_text(target, json.dumps({"writer": -1}))
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_many, args=(str(target), k)) for k in range(3)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        json.loads(target.read_text())  # raises on a torn file
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert reads > 0 and json.loads(target.read_text())["i"] == 39
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]  # no temp file left behind


def _blocks(tokenizer, cache: str, queue) -> None:
    from types import SimpleNamespace

    from peftlab.tasks.clm import cached_blocks

    os.environ["PEFTLAB_CACHE"] = cache
    split = SimpleNamespace(records=[{"text": f"line {i} of a small corpus"} for i in range(2000)],
                            fingerprint="f", source="s")
    queue.put(np.asarray(cached_blocks(split, tokenizer, 8, "text")).tolist())


def test_token_block_cache_under_two_writers(tmp_path):
    from transformers import AutoTokenizer

    from peftlab.models import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())  # loaded once, before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_blocks, args=(tokenizer, str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert got[0] == got[1] and len(got[0]) > 0
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert len(files) == 1 and files[0].endswith(".npy") and ".tmp" not in files[0]


def _publish(target: str, queue) -> None:
    from peftlab.models import publish_atomically

    def build(tmp: Path) -> None:
        for i in range(20):
            (tmp / f"part{i}.bin").write_bytes(os.urandom(50_000))
            time.sleep(0.01)

    queue.put(str(publish_atomically(build, Path(target))))


def test_model_conversion_cache_has_one_winner(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    target = tmp_path / "models" / "converted"
    procs = [ctx.Process(target=_publish, args=(str(target), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    assert {queue.get(timeout=60) for _ in procs} == {str(target)}
    for p in procs:
        p.join()
    assert len(list(target.iterdir())) == 20  # one whole build, not a mix
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["converted"]  # the losers' temp folders are gone
