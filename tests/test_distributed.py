"""Data-parallel training on CPU (gloo, one thread per process): 2 processes with gradient accumulation 1 follow
the same loss curve as 1 process with accumulation 2 (the same global batch), and only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.loop import epoch_permutation, step_micro_batches

STEPS = 3
BATCH, BLOCK = 4, 128
# LoRA without dropout (dropout masks would differ between the layouts) and a large learning rate, so that the
# adapters move enough for a missing gradient all-reduce to show in the later steps' losses.
TRAIN_ARGS = ["train", "--model", "tiny-llama", "--dataset", "wikitext-2-raw-v1", "--method", "lora",
              "--train-subset", "32", "--eval-subset", "8", "--batch-size", str(BATCH), "--max-steps", str(STEPS),
              "--lr", "5e-2", "--dropout", "0", "--set", "max_new_tokens=2", "--precision", "fp32",
              "--overwrite"]
TIMEOUT_S = 600


def test_two_ranks_see_what_one_process_sees_with_accumulation():
    perm = epoch_permutation(40, seed=3, epoch=0)
    one = step_micro_batches(perm, 1, batch=4, accum=2, world=1, rank=0)
    ranks = [step_micro_batches(perm, 1, batch=4, accum=1, world=2, rank=r) for r in (0, 1)]
    assert one == [ranks[0][0], ranks[1][0]]
    assert one[0] + one[1] == perm[8:16].tolist()  # step 1 of 8 examples per step: positions 8..15


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _records(run_dir: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]  # not the evaluation lines
    return train_rows, json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[list[dict], dict]:
    if not (Path(os.environ["PEFTLAB_DATA_DIR"]) / "wikitext-2-raw-v1").is_dir():
        pytest.skip("dataset mirror not found")
    out = tmp_path_factory.mktemp("one") / "run"
    _run([sys.executable, "-m", "peftlab", *TRAIN_ARGS, "--grad-accum", "2", "--output-dir", str(out)], out.parent)
    return _records(out)


def _launchers(port: int) -> dict[str, list[str]]:
    return {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        "peftlab --processes": [sys.executable, "-m", "peftlab", "train", "--processes", "2"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(port)],
    }


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "peftlab --processes"])
def test_two_processes_match_one_process(launcher, single_process, tmp_path):
    one_rows, one_results = single_process
    out = tmp_path / "run"
    args = [*TRAIN_ARGS, "--grad-accum", "1", "--output-dir", str(out)]
    if launcher == "peftlab --processes":  # peftlab's own launcher: the same train arguments, after the flag
        _run([*_launchers(0)[launcher], *args[1:]], tmp_path)
    else:
        _run([*_launchers(_free_port())[launcher], "-m", "peftlab", *args], tmp_path)
    two_rows, two_results = _records(out)

    # Only rank 0 writes: one metrics line per step, one result, one adapter.
    assert [r["step"] for r in two_rows] == list(range(1, STEPS + 1))
    assert two_results["timing"]["processes"] == 2 and one_results["timing"]["processes"] == 1
    assert two_results["machine"]["torch_threads"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Memory: both processes' training peaks are gathered to rank 0; the headline stays rank 0's own.
    per_process = two_results["memory"]["train_per_process"]
    assert len(per_process) == 2 and all(p["cpu_peak_rss_gb"] > 0 for p in per_process)
    assert per_process[0]["cpu_peak_rss_gb"] == pytest.approx(two_results["memory"]["train"]["cpu_peak_rss_gb"])
    assert len(one_results["memory"]["train_per_process"]) == 1

    # Same global batch: 8 blocks of 128 tokens per step on both layouts.
    expected_tokens = [BATCH * 2 * BLOCK * step for step in range(1, STEPS + 1)]
    assert [r["tokens"] for r in one_rows] == expected_tokens
    assert [r["tokens"] for r in two_rows] == expected_tokens

    # Same loss curve, gradient norms and final model.
    for a, b in zip(one_rows, two_rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"])
    assert two_results["metrics"]["after"]["eval_loss"] == pytest.approx(
        one_results["metrics"]["after"]["eval_loss"], rel=1e-6)
    # Training moved the model well beyond the tolerances above, so a rank left unsynchronised would show.
    before, after = one_results["metrics"]["before"]["eval_loss"], one_results["metrics"]["after"]["eval_loss"]
    assert abs(after - before) > 1e-3
