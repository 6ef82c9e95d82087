"""Shared pieces of the benchmarks: the workload's token blocks, FLOP counting, GEMM peak, timings, held-out loss.

Every contender is measured with these same functions, so the definitions below are the ones the tables use:

- tokens/s: real (non-padding) tokens of the optimizer steps after the first, divided by the time of those steps
  (the first step is warm-up). With a single step, the whole run.
- time per optimizer step: the interval between the ends of consecutive optimizer steps (the first step is
  measured from the start of training); median and min-max over the steps after the first.
- FLOPs per token (PaLM appendix B convention, the attention term counts the full T x T score matrix): each method
  states its own (``Method.train_flops_per_token`` and ``flops_formula``): full fine-tuning 6 N + 12 L T d_attn;
  a method over a frozen base (LoRA, QLoRA, ...) 4 N + 6 N_trainable + 12 L T d_attn, where N counts the weights of
  every matrix multiply (all Linear layers, the LM head included even when tied to the embedding:
  ``Arch.flop_weights``), N_trainable the method's trainable parameters, L the layers, T the block length and
  d_attn = heads x head_dim. A frozen weight costs 2N forward + 2N backward through the activations and gets no
  weight gradient.
- MFU: FLOPs per token x tokens/s / the peak GEMM FLOP/s measured on this machine in the same invocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# The workload's data


def workload_blocks(model: str, block_size: int, train_blocks: int, eval_blocks: int) -> dict[str, Any]:
    """WikiText-2 token blocks built once with peftlab's own tokenization and cache (what `peftlab train` reads).

    Returns the first ``train_blocks`` training blocks and ``eval_blocks`` held-out blocks (offline mirror: train on
    validation.txt, evaluate on test.txt), with their sources.
    """
    from peftlab.configure import load_config
    from peftlab.data.sources import load_splits
    from peftlab.models import load_tokenizer, resolve_model_source
    from peftlab.tasks.clm import cached_blocks

    cfg = load_config(None, {"model": model, "dataset": "wikitext-2-raw-v1", "block_size": block_size})
    plan = load_splits(cfg)
    tokenizer = load_tokenizer(resolve_model_source(model), cfg)
    train = np.asarray(cached_blocks(plan.train, tokenizer, block_size, cfg.text_column))
    held = np.asarray(cached_blocks(plan.eval, tokenizer, block_size, cfg.text_column))
    if len(train) < train_blocks:
        raise ValueError(f"the training split has {len(train)} blocks, fewer than the {train_blocks} needed; "
                         "use fewer --steps")
    return {"train": np.ascontiguousarray(train[:train_blocks]), "eval": np.ascontiguousarray(held[:eval_blocks]),
            "train_source": plan.train.source, "eval_source": plan.eval.source, "note": plan.note}


def array_digest(arr: np.ndarray) -> str:
    """sha256 (16 hex digits) of an array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{arr.dtype}|{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# FLOPs


def workload_flops(model_source: str, block_size: int, methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The workload's FLOP counts: the model's shapes (from ``plan.arch``) and, per method (name -> the fields it
    trains with), its formula, trainable parameters and training FLOPs per token, each as the method states them
    (``Method.train_flops_per_token``)."""
    from peftlab.methods import get_method
    from peftlab.plan.arch import load_arch
    from peftlab.plan.memory import PlanInput

    arch = load_arch(model_source)
    shape = {"n_matmul": arch.flop_weights(), "layers": arch.num_layers, "d_attn": arch.q_dim,
             "d_model": arch.hidden_size, "vocab": arch.vocab_size}
    per_method = {}
    for name, fields in methods.items():
        method = get_method(name)
        inp = PlanInput(method=name, fields={k: v for k, v in fields.items() if k in method.field_names()},
                        seq_len=block_size)
        per_method[name] = {"formula": method.flops_formula, "display_name": method.display_name,
                            "n_trainable": method.plan_terms(arch, inp).trainable_params,
                            "per_token": method.train_flops_per_token(arch, inp)}
    return {"shape": shape, "methods": per_method}


# --------------------------------------------------------------------------------------------------------------
# GEMM peak


def gemm_peak(sizes: list[int], repeats: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Best GFLOP/s of torch.matmul on square matrices (2 n^3 FLOPs each) over sizes and repeats."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    per_size = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        sync()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
        per_size[str(n)] = 2 * n**3 / best / 1e9
        del a, b
    return {"gflops": max(per_size.values()), "per_size_gflops": per_size, "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "torch_threads": torch.get_num_threads(), "repeats": repeats}


# --------------------------------------------------------------------------------------------------------------
# Step timings -> the table's figures


def summarise_steps(step_end_s: list[float], tokens_cum: list[int], start_s: float = 0.0) -> dict[str, Any]:
    """Tokens/s and time per step from the end time and cumulative tokens of each optimizer step."""
    ends = [start_s, *step_end_s]
    durations = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    tokens = [b - a for a, b in zip([0, *tokens_cum], tokens_cum, strict=False)]
    steady = durations[1:] or durations
    steady_tokens = sum(tokens[1:]) if len(tokens) > 1 else sum(tokens)
    steady_time = sum(steady)
    return {
        "steps": len(durations),
        "tokens": int(sum(tokens)),
        "step_time_s": durations,
        "step_time_median_s": statistics.median(steady) if steady else None,
        "step_time_min_s": min(steady) if steady else None,
        "step_time_max_s": max(steady) if steady else None,
        "tokens_per_s": steady_tokens / steady_time if steady_time > 0 else None,
        "tokens_per_s_all_steps": sum(tokens) / sum(durations) if sum(durations) > 0 else None,
        "warmup_excluded": len(durations) > 1,
    }


# --------------------------------------------------------------------------------------------------------------
# Held-out loss (independent of peftlab's loss code)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: np.ndarray, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Total next-token NLL / predicted tokens over the blocks, from the model's full logits in float32."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(np.ascontiguousarray(blocks[start:start + batch_size])).to(device)
        logits = model(input_ids=ids).logits[:, :-1, :].float()
        target = ids[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"))
        count += target.numel()
    model.train(was_training)
    return {"eval_loss": nll / count, "eval_tokens": count}


# --------------------------------------------------------------------------------------------------------------
# Memory


def read_peak_rss_gb() -> float | None:
    """VmHWM of this process in GiB (since start or the last reset)."""
    from peftlab.measure import GB, peak_rss_bytes

    peak = peak_rss_bytes()
    return peak / GB if peak is not None else None


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment for a worker process: offline, quiet tokenizers, and the thread count when one is fixed."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, parent folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: int, cwd: Path) -> float:
    """Run a command (argument list, no shell) with its output in a log file; return its wall seconds. On failure,
    raise with the raised exception's line (the last "...Error: ..." line of the log), the log's path and tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout,
                              check=False)
    if proc.returncode != 0:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [ln for ln in lines if ln.strip() and ("Error" in ln or "error:" in ln)]
        error = errors[-1].strip() if errors else f"exit code {proc.returncode}"
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"{error} (exit code {proc.returncode}, log: {log})\n{tail}")
    return time.perf_counter() - t0


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------------------------
# Random-initialised models for the memory benchmarks


