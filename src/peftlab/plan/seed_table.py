"""The seed repository's memory tables, predicted by the planner for its 7B models (``peftlab plan --seed-table``),
next to what the seed claimed, with the arithmetic that rules out the claims no GPU can meet, and the same models
under FSDP on 8 GPUs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.methods import get_method
from peftlab.plan.arch import BUILTIN_ARCHS, Arch
from peftlab.plan.memory import COMPONENT_GROUPS, GIB, PlanInput, format_gb, plan_memory

SEED_TABLE_MODELS = ("Mistral-7B-v0.1", "Llama-2-7B")
SEED_TABLE_ROWS = (("full", None, None), ("lora", 8, 16), ("lora", 16, 32), ("lora", 128, 256), ("qlora", 8, 16))
#: The rows also planned per GPU under FSDP (full fine-tuning and LoRA (8, 16)).
FSDP_ROWS = (("full", None, None), ("lora", 8, 16))
FSDP_PROCESSES = 8
GB = 10**9  # the seed's tables are in GB
#: The GPU the FSDP rows (and the fits column) assume: 80 GB, as the H100 80GB (81,559 MiB) and A100-80GB
#: (81,920 MiB) report; the smaller of the two.
GPU_NAME = "80 GB (H100 / A100-80GB)"
GPU_GIB = 81559 / 1024
#: Headroom for what the caching allocator reserves above the allocated peak (the planner's note: 5-20 %).
RESERVED_MARGIN = 0.10


@dataclass(frozen=True)
class SeedClaim:
    """One cell of the seed's causal-LM table: peak GPU memory (GB) and, for full fine-tuning, minutes per epoch."""

    gb: float
    minutes_per_epoch: int | None = None

    def cell(self) -> str:
        time = f" at {self.minutes_per_epoch} min/epoch" if self.minutes_per_epoch else ""
        return f"{self.gb:g} GB{time}"


#: The seed's causal-LM table, quoted: (model, method, r, its claim). QLoRA had no row there.
SEED_CLAIM_ROWS: tuple[tuple[str, str, int | None, SeedClaim], ...] = (
    ("Mistral-7B-v0.1", "full", None, SeedClaim(16, 120)),
    ("Mistral-7B-v0.1", "lora", 8, SeedClaim(6)),
    ("Mistral-7B-v0.1", "lora", 16, SeedClaim(7)),
    ("Mistral-7B-v0.1", "lora", 128, SeedClaim(7)),
    ("Llama-2-7B", "full", None, SeedClaim(24, 200)),
    ("Llama-2-7B", "lora", 8, SeedClaim(9)),
    ("Llama-2-7B", "lora", 16, SeedClaim(10)),
    ("Llama-2-7B", "lora", 128, SeedClaim(10)),
)
SEED_CLAIMS = {(model, method, r): claim for model, method, r, claim in SEED_CLAIM_ROWS}


def claim_floor(arch: Arch, method_name: str) -> tuple[int, str]:
    """The least memory (bytes) any one-GPU run of the method needs for its weights and states alone, and how."""
    method = get_method(method_name)
    n = arch.total_params()
    billions = f"{n / 1e9:.2f} B parameters"
    if not method.is_peft:  # every weight trained: weights, gradients and two AdamW states per parameter
        return 8 * n, (f"full fine-tuning with AdamW holds weights, gradients and two optimizer states for each of "
                       f"its {billions}: x 16 bytes = {16 * n / GB:.1f} GB with fp32 master weights (bf16 weights "
                       f"and gradients 2 + 2, fp32 master 4, fp32 AdamW states 4 + 4), and at least x 8 bytes = "
                       f"{8 * n / GB:.1f} GB all in bf16, before any activation")
    if method.quantizes_base:
        return n // 2, f"a 4-bit base of {billions} takes {n / 2 / GB:.1f} GB"
    return 2 * n, (f"the frozen base's {billions} in 16 bits take {2 * n / GB:.1f} GB (x 2 bytes) before any "
                   "adapter, gradient, optimizer state or activation")


def claim_check(arch: Arch, method_name: str, claim: SeedClaim) -> str | None:
    """Why a claim is not physically possible on one GPU, or None when it is."""
    floor, why = claim_floor(arch, method_name)
    if claim.gb * GB >= floor:
        return None
    return f"not possible on one GPU: {why}"


def fits(peak_bytes: int, device: str) -> str:
    """Whether a per-GPU peak fits the assumed GPU: yes, tight (within the reserved-memory margin) or no."""
    if device != "cuda":
        return "-"
    peak = peak_bytes / GIB
    if peak <= GPU_GIB * (1 - RESERVED_MARGIN):
        return "yes"
    return "tight" if peak <= GPU_GIB else "no"


