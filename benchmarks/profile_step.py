"""Where a training micro-batch spends its time: peftlab's loss against the seed's (HF) loss, on the same model.

    python benchmarks/profile_step.py --out runs/bench/profile            # this machine's default threads
    python benchmarks/profile_step.py --out runs/bench/profile-1t --threads 1

One process builds smollm2-135m + LoRA (r 8 / alpha 16 / dropout 0.1 on q_proj, v_proj) through peftlab, then,
for each loss in turn, times forward + backward of identical micro-batches (4 x 128 WikiText-2 tokens; the median
over --repeats after one warm-up) and profiles two more with the torch profiler. Operator self-times are grouped:

- matmul: aten::mm / addmm / bmm / matmul (the GEMMs; their GFLOP/s is shown against the GEMM peak measured here);
- attention: the SDPA kernels, forward and backward;
- dropout RNG: aten::bernoulli_ (the LoRA dropout masks);
- loss: the LM head's softmax / cross-entropy element-wise work (not its matmuls);
- other: everything else (RMSNorm, rotary, SwiGLU, residual adds, LoRA scaling, copies, Python-side dispatch).

It prints a table and the Amdahl bound: the speed-up a loss path could reach over the HF path if everything but the
matmuls and attention cost nothing. Results go to --out/profile.json and profile.md. Whole training steps (data,
optimizer, logging) are measured by bench_trainers.py; this script looks inside one micro-batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import gemm_peak, workload_blocks, write_json  # noqa: E402

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "dropout RNG": ("aten::bernoulli_",),
    "loss": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss", "aten::logsumexp",
             "aten::exp", "aten::exp_", "aten::amax", "aten::sub_", "aten::scatter_add_", "aten::gather"),
}


def group_of(op: str) -> str:
    for group, prefixes in GROUPS.items():
        if any(op == p or op.startswith(p) for p in prefixes):
            return group
    return "other"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder (profile.json, profile.md)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5, help="timed micro-batches per loss after a warm-up (default 5)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "bf16-true"],
                   help="peftlab precision of the model and of both loss paths (default fp32)")
    return p.parse_args(argv)


def hf_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The seed's path: the model computes full logits and its own mean loss from ``labels``; scaled to a sum."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss * (batch["labels"].numel() - batch["labels"].size(0))


def measure(loss_fn, model, batches: list[dict[str, torch.Tensor]], repeats: int) -> dict[str, Any]:
    """Median forward + backward seconds over ``repeats`` micro-batches, then a profile of two more."""
    from torch.profiler import ProfilerActivity, profile

    def step(batch: dict[str, torch.Tensor]) -> None:
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[:2]:
            step(batch)
    groups: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        seconds = ev.self_cpu_time_total / 1e6 / 2  # per micro-batch
        groups[group_of(ev.key)] = groups.get(group_of(ev.key), 0.0) + seconds
        top.append((seconds, ev.key, ev.count // 2))
    top.sort(reverse=True)
    profiled = sum(groups.values())
    return {"median_s": statistics.median(times), "times_s": times, "profiled_s": profiled,
            "groups_s": groups, "top_ops": [{"op": k, "s": s, "calls": c} for s, k, c in top[:12]]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("PEFTLAB_DATA_DIR", str(HERE.parent.parent / "shared" / "datasets"))
    from peftlab.configure import load_config
    from peftlab.methods import get_method
    from peftlab.precision import compute_context
    from peftlab.tasks import TASKS
    from peftlab.train import prepare_model

    cfg = load_config(None, {"model": args.model, "method": "lora", "r": 8, "alpha": 16, "dropout": args.dropout,
                             "block_size": args.block_size, "precision": args.precision})
    task = TASKS["clm"](cfg)
    loaded, model = prepare_model(cfg, task, get_method("lora"))
    model.train()
    need = args.batch_size * max(args.repeats, 2)
    blocks = torch.tensor(workload_blocks(args.model, args.block_size, need, 1)["train"], dtype=torch.long)
    batches = [{"input_ids": b, "labels": b, "attention_mask": torch.ones_like(b)}
               for b in blocks.split(args.batch_size)]
    compute = torch.float32 if args.precision == "fp32" else torch.bfloat16
    peak = gemm_peak([1024, 2048], 2, compute, torch.device("cpu"))
    tokens = args.batch_size * args.block_size
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # adapters too
    flops = 4 * n_matmul * tokens  # LoRA: 2N forward + 2N backward through the activations (adapters ~0.3% more)

    def in_precision(fn):  # both paths run their forward in the run's precision, as the training loop does
        def run(m, b):
            with compute_context(loaded.precision, "cpu"):
                return fn(m, b)
        return run

    paths = {"peftlab (chunked loss)": in_precision(task.loss),
             "HF (model computes the loss)": in_precision(hf_loss_sum)}
    results = {name: measure(fn, model, batches, args.repeats) for name, fn in paths.items()}
    hf = results["HF (model computes the loss)"]
    lines = [f"| path | s / micro-batch | {' | '.join(list(GROUPS) + ['other'])} | matmul GFLOP/s |",
             "|---|---|" + "---|" * (len(GROUPS) + 2)]
    for name, r in results.items():
        scale = r["median_s"] / r["profiled_s"]  # profiler overhead removed proportionally
        cells = [f"{r['groups_s'].get(g, 0.0) * scale:.3f} ({100 * r['groups_s'].get(g, 0.0) / r['profiled_s']:.0f}%)"
                 for g in [*GROUPS, "other"]]
        gflops = flops / (r["groups_s"].get("matmul", 0.0) * scale) / 1e9
        lines.append(f"| {name} | {r['median_s']:.3f} | {' | '.join(cells)} | {gflops:.1f} |")
        r["matmul_gflops"] = gflops
    floor = (hf["groups_s"].get("matmul", 0.0) + hf["groups_s"].get("attention", 0.0)) * hf["median_s"] / hf[
        "profiled_s"]
    bound = hf["median_s"] / floor
    lines += ["", f"- Amdahl bound: with matmuls and attention as fast as in the HF path and everything else free, "
                  f"a micro-batch takes at least {floor:.3f} s: at most {bound:.2f}x the HF path's speed on "
                  f"{torch.get_num_threads()} thread(s).",
              f"- GEMM peak here: {peak['gflops']:.1f} GFLOP/s ({compute}, {torch.get_num_threads()} threads); matmul "
              f"FLOPs per micro-batch: 4 x {n_matmul:,} weights x {tokens} tokens.",
              f"- Command: `{' '.join(['python', 'benchmarks/profile_step.py', *(argv or sys.argv[1:])])}`"]
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "profile.json", {"threads": torch.get_num_threads(), "gemm_peak": peak,
                                           "amdahl_bound_vs_hf": bound, "paths": results, "settings": vars(args)})
    (args.out / "profile.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
