"""PEFT methods, all through peft's own implementations: LoRA and its variants, IA3, prefix tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from torch import nn

from peftlab.methods import Method, register, resolve_targets

#: Where a run keeps the adapter as initialised, for methods that convert at save time (PiSSA).
INITIAL_ADAPTER_DIR = "adapter_init"

LORA_FIELDS = frozenset({"r", "alpha", "dropout", "target_modules", "bias"})
PEFT_TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS}
FEEDFORWARD_NAMES = {"down_proj", "fc2", "w2", "dense_4h_to_h", "output"}


def _lora_config(model: nn.Module, cfg, task_kind: str, **extra) -> LoraConfig:
    targets = resolve_targets(model, cfg.target_modules, "target_modules" in cfg.model_fields_set)
    return LoraConfig(task_type=PEFT_TASK_TYPES[task_kind], r=cfg.r, lora_alpha=cfg.alpha,
                      lora_dropout=cfg.dropout, target_modules=targets, bias=cfg.bias, **extra)


def _lora_applier(**extra):
    def apply(model: nn.Module, cfg, task_kind: str) -> nn.Module:
        return get_peft_model(model, _lora_config(model, cfg, task_kind, **extra))
    return apply


def _apply_qlora(model: nn.Module, cfg, task_kind: str) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return get_peft_model(model, _lora_config(model, cfg, task_kind))


def _apply_ia3(model: nn.Module, cfg, task_kind: str) -> nn.Module:
    targets, feedforward = None, None
    if "target_modules" in cfg.model_fields_set:
        targets = resolve_targets(model, cfg.target_modules, user_set=True)
        feedforward = [t for t in targets if t in FEEDFORWARD_NAMES]
    return get_peft_model(model, IA3Config(task_type=PEFT_TASK_TYPES[task_kind], target_modules=targets,
                                           feedforward_modules=feedforward))


def _apply_prefix(model: nn.Module, cfg, task_kind: str) -> nn.Module:
    return get_peft_model(model, PrefixTuningConfig(task_type=PEFT_TASK_TYPES[task_kind],
                                                    num_virtual_tokens=cfg.num_virtual_tokens))


def _loraplus_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                     weight_decay=cfg.weight_decay)


register(Method("lora", LORA_FIELDS, _lora_applier(), "low-rank adapters (Hu et al. 2021)", mergeable=True))
register(Method("qlora", LORA_FIELDS | {"quant_type", "double_quant"}, _apply_qlora,
                "LoRA over a 4-bit NF4 base (Dettmers et al. 2023)", quantized_base=True, mergeable=True))
register(Method("dora", LORA_FIELDS, _lora_applier(use_dora=True),
                "weight-decomposed LoRA (Liu et al. 2024)", mergeable=True))
register(Method("rslora", LORA_FIELDS, _lora_applier(use_rslora=True),
                "rank-stabilised LoRA: scaling alpha/sqrt(r) (Kalajdzievski 2023)", mergeable=True))
register(Method("pissa", LORA_FIELDS, _lora_applier(init_lora_weights="pissa_niter_4"),
                "LoRA initialised from the principal singular vectors (Meng et al. 2024)", mergeable=True,
                converts_at_save=True))
register(Method("loraplus", LORA_FIELDS | {"loraplus_lr_ratio"}, _lora_applier(),
                "LoRA with a higher learning rate for B (Hayou et al. 2024)", mergeable=True,
                make_optimizer=_loraplus_optimizer))
register(Method("ia3", frozenset({"target_modules"}), _apply_ia3,
                "learned rescaling vectors (Liu et al. 2022)", mergeable=True))
register(Method("prefix", frozenset({"num_virtual_tokens"}), _apply_prefix,
                "trainable prefix key/values per layer (Li & Liang 2021)"))


def save_initial_adapter(model: nn.Module, method: Method, run_dir: str | Path) -> Path | None:
    """Before training, save the adapter as initialised (only for methods that convert at save time).

    PiSSA moves the principal components of each target weight out of the base (W_res = W - B0 A0) into the
    adapter. Saving the initial adapter lets :func:`adapter_save_kwargs` turn the trained adapter into a plain
    LoRA of rank 2r (delta W = B A - B0 A0) that loads onto the original, unmodified base model.
    """
    if not method.converts_at_save:
        return None
    target = Path(run_dir) / INITIAL_ADAPTER_DIR
    model.save_pretrained(target, safe_serialization=True)
    return target


def adapter_save_kwargs(method: Method, run_dir: str | Path) -> dict[str, Any]:
    """Extra ``save_pretrained`` arguments for the final adapter (peft's PiSSA-to-LoRA conversion)."""
    if not method.converts_at_save:
        return {}
    return {"path_initial_model_for_weight_conversion": str(Path(run_dir) / INITIAL_ADAPTER_DIR)}