def seed_table(device: str = "cuda", precision: str = "bf16-mixed", batch_size: int = 4, seq_len: int = 128,
               grad_accum: int = 8, fsdp_processes: int = FSDP_PROCESSES) -> list[dict[str, Any]]:
    """Predicted memory of every row of the seed's tables (seed defaults: q/v targets, dropout 0.1, AdamW), then
    full fine-tuning and LoRA (8, 16) per GPU under FSDP on ``fsdp_processes`` GPUs (the same batch per GPU)."""
    planned = [(model, row, 1, "ddp") for model in SEED_TABLE_MODELS for row in SEED_TABLE_ROWS]
    planned += [(model, row, fsdp_processes, "fsdp") for model in SEED_TABLE_MODELS for row in FSDP_ROWS]
    rows = []
    for model, (method, r, alpha), processes, strategy in planned:
        arch = BUILTIN_ARCHS[model]
        inp = PlanInput(method=method, fields={"r": r} if r else {}, batch_size=batch_size, seq_len=seq_len,
                        grad_accum=grad_accum, device=device, precision=precision, processes=processes,
                        strategy=strategy)
        plan = plan_memory(arch, inp)
        claim = SEED_CLAIMS.get((model, method, r)) if processes == 1 else None
        impossible = claim_check(arch, method, claim) if claim else None
        rows.append({"model": model, "method": method, "r": r, "alpha": alpha, "processes": processes,
                     "strategy": strategy, "plan": plan, "fits": fits(plan.peak_bytes, device),
                     "seed_claimed": claim.cell() if claim else "-",
                     "seed_claim": vars(claim) if claim else None, "not_possible": impossible})
    return rows


def _group(components: dict[str, int], group: str) -> int:
    return sum(components.get(k, 0) for k in COMPONENT_GROUPS[group])


def format_seed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: predicted peak per seed row next to the seed's claim, then what rules the claims out."""
    first = rows[0]["plan"].inputs
    head = (f"Predicted peak memory per GPU (GiB), {first.device} {first.precision}, block {first.seq_len}, batch "
            f"{first.batch_size} per GPU, accumulation {first.grad_accum}, AdamW, targets q_proj,v_proj, dropout 0.1; "
            f"GPU assumed: {GPU_NAME}, {GPU_GIB:.1f} GiB\n\n"
            "| Model | Training type | (r, alpha) | GPUs | weights | gradients+optimizer | activations+logits | "
            "runtime | predicted peak | fits 80 GB | seed claimed |\n|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    notes = []
    for row in rows:
        c = row["plan"].components
        kind = get_method(row["method"]).display_name
        cfg = "-" if row["r"] is None else f"({row['r']}, {row['alpha']})"
        gpus = "1" if row["processes"] == 1 else f"{row['processes']} ({row['strategy'].upper()})"
        claimed = row["seed_claimed"]
        if row["not_possible"]:
            notes.append(f"- {row['model']} {kind} {cfg if row['r'] else ''}".rstrip() + f", seed {claimed}: "
                         f"{row['not_possible']}.")
            claimed += " (not possible, below)"
        out.append(f"| {row['model']} | {kind} | {cfg} | {gpus} | {format_gb(_group(c, 'weights'))} | "
                   f"{format_gb(_group(c, 'gradients+optimizer'))} | {format_gb(_group(c, 'activations+logits'))} | "
                   f"{format_gb(c['runtime'])} | {format_gb(row['plan'].peak_bytes)} | {row['fits']} | {claimed} |")
    n = next((r["processes"] for r in rows if r["processes"] > 1), FSDP_PROCESSES)
    out.append(f"\nweights: frozen base (4-bit NF4 for QLoRA) plus trainable weights, and under FSDP each GPU's 1/{n} "
               "shard plus the layers and root group all-gathered in bf16; gradients+optimizer: the gradients held "
               "at the peak (all of them, with accumulation; FSDP: the GPU's shard plus one layer's unsharded "
               "gradient) and two fused-AdamW states per trainable weight; runtime: the CUDA context. fits: the "
               f"peak within {GPU_GIB:.1f} GiB less {RESERVED_MARGIN:.0%} for memory the allocator reserves above "
               "it (tight: within that margin). seed claimed: the seed's causal-LM table, quoted (GB = 10^9 bytes; "
               "it had no QLoRA or FSDP rows).")
    if notes:
        out += ["", "Seed claims that no single-GPU run can meet (GB = 10^9 bytes):", *notes]
    return "\n".join(out)
