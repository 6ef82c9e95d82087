"""The CUDA paths read against their libraries (issue 24), checked on CPU: the load path's dtypes, the QLoRA + FSDP
refusal, one-rank FSDP's process group, RNG state on resume with fewer GPUs, the loss's host syncs, and the
benchmark contenders without TRL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from peftlab import models
from peftlab.configure import load_config
from peftlab.models import load_model, resolve_model_source
from tests.conftest import tiny_overrides


def bf16_checkpoint(tmp_path: Path) -> Path:
    """tiny-llama saved in bf16 (as most released LLMs are), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    src = Path(resolve_model_source("tiny-llama"))
    dst = tmp_path / "tiny-llama-bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, dst / f.name)
    return dst


def linear_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {m.weight.dtype for m in model.modules() if type(m) is nn.Linear
            and m.weight is not model.get_input_embeddings().weight}


def test_bf16_checkpoint_loads_without_an_fp32_copy_of_its_linears(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = bf16_checkpoint(tmp_path)
    assert models.stored_float_dtypes(str(folder)) == {"BF16"}
    loaded_dtypes: list[set[torch.dtype]] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded_dtypes.append(linear_dtypes(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = load_config(None, tiny_overrides(tmp_path, model=str(folder), precision="bf16-mixed"))
    direct = load_model(cfg).model
    assert loaded_dtypes == [{torch.bfloat16}]  # the linears came off the file in bf16, never in fp32
    # the same tensors as the fp32 load-then-cast path
    monkeypatch.setattr(models, "stored_float_dtypes", lambda *a, **k: set())
    via_fp32 = load_model(cfg).model
    assert loaded_dtypes[-1] == {torch.float32}
    a, b = direct.state_dict(), via_fp32.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert direct.get_input_embeddings().weight.dtype == torch.float32
    assert linear_dtypes(direct) == {torch.bfloat16}


def test_fp32_checkpoint_casts_before_moving_to_the_device(tmp_path, monkeypatch):
    """The move to the device comes after the bf16 cast, so the GPU never holds the fp32 linears."""
    at_move: list[set[torch.dtype]] = []
    original = nn.Module.to

    def spy(self, *args, **kwargs):
        if hasattr(self, "get_input_embeddings") and args and isinstance(args[0], torch.device):
            at_move.append(linear_dtypes(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    cfg = load_config(None, tiny_overrides(tmp_path, precision="bf16-mixed"))
    load_model(cfg)
    assert at_move == [{torch.bfloat16}]


def test_qlora_with_fsdp_is_refused_on_every_device():
    from peftlab.errors import UserError
    from peftlab.methods import get_method
    from peftlab.strategies import get_strategy

    for device in ("cpu", "cuda"):
        with pytest.raises(UserError, match="loses their quantization state"):
            get_strategy("fsdp").check(get_method("qlora"), torch.device(device))
    get_strategy("fsdp").check(get_method("lora"), torch.device("cuda"))  # LoRA stays allowed


def test_one_rank_fsdp_binds_nccl_to_its_gpu_and_destroys_the_group_at_exit(monkeypatch):
    from peftlab import fsdp

    calls: dict = {}
    monkeypatch.setattr(fsdp.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fsdp.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(fsdp.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(fsdp.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(fsdp.torch.cuda, "set_device", lambda index: calls.update(set_device=index))
    monkeypatch.setattr(fsdp.atexit, "register", lambda fn: calls.update(at_exit=fn))
    assert fsdp.ensure_process_group(torch.device("cuda", 3)) == (0, 1)
    assert calls["backend"] == "nccl" and calls["set_device"] == 3
    assert calls["device_id"] == torch.device("cuda", 3)
    assert calls["at_exit"] is fsdp.destroy_own_process_group


def test_one_rank_group_is_destroyed_when_the_process_exits():
    """A real gloo group in a child process: the exit handlers (which also run after an exception) destroy it."""
    import subprocess
    import sys

    script = ("import atexit, torch, torch.distributed as dist\nfrom peftlab import fsdp\n"
              "print(fsdp.ensure_process_group(torch.device('cpu')), dist.is_initialized())\n"
              "atexit._run_exitfuncs()\nprint('after exit handlers:', dist.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(0, 1) True" in proc.stdout and "after exit handlers: False" in proc.stdout, proc.stdout


def test_rng_state_resumes_on_fewer_gpus(monkeypatch):
    """A rank saves its own GPU's state; resuming on a machine with fewer GPUs (or from an older checkpoint that
    saved all four) restores that GPU's state and nothing else."""
    from peftlab import checkpoint

    saved_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(checkpoint.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint.torch.cuda, "get_rng_state", lambda device="cuda": saved_state)
    monkeypatch.setattr(checkpoint.torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("every GPU's state must not be saved"))
    monkeypatch.setattr(checkpoint.torch.cuda, "set_rng_state_all",
                        lambda states: pytest.fail("set_rng_state_all fails with fewer GPUs"))
    monkeypatch.setattr(checkpoint.torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(checkpoint.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(checkpoint.torch.cuda, "device_count", lambda: 1)
    cpu_state = torch.get_rng_state()
    tensors, meta = checkpoint._rng_state()
    assert [k for k in tensors if k.startswith("torch_cuda")] == ["torch_cuda"]
    checkpoint._restore_rng(tensors, meta)
    assert restored == [saved_state]
    # an older checkpoint written on 4 GPUs, resumed on 1
    old = {"torch_cpu": cpu_state, **{f"torch_cuda_{i}": saved_state + i for i in range(4)}}
    checkpoint._restore_rng(old, meta)
    assert torch.equal(restored[-1], saved_state)  # device 0's


WITHOUT_TRL = """
import importlib.metadata as metadata, runpy, sys
sys.modules["trl"] = None  # `import trl` raises ImportError, as where TRL is not installed
real_version = metadata.version
def version(name):
    if name == "trl":
        raise metadata.PackageNotFoundError(name)
    return real_version(name)
metadata.version = version
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_trainer_contender_runs_without_trl(tmp_path, dtype):
    """The HF Trainer row of the trainer benchmark imports and trains where TRL is absent (the GPU image), records
    TRL as absent, and on bf16 weights keeps its adapters in bf16 (peftlab bf16-true's like)."""
    import json
    import subprocess
    import sys

    import numpy as np

    from tests.conftest import REPO

    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.integers(0, 1000, size=(4, 16)))
    np.save(tmp_path / "eval.npy", rng.integers(0, 1000, size=(2, 16)))
    out = tmp_path / "hf.json"
    args = [str(REPO / "benchmarks" / "_contenders.py"), "hf", "--model-source", resolve_model_source("tiny-llama"),
            "--train-blocks", str(tmp_path / "train.npy"), "--eval-blocks", str(tmp_path / "eval.npy"),
            "--steps", "1", "--batch-size", "2", "--grad-accum", "2", "--dtype", dtype, "--bf16", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRL, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO / "benchmarks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["versions"]["trl"] is None
    assert np.isfinite(result["heldout"]["eval_loss"])
    assert result["trainable_params"] > 0


def test_trainer_benchmark_pairs_hf_and_peftlab_precisions_like_for_like(tmp_path, monkeypatch):
    """HF bf16=True trains fp32 weights (against peftlab bf16-mixed); its -bf16true row trains bf16 weights."""
    import argparse

    from tests.conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_trainers

    commands: dict[str, list[str]] = {}

    def fake_run(cmd, log, env, timeout, cwd):
        commands[log.stem] = cmd
        out = Path(cmd[cmd.index("--out") + 1])
        out.write_text('{"heldout": {"eval_loss": 1.0}}')
        return 0.0

    monkeypatch.setattr(bench_trainers, "run_logged", fake_run)
    args = argparse.Namespace(out=tmp_path, device="cuda", steps=1, batch_size=2, grad_accum=1, lr=1e-3, r=8,
                              alpha=16, dropout=0.0, target_modules="q_proj", seed=0, timeout=10)
    (tmp_path / "raw").mkdir()
    paths = {"model_source": tmp_path, "train": tmp_path / "t.npy", "eval": tmp_path / "e.npy"}
    for name in ("hf-trainer-lora-bf16", "hf-trainer-lora-bf16true"):
        bench_trainers.run_baseline(args, name, name, paths, {})
    dtype = {k: v[v.index("--dtype") + 1] for k, v in commands.items()}
    assert dtype == {"hf-trainer-lora-bf16": "float32", "hf-trainer-lora-bf16true": "bfloat16"}
    assert all("--bf16" in v for v in commands.values())
    assert bench_trainers.peak_memory_gb([{"memory": {"peak_rss_gb": 9.0, "cuda_max_allocated_gb": 2.0}}]) == 2.0
    assert bench_trainers.peak_memory_gb([{"memory": {"peak_rss_gb": 9.0}}]) == 9.0


def test_chunked_loss_makes_no_host_sync_and_keeps_its_value(monkeypatch):
    """A chunk without labels is computed (zeros), not skipped after a `bool(tensor)` host sync."""
    from peftlab.losses import IGNORE_INDEX, chunked_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 7])
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
    ref_grads = torch.autograd.grad(expected, (hidden, weight))

    def no_bool(self):
        raise AssertionError("host sync: bool() of a tensor inside the loss")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_bool)
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=2)  # the first chunk has no labels
    grads = torch.autograd.grad(got, (hidden, weight))
    monkeypatch.undo()
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_step_counts_are_taken_in_one_host_transfer(monkeypatch):
    """The step's label and token counts match the task's own, counted on host copies."""
    from peftlab.losses import IGNORE_INDEX, shifted_label_count, step_counts

    class Task:
        def loss_count(self, batch):
            assert batch["labels"].device.type == "cpu"
            return shifted_label_count(batch["labels"])

        def tokens_in(self, batch):
            return int(batch["attention_mask"].sum())

    micro = [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
              "labels": torch.tensor([[1, 2, IGNORE_INDEX, 4, 5], [1, IGNORE_INDEX, IGNORE_INDEX, 4, 5]])}] * 3
    assert step_counts(Task(), micro) == (3 * (3 + 2), 30)
