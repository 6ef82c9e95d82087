"""The seed repository's memory tables, predicted by the planner for its 7B models (``peftlab plan --seed-table``)."""

from __future__ import annotations

from typing import Any

from peftlab.methods import get_method
from peftlab.plan.arch import BUILTIN_ARCHS
from peftlab.plan.memory import PlanInput, format_gb, plan_memory

SEED_TABLE_MODELS = ("Mistral-7B-v0.1", "Llama-2-7B")
SEED_TABLE_ROWS = (("full", None, None), ("lora", 8, 16), ("lora", 16, 32), ("lora", 128, 256), ("qlora", 8, 16))
#: What the seed's README claimed, in GB, where known (it gave ~6 GB for LoRA on a 7B model with its defaults).
SEED_CLAIMED = {("lora", 8): "~6"}


def seed_table(device: str = "cuda", precision: str = "bf16-mixed", batch_size: int = 4, seq_len: int = 128,
               grad_accum: int = 8) -> list[dict[str, Any]]:
    """Predicted memory of every row of the seed's tables (seed defaults: q/v targets, dropout 0.1, AdamW)."""
    rows = []
    for model in SEED_TABLE_MODELS:
        arch = BUILTIN_ARCHS[model]
        for method, r, alpha in SEED_TABLE_ROWS:
            inp = PlanInput(method=method, fields={"r": r} if r else {}, batch_size=batch_size, seq_len=seq_len,
                            grad_accum=grad_accum, device=device, precision=precision)
            plan = plan_memory(arch, inp)
            rows.append({"model": model, "method": method, "r": r, "alpha": alpha, "plan": plan,
                         "seed_claimed": SEED_CLAIMED.get((method, r), "-")})
    return rows


def format_seed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: predicted peak per seed row next to the seed's claim."""
    first = rows[0]["plan"].inputs
    head = (f"Predicted peak memory (GiB), {first.device} {first.precision}, block {first.seq_len}, batch "
            f"{first.batch_size}, accumulation {first.grad_accum}, AdamW, targets q_proj,v_proj, dropout 0.1\n\n"
            "| Model | Training type | (r, alpha) | weights | gradients+optimizer | activations+logits | runtime | "
            "predicted peak | seed claimed |\n|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for row in rows:
        c = row["plan"].components
        kind = get_method(row["method"]).display_name
        cfg = "-" if row["r"] is None else f"({row['r']}, {row['alpha']})"
        weights = c["base_weights"] + c["trainable_weights"]
        optim = c["gradients"] + c["optimizer_states"] + c["optimizer_step_temp"]
        out.append(f"| {row['model']} | {kind} | {cfg} | {format_gb(weights)} | {format_gb(optim)} | "
                   f"{format_gb(c['activations'] + c['logits_ce'])} | {format_gb(c['runtime'])} | "
                   f"{format_gb(row['plan'].peak_bytes)} | {row['seed_claimed']} |")
    out.append("\nweights: frozen base (4-bit NF4 for QLoRA) plus trainable weights; gradients+optimizer: the "
               "gradients held at the peak (all of them, with accumulation) and two fused-AdamW states per trainable "
               "weight. The seed's ~6 GB for LoRA on a 7B model is below the bf16 weights alone.")
    return "\n".join(out)