def random_llama_dir(shape: dict[str, int], seed: int = 0) -> Path:
    """A random-initialised Llama of ``shape`` (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, tie_word_embeddings) saved as a local model folder (safetensors,
    config.json, tokenizer) under peftlab's cache (``$PEFTLAB_CACHE`` or ~/.cache/peftlab)/bench-models, built once
    with a fixed seed and published atomically (a reader never sees a half-written folder).

    The tokenizer is SmolLM2's, the one the offline setup has (what tiny-llama uses), so the vocabulary is its
    49,152 entries: a 32,000-entry embedding (TinyLlama's) would meet token ids it does not have. Memory checks are
    unaffected: the planner reads this same config.json.
    """
    from transformers import AutoModelForCausalLM

    from peftlab.models import cache_dir, publish_atomically, smollm2_tokenizer_dir

    tok_dir = smollm2_tokenizer_dir()
    config = random_llama_config(shape)
    vocab = config.vocab_size
    key = (f"h{shape['hidden_size']}-i{shape['intermediate_size']}-l{shape['num_hidden_layers']}-"
           f"a{shape['num_attention_heads']}-kv{shape['num_key_value_heads']}-"
           f"{'tied' if shape['tie_word_embeddings'] else 'untied'}")
    target = cache_dir() / "bench-models" / f"llama-{key}-v{vocab}-seed{seed}"

    def build(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        shutil.copytree(tok_dir, tmp, dirs_exist_ok=True)

    return publish_atomically(build, target)


def random_llama_dir_built_apart(shape: dict[str, int], seed: int = 0) -> Path:
    """:func:`random_llama_dir`, built in a child process: building a 1B model leaves several GB in the builder's
    heap, which the benchmark's own process must not hold while its training processes are measured."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(random_llama_dir, shape, seed).result()


def random_llama_config(shape: dict[str, int]):
    """The LlamaConfig of :func:`random_llama_dir` (enough for the planner: no weights)."""
    from transformers import LlamaConfig

    from peftlab.models import smollm2_tokenizer_dir

    tokenizer = json.loads((smollm2_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    return LlamaConfig(vocab_size=len(tokenizer["model"]["vocab"]), max_position_embeddings=2048, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2, **shape)
