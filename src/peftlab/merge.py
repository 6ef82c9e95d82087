"""`peftlab merge`: fold a LoRA-family or IA3 adapter into its base weights and save a plain HF model.

A QLoRA-trained adapter is merged into the dequantized base: the base is loaded in 4-bit exactly as in training,
dequantized to full precision, and the adapter folded in, so the merged model computes what was trained. The merged
logits are compared with base + adapter on a fixed batch, and the differences are reported (and saved beside the
model in ``merge_info.json``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.methods import get_method

#: peft adapter types whose weights fold into the base, for an adapter without its run's config (a run's adapter:
#: its method's ``mergeable`` trait decides).
MERGEABLE_PEFT_TYPES = ("LORA", "IA3")
CHECK_BATCH = (2, 32)  # sequences x tokens of the fixed comparison batch
CHECK_SEED = 1234


def adapter_type(adapter: Path) -> str:
    """The peft type recorded in an adapter folder, with a one-line error for a folder that is not an adapter."""
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"adapter {str(adapter)!r} has no adapter_config.json; give a run's adapter/ folder")
    try:
        return str(json.loads(config.read_text(encoding="utf-8"))["peft_type"]).upper()
    except (json.JSONDecodeError, KeyError):
        raise UserError(f"{config}: not a peft adapter config (no peft_type)") from None


def check_mergeable(adapter: Path, method: str | None) -> None:
    """Refuse an adapter whose method cannot fold into the weights (its run's method says why; without a run
    config, the adapter's peft type decides)."""
    kind = adapter_type(adapter)
    if method is not None:
        trained_with = get_method(method)
        if not trained_with.mergeable:
            reason = trained_with.unsupported.get("merge", "cannot be merged")
            raise UserError(f"adapter {str(adapter)!r} ({kind}): method {method!r} {reason}")
        return
    if kind not in MERGEABLE_PEFT_TYPES:
        name = method or kind.lower()
        raise UserError(f"adapter {str(adapter)!r} is {name} ({kind}), which adds trainable inputs instead of "
                        "changing weights and cannot be merged; use it with `peftlab eval/generate --adapter`")


def fixed_batch(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The comparison batch: seeded random token ids, identical on every run."""
    gen = torch.Generator().manual_seed(CHECK_SEED)
    return torch.randint(0, vocab_size, CHECK_BATCH, generator=gen).to(device)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a model on a batch, in eval mode."""
    model.eval()
    return model(input_ids=ids).logits.float()


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Max absolute difference, and relative to the reference's largest magnitude."""
    diff = float((reference - other).abs().max())
    scale = float(reference.abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else diff}


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise UserError(f"output dir {str(output_dir)!r} is not empty; pass --overwrite or choose another")
        if not (output_dir / "config.json").is_file():
            raise UserError(f"output dir {str(output_dir)!r} holds something other than a model; refusing to "
                            "overwrite it")
        shutil.rmtree(output_dir)


@dataclass
class Merged:
    """A merged model in memory: the model, its tokenizer, the comparison report, and the fixed batch with the
    merged model's logits on it (what an export is checked against)."""

    model: nn.Module
    tokenizer: Any
    report: dict[str, Any]
    ids: torch.Tensor
    logits: torch.Tensor


def merge_config(adapter: str, overrides: dict[str, Any] | None = None) -> tuple[Path, Any]:
    """The adapter's path and config, refusing (before any weights load) an adapter that cannot be merged."""
    from peftlab.evaluate import eval_config, run_config_of
    from peftlab.tasks import TASKS

    path = Path(adapter).expanduser()
    check_mergeable(path, run_config_of(path).get("method"))
    overrides = dict(overrides or {})
    if overrides.get("precision") is None and overrides.get("dtype") is None:
        # merged in fp32 whatever the run trained in: an output's own rounding (a saved bf16 model, a GGUF type)
        # then happens once, and the reference logits carry no bf16 noise
        overrides["precision"] = "fp32"
    cfg = eval_config(str(path), overrides)
    if TASKS[cfg.task](cfg).model_kind != "causal_lm":
        raise UserError(f"merge and export support causal-LM adapters; this adapter's run is a {cfg.task} task")
    return path, cfg


def merge_adapter(path: Path, cfg: Any) -> Merged:
    """Fold the adapter into its base (a QLoRA adapter into the dequantized 4-bit base) and compare the merged
    logits with base + adapter on the fixed batch."""
    from peftlab.evaluate import attach_adapter
    from peftlab.models import load_model

    quantized = get_method(cfg.method).quantizes_base
    reference_4bit = None
    if quantized:  # the function the adapter was trained with: 4-bit base + adapter
        loaded = load_model(cfg, model_kind="causal_lm", quantize_4bit=True)
        trained = attach_adapter(loaded.model, path)
        ids = fixed_batch(loaded.model.config.vocab_size, loaded.device)
        reference_4bit = logits_of(trained, ids)
        del trained, loaded
    loaded = load_model(cfg, model_kind="causal_lm", quantize_4bit=quantized)
    base = loaded.model.dequantize(dtype=loaded.dtype) if quantized else loaded.model
    ids = fixed_batch(base.config.vocab_size, loaded.device)
    model = attach_adapter(base, path)
    reference = logits_of(model, ids)
    merged = model.merge_and_unload()
    merged_logits = logits_of(merged, ids)

    report: dict[str, Any] = {"adapter": str(path), "base_model": cfg.model, "source": loaded.source,
                              "method": cfg.method, "dtype": str(loaded.dtype).removeprefix("torch."),
                              "check_batch": list(CHECK_BATCH), "check_seed": CHECK_SEED,
                              "merged_vs_adapter": compare(reference, merged_logits)}
    if reference_4bit is not None:
        report["base"] = "dequantized 4-bit base (as trained)"
        report["merged_vs_4bit_adapter"] = compare(reference_4bit, merged_logits)
    return Merged(model=merged, tokenizer=loaded.tokenizer, report=report, ids=ids, logits=merged_logits)


def run_merge(adapter: str, output_dir: str, overrides: dict[str, Any] | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Merge ``adapter`` into its base, save the plain model (safetensors + tokenizer), return the comparison."""
    path, cfg = merge_config(adapter, overrides)
    out = Path(output_dir).expanduser()
    _prepare_output(out, overwrite)
    merged = merge_adapter(path, cfg)
    report = {**merged.report, "output_dir": str(out)}
    merged.model.save_pretrained(out, safe_serialization=True)
    merged.tokenizer.save_pretrained(out)
    (out / "merge_info.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _write_merged_card(path, out, report)  # --- ecosystem: model card
    return report


def _write_merged_card(adapter: Path, out: Path, report: dict[str, Any]) -> None:
    """The merged folder's model card: the adapter run's record (or, for an adapter outside a run folder, what the
    merge knows: base and method) plus the merge comparison."""
    from peftlab.model_card import write_card
    from peftlab.record import MethodInfo, ModelInfo, RunRecord

    record = RunRecord.read_if_valid(adapter.expanduser().resolve().parent) or RunRecord(
        model=ModelInfo(name=report["base_model"], source=report["source"]), method=MethodInfo(name=report["method"]))
    diff = report["merged_vs_adapter"]
    write_card(out, record, title=f"{out.name} (merged)", library="transformers", extra_tags=("merge",),
               extra=[f"Merged from the adapter `{adapter.name}` with `peftlab merge`; merged vs base + adapter on "
                      f"a fixed {report['check_batch'][0]}x{report['check_batch'][1]} batch: max abs logit diff "
                      f"{diff['max_abs_diff']:.3e} (relative {diff['max_rel_diff']:.3e}).", ""])


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"merged {report['adapter']} into {report['base_model']} ({report['dtype']}) -> {report['output_dir']}"]
    for key, label in (("merged_vs_adapter", "merged vs base + adapter"),
                       ("merged_vs_4bit_adapter", "merged vs 4-bit base + adapter (as trained)")):
        if key in report:
            d = report[key]
            lines.append(f"{label}: max abs diff {d['max_abs_diff']:.3e}, relative {d['max_rel_diff']:.3e}")
    return "\n".join(lines)
