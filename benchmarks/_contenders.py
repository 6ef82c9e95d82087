"""Benchmark workers, each run by bench_trainers.py in a fresh process: one contender's training, a held-out
evaluation of a saved peftlab run, or the GEMM peak. Each writes one JSON file (--out).

    python benchmarks/_contenders.py hf   --model-source DIR --train-blocks X.npy --eval-blocks Y.npy --out r.json
    python benchmarks/_contenders.py trl  (same arguments)
    python benchmarks/_contenders.py eval --run-dir RUN --model-source DIR --eval-blocks Y.npy --out r.json
    python benchmarks/_contenders.py gemm --sizes 1024,2048 --out g.json

HF Trainer + peft is configured as the seed does: default TrainingArguments (fp32 on CPU, AdamW, linear schedule,
max_grad_norm 1.0; ``--bf16`` sets ``bf16=True``) with batch, accumulation and learning rate set, on a
group_texts-style dataset (input_ids, attention_mask, labels = input_ids) with the default data collator. TRL's
SFTTrainer gets the same pre-tokenized blocks with dataset preparation skipped (no packing, no re-tokenisation) and
the same precision as the others (bf16 follows ``--bf16``; gradient checkpointing, on by default in SFTConfig, is
turned off so that all do the same work).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import gemm_peak, heldout_loss, read_peak_rss_gb, write_json

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TokenCounter:
    """Counts, per micro-batch a trainer trains on, the real tokens, the tokens incl. padding and the label tokens.

    Real tokens: the attention mask's sum; without a mask (TRL's padding-free batches: one flattened row of real
    tokens) every input id. It wraps ``trainer.training_step`` rather than the data collator: accelerate's data
    loader fetches one batch ahead, so counting at the collator would credit a step with a batch of the next one.
    """

    def __init__(self, trainer) -> None:
        self.tokens = self.padded = self.labels = 0
        self.inner = trainer.training_step
        trainer.training_step = self

    def __call__(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        self.padded += int(inputs["input_ids"].numel())
        labels = inputs.get("labels")
        if labels is not None:
            self.labels += int((labels != IGNORE_INDEX).sum())
        return self.inner(model, inputs, *args, **kwargs)


class RowsDataset(torch.utils.data.Dataset):
    """A map-style dataset over equal-length columns (when the datasets package is missing)."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, list]:
        return {k: v[i] for k, v in self.columns.items()}


def step_clock(counter: TokenCounter, device: torch.device):
    """A TrainerCallback recording the end time and cumulative tokens of every optimizer step."""
    from transformers import TrainerCallback

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.ends: list[float] = []
            self.tokens: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter() - self.start)
            self.tokens.append(counter.tokens)

    return StepClock()


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=args.target_modules.split(","))


def load_base(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model_source, dtype=DTYPES[args.dtype]).to(device)


def reset_memory(device: torch.device) -> None:
    from peftlab.measure import reset_peak_rss

    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory_report(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_gb": read_peak_rss_gb()}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        out["cuda_max_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1024**3
    return out


def optimizer_info(optimizer) -> dict[str, Any]:
    """The optimizer class and its fused/foreach flags (they decide its speed)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return {"class": type(inner).__name__, "fused": inner.defaults.get("fused"),
            "foreach": inner.defaults.get("foreach")}


def train_with(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train with HF Trainer + peft ('hf') or TRL SFTTrainer ('trl') and measure it."""
    try:
        from datasets import Dataset
    except ImportError:  # e.g. the GPU check's bare image; TRL needs datasets, HF Trainer does not
        Dataset = None
    from peft import get_peft_model
    from transformers import AutoTokenizer, TrainingArguments, default_data_collator

    device = torch.device(args.device)
    train_blocks = np.load(args.train_blocks)
    eval_blocks = np.load(args.eval_blocks)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = load_base(args, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # bf16=True is the trainers' own mixed precision: bf16 autocast over the fp32 weights (on CPU too)
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"bench-{kind}-"), per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, max_steps=args.steps,
                  seed=args.seed, save_strategy="no", report_to="none", bf16=args.bf16,
                  use_cpu=device.type == "cpu")  # without it, bf16=True is refused on a CPU-only machine
    if kind == "hf":
        model = get_peft_model(model, lora_config(args))
        ids = train_blocks.tolist()
        columns = {"input_ids": ids, "attention_mask": np.ones_like(train_blocks).tolist(),
                   "labels": [list(row) for row in ids]}
        dataset = Dataset.from_dict(columns) if Dataset is not None else RowsDataset(columns)
        from transformers import Trainer

        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=default_data_collator)
    else:
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_dict({"input_ids": train_blocks.tolist()})
        config = SFTConfig(**common, gradient_checkpointing=False, packing=False,
                           dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora_config(args))
    counter = TokenCounter(trainer)
    clock = step_clock(counter, device)
    trainer.add_callback(clock)
    load_time = time.perf_counter() - t0

    reset_memory(device)
    output = trainer.train()
    memory = memory_report(device)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    held = heldout_loss(trainer.model, eval_blocks, args.eval_batch_size, device)
    import transformers
    import trl

    return {"contender": kind, "step_end_s": clock.ends, "tokens_cum": clock.tokens, "load_time_s": load_time,
            "memory": memory, "heldout": held, "trainable_params": trainable, "torch_threads": torch.get_num_threads(),
            "versions": {"transformers": transformers.__version__, "trl": trl.__version__, "torch": torch.__version__},
            "optimizer": optimizer_info(trainer.optimizer), "train_loss_mean": output.training_loss,
            "precision": "bf16 autocast (bf16=True)" if args.bf16 else args.dtype,
            "train_blocks": int(len(train_blocks)), "eval_blocks": int(len(eval_blocks))}


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out loss of a finished peftlab run, loading its artifact with transformers/peft (not peftlab)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(args.device)
    run = Path(args.run_dir)
    from peftlab.record import RunRecord  # the one reader of results.json

    results = RunRecord.read(run).to_dict()
    dtype = DTYPES[results["model"]["dtype"]]
    method = results["method"]["name"]
    from peftlab.methods import get_method

    quantizes_base = get_method(method).quantizes_base
    if (run / "model").is_dir():
        model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=dtype).to(device)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if quantizes_base:
            cfg = results["config"]
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=cfg["quant_type"], bnb_4bit_use_double_quant=cfg["double_quant"],
                bnb_4bit_compute_dtype=dtype)
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        base = AutoModelForCausalLM.from_pretrained(args.model_source, **kwargs)
        if not quantizes_base:
            base = base.to(device)
        model = PeftModel.from_pretrained(base, run / "adapter")
    held = heldout_loss(model, np.load(args.eval_blocks), args.eval_batch_size, device)
    return {"heldout": held, "method": method}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["hf", "trl", "eval", "gemm"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model-source")
    parser.add_argument("--train-blocks")
    parser.add_argument("--eval-blocks")
    parser.add_argument("--run-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype")
    parser.add_argument("--bf16", action="store_true", help="hf/trl: TrainingArguments(bf16=True)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sizes", default="1024,2048,4096", help="gemm: square matrix sizes")
    parser.add_argument("--repeats", type=int, default=3, help="gemm: timed repeats per size")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kind == "gemm":
        result = gemm_peak([int(s) for s in args.sizes.split(",")], args.repeats, DTYPES[args.dtype],
                           torch.device(args.device))
    elif args.kind == "eval":
        result = evaluate_run(args)
    else:
        result = train_with(args.kind, args)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
