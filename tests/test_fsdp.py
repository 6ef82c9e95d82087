"""FSDP2 (``--strategy fsdp``) on CPU: 2 processes of 1 thread on gloo against 1 process with the same global
batch, exact resume after SIGKILL from a sharded checkpoint, the gathered artefact reloaded by ``peftlab eval``,
and the refusals.

The curves are compared on the loss *and* the gradient norm: AdamW is nearly invariant to a constant gradient
scale, so gradients summed instead of averaged over the ranks (pytorch #162338) would hardly move the loss, but
they double the norm.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.checkpoint import is_valid, list_checkpoints, sharded_files_present
from tests.conftest import REPO, SHARED_DATA

STEPS = 10
COMMON = ["train", "--model", "tiny-llama", "--dataset", "wikitext-2-raw-v1", "--train-subset", "96",
          "--eval-subset", "8", "--batch-size", "4", "--max-steps", str(STEPS), "--precision", "fp32",
          "--set", "max_new_tokens=2", "--overwrite"]
METHOD_ARGS = {"full": ["--method", "full", "--lr", "1e-3"],
               "lora": ["--method", "lora", "--lr", "5e-2", "--dropout", "0"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "examples" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2"]
TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw-v1").is_dir(), reason="dataset mirror not found")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PEFTLAB_DATA_DIR": str(SHARED_DATA)}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The reference: one process, accumulation 2 (the global batch of 2 processes x accumulation 1)."""
    out = {}
    for method, args in METHOD_ARGS.items():
        run = tmp_path_factory.mktemp(f"one-{method}") / "run"
        _run([sys.executable, "-m", "peftlab", *COMMON, *args, "--grad-accum", "2", "--output-dir", str(run)],
             run.parent)
        out[method] = run
    return out


@pytest.fixture(scope="module")
def two_fsdp(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for method, args in METHOD_ARGS.items():
        run = tmp_path_factory.mktemp(f"fsdp-{method}") / "run"
        # full through torchrun, LoRA through accelerate with the shipped example config (the SIGKILL test below
        # launches with --processes)
        launcher = TORCHRUN if method == "full" else [*ACCELERATE, "--main_process_port", str(_free_port())]
        _run([*launcher, "-m", "peftlab", *COMMON, *args, "--grad-accum", "1", "--strategy", "fsdp",
              "--output-dir", str(run)], run.parent)
        out[method] = run
    return out


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_on_two_processes_follows_one_process(method, one_process, two_fsdp):
    one, two = _curve(one_process[method]), _curve(two_fsdp[method])
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), "gradients are not averaged over ranks"
        assert b["tokens"] == a["tokens"]
    results = _results(two_fsdp[method])
    assert results["config"]["strategy"] == "fsdp" and results["timing"]["processes"] == 2
    assert len(results["memory"]["train_per_process"]) == 2
    assert all(p["cpu_peak_rss_gb"] > 0 for p in results["memory"]["train_per_process"])
    assert abs(results["metrics"]["after"]["eval_loss"] - _results(one_process[method])["metrics"]["after"][
        "eval_loss"]) < 1e-4
    assert results["metrics"]["after"]["eval_loss"] < results["metrics"]["before"]["eval_loss"]


def test_gathered_model_reloads_and_eval_reproduces_the_metric(two_fsdp, tmp_path):
    full, lora = two_fsdp["full"], two_fsdp["lora"]
    weights = load_file(full / "model" / "model.safetensors")
    assert not any("_fsdp" in k or "_orig_mod" in k for k in weights)
    # the gathered tensors have the model's full shapes (not one rank's shard)
    assert weights["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    for artefact, args in ((lora / "adapter", ["--adapter", str(lora / "adapter")]),
                           (full / "model", ["--model", str(full / "model")])):
        run = artefact.parent
        proc = _run([sys.executable, "-m", "peftlab", "eval", *args, "--eval-subset", "8", "--precision", "fp32"],
                    tmp_path)
        measured = json.loads(proc.stdout)
        assert measured["eval_loss"] == pytest.approx(_results(run)["metrics"]["after"]["eval_loss"], abs=1e-6)


def test_sigkill_during_fsdp_then_resume_matches_uninterrupted(tmp_path):
    # LoRA with dropout on: an exact resume needs every rank's own RNG state, not only the shards
    args = [*COMMON[1:], "--method", "lora", "--lr", "5e-2", "--grad-accum", "1", "--strategy", "fsdp",
            "--max-steps", "16", "--save-every", "2"]
    ref = tmp_path / "ref"
    _run([sys.executable, "-m", "peftlab", "train", "--processes", "2", *args, "--output-dir", str(ref)], tmp_path)

    run = tmp_path / "killed"
    cmd = [*TORCHRUN, "-m", "peftlab", "train", *args, "--output-dir", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = list_checkpoints(run)
        if done and int(done[-1].name.split("-")[1]) >= 6:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    assert not (run / "results.json").exists()
    newest = list_checkpoints(run)[-1]
    assert int(newest.name.split("-")[1]) < 16
    assert sharded_files_present(newest, 2)

    _run([sys.executable, "-m", "peftlab", "train", "--processes", "2", *args, "--output-dir", str(run),
          "--resume"], tmp_path)
    results = _results(run)
    assert results["resumed"] is True and results["timing"]["optimizer_steps"] == 16
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in _curve(run)] == pytest.approx([r["loss"] for r in _curve(ref)], abs=1e-6)

    # the same checkpoint on another number of processes is refused, in one line
    other = subprocess.run([sys.executable, "-m", "peftlab", *COMMON[:1], *args, "--output-dir", str(run),
                            "--resume"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert other.returncode == 2
    assert "written by 2 process(es) and this run has 1" in other.stderr
    assert "Traceback" not in other.stderr


def test_a_sharded_checkpoint_missing_a_rank_is_not_valid(tmp_path):
    folder = tmp_path / "step-0000002"
    (folder / "dcp").mkdir(parents=True)
    (folder / "rng").mkdir()
    (folder / "state.json").write_text(json.dumps({"format": "dcp", "processes": 2}))
    (folder / "dcp" / ".metadata").write_bytes(b"x")
    for ext in ("safetensors", "json"):
        (folder / "rng" / f"rank-0.{ext}").write_bytes(b"x")
    assert not is_valid(folder)  # rank 1's RNG state is missing: a write that did not finish
    for ext in ("safetensors", "json"):
        (folder / "rng" / f"rank-1.{ext}").write_bytes(b"x")
    assert is_valid(folder)


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "ia3"], "method 'ia3' does not support --strategy fsdp"),
    (["--method", "qlora"], "--strategy fsdp with method 'qlora' is refused: FSDP2 turns 4-bit"),
    (["--method", "lora", "--strategy", "zero3"], "strategy"),
])
def test_fsdp_refusals_are_one_line(extra, message, tmp_path):
    args = [sys.executable, "-m", "peftlab", *COMMON, "--strategy", "fsdp", *extra, "--output-dir",
            str(tmp_path / "run")]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("peftlab: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_accelerate_fsdp_plugin_is_pointed_at_the_strategy_flag(tmp_path):
    env = {**_env(), "ACCELERATE_USE_FSDP": "true"}
    proc = subprocess.run([sys.executable, "-m", "peftlab", *COMMON, "--method", "lora", "--output-dir",
                           str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert "pass --strategy fsdp" in proc.stderr and "Traceback" not in proc.stderr
