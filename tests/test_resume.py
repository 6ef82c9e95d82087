"""Reliability: exact resume after SIGKILL, atomic checkpoints, the NaN guard, determinism, safe loading."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.checkpoint import list_checkpoints
from peftlab.configure import load_config
from peftlab.errors import ResourceError, UserError
from peftlab.tasks.clm import CausalLMTask
from peftlab.train import run_training
from tests.conftest import tiny_overrides

# 32 blocks, batch 2, no accumulation: 16 optimizer steps per epoch; dropout stays on (0.1), so an exact resume
# needs the RNG states as well as the weights, optimizer, scheduler and data position.
RESUMABLE = dict(train_subset=32, eval_subset=4, batch_size=2, grad_accum=1, epochs=2, lr=5e-3, save_every=4,
                 eval_before=False)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r]


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    results = run_training(load_config(None, tiny_overrides(tmp, **RESUMABLE))).to_dict()
    return Path(results["run_dir"]), results


def cli_args(overrides: dict) -> list[str]:
    args = [sys.executable, "-m", "peftlab", "train"]
    for key, value in overrides.items():
        if isinstance(value, bool):
            args += ["--set", f"{key}={str(value).lower()}"]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference_run):
    ref_dir, ref = reference_run
    overrides = tiny_overrides(tmp_path, **RESUMABLE)
    overrides.pop("max_new_tokens")
    run_dir = Path(overrides["output_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cli_args(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = list_checkpoints(run_dir)
        if done and int(done[-1].name.split("-")[1]) >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    assert not (run_dir / "results.json").exists()
    killed_at = int(list_checkpoints(run_dir)[-1].name.split("-")[1])
    assert killed_at < 32

    resumed = subprocess.run(cli_args(overrides) + ["--resume"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed"] is True
    assert losses(run_dir) == pytest.approx(losses(ref_dir), abs=1e-6)
    assert results["metrics"]["final_train_loss"] == pytest.approx(ref["metrics"]["final_train_loss"], abs=1e-6)
    assert_same_weights(adapter_weights(run_dir), adapter_weights(ref_dir))
    assert results["timing"]["optimizer_steps"] == 32
    assert results["timing"]["train_time_s"] > 0


def test_same_seed_gives_identical_loss_curves(tmp_path, reference_run):
    ref_dir, _ = reference_run
    again = run_training(load_config(None, tiny_overrides(tmp_path, **RESUMABLE))).to_dict()
    assert losses(Path(again["run_dir"])) == losses(ref_dir)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch, reference_run):
    import peftlab.checkpoint as ckpt

    ref_dir, _ = reference_run
    real_save = ckpt.save_file
    calls = {"n": 0}

    def crashing_save(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the 2nd checkpoint (step 8), after its weights were written
            raise RuntimeError("injected crash during checkpoint write")
        return real_save(tensors, path, *args, **kwargs)

    cfg = load_config(None, tiny_overrides(tmp_path, **RESUMABLE))
    monkeypatch.setattr(ckpt, "save_file", crashing_save)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_training(cfg)
    monkeypatch.setattr(ckpt, "save_file", real_save)
    run_dir = Path(cfg.output_dir)
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["step-0000004"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "no half-written checkpoint may remain"
    assert (run_dir / "failed.json").exists() and not (run_dir / "results.json").exists()

    results = run_training(cfg.model_copy(update={"resume": "auto"})).to_dict()
    assert results["resumed_from"].endswith("step-0000004")
    assert losses(run_dir) == pytest.approx(losses(ref_dir), abs=1e-6)
    assert_same_weights(adapter_weights(run_dir), adapter_weights(ref_dir))


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import peftlab.checkpoint as ckpt

    real_save = ckpt.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    cfg = load_config(None, tiny_overrides(tmp_path, **RESUMABLE))
    with pytest.raises(ResourceError, match=r"disk full .* previous checkpoint .*step-0000004 is kept"):
        run_training(cfg)
    assert [p.name for p in list_checkpoints(Path(cfg.output_dir))] == ["step-0000004"]


def test_nan_stops_the_run_at_that_step(tmp_path, monkeypatch):
    real_loss = CausalLMTask.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        out = real_loss(self, model, batch)
        return out * float("nan") if calls["n"] == 6 else out  # batch 6 = optimizer step 6 (no accumulation)

    monkeypatch.setattr(CausalLMTask, "loss", poisoned)
    cfg = load_config(None, tiny_overrides(tmp_path, **RESUMABLE))
    with pytest.raises(UserError, match="non-finite loss at optimizer step 6"):
        run_training(cfg)
    run_dir = Path(cfg.output_dir)
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["step"] == 6
    assert not (run_dir / "results.json").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000004"]


def test_resume_refuses_a_different_run_but_accepts_logging_changes(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{**RESUMABLE, "max_steps": 4, "save_every": 2}))
    run_training(cfg)
    src = Path(cfg.output_dir) / "checkpoints" / "step-0000002"  # the finished run's checkpoint stays
    with pytest.raises(UserError, match=r"different lr"):
        run_training(cfg.model_copy(update={"lr": 1.0, "resume": str(src), "output_dir": str(tmp_path / "a")}))
    ok = run_training(cfg.model_copy(update={"logging_steps": 3, "resume": str(src),
                                             "output_dir": str(tmp_path / "b")})).to_dict()
    assert ok["resumed"] is True and ok["timing"]["optimizer_steps"] == 4


def test_pickle_checkpoint_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.zeros(1)}, folder / "optimizer.pt")
    cfg = load_config(None, tiny_overrides(tmp_path, resume=str(folder)))
    with pytest.raises(UserError, match=r"pickle.*--allow-pickle"):
        run_training(cfg)


def test_rss_cap_stops_with_advice(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, max_rss_gb=0.001))
    with pytest.raises(ResourceError, match="gradient-checkpointing.*qlora"):
        run_training(cfg)
    assert json.loads((Path(cfg.output_dir) / "failed.json").read_text())["status"] == "failed"
