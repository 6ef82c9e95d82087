"""Workers of the instruction benchmark, each run by bench_instruction.py in a fresh process: HF Trainer or TRL
SFTTrainer training on peftlab's encoded examples, or the response eval loss of a saved peftlab run. Each writes
one JSON file (--out).

    python benchmarks/_instruction_contenders.py hf --model-source DIR --train T.json --eval E.json --out r.json
    python benchmarks/_instruction_contenders.py trl-packed (same arguments)
    python benchmarks/_instruction_contenders.py trl-padding-free (same arguments)
    python benchmarks/_instruction_contenders.py eval --run-dir RUN --model-source DIR --eval E.json --out r.json

The examples (T.json, E.json) are peftlab's own encoding: per example ``input_ids`` and ``labels`` (prompt tokens
-100), written once by bench_instruction.py, so every contender trains on identical token ids and label masks.

- hf: HF Trainer + peft, ``DataCollatorForSeq2Seq`` padding each micro-batch to its longest example.
- trl-packed: TRL SFTTrainer, ``packing=True`` (best-fit decreasing into rows of ``--max-length``; TRL then trains
  padding-free: each micro-batch flattened to one row with restarting position ids), labels taken as given.
- trl-padding-free: TRL SFTTrainer, ``padding_free=True`` without packing (each micro-batch of examples flattened).

The response eval loss (total NLL over response tokens / response tokens, the first evaluation examples) is
computed here for every contender in float32, from the model's full logits, not by any trainer's loss code.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import write_json
from _contenders import TokenCounter, lora_config, memory_report, optimizer_info, reset_memory, step_clock

IGNORE = -100


def read_examples(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@torch.no_grad()
def response_eval(model: torch.nn.Module, data: dict[str, Any], batch_size: int, device: torch.device) -> dict:
    """Total next-token NLL over response (labelled) tokens / their count, right-padded batches, float32."""
    model = model.float()
    was_training = model.training
    model.eval()
    examples, pad = data["examples"], data["pad_id"]
    nll, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e["labels"])
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :].float()
        target = labels[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                                     reduction="sum"))
        count += int((target != IGNORE).sum())
    model.train(was_training)
    return {"eval_loss": nll / count, "eval_tokens": count, "eval_examples": len(examples)}


def train_with(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train with HF Trainer + peft ('hf') or TRL SFTTrainer ('trl-packed', 'trl-padding-free') and measure it."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    device = torch.device(args.device)
    train, held = read_examples(args.train), read_examples(args.eval)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_source, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bf16 = args.precision == "bf16"
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"bench-{kind}-"), per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, num_train_epochs=1,
                  max_steps=args.steps or -1, seed=args.seed, save_strategy="no", report_to="none", bf16=bf16,
                  use_cpu=device.type == "cpu", logging_steps=1)
    ids = [e["input_ids"] for e in train["examples"]]
    labels = [e["labels"] for e in train["examples"]]
    if kind == "hf":
        from transformers import DataCollatorForSeq2Seq, Trainer

        model = get_peft_model(model, lora_config(args))
        dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                     "labels": labels})
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=collator)
    else:
        from trl import SFTConfig, SFTTrainer

        packed = kind == "trl-packed"
        dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
        # Packing: rows of max_length (best-fit decreasing); labels as given (completion_only_loss off: the -100
        # prompt labels are already there). Padding-free without packing: max_length must be None (the examples are
        # already truncated by peftlab's encoding).
        config = SFTConfig(**common, gradient_checkpointing=False, packing=packed, padding_free=not packed,
                           max_length=args.max_length if packed else None, completion_only_loss=False,
                           dataset_num_proc=None)
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
    rows = len(trainer.train_dataset)
    result = response_eval(trainer.model, held, args.eval_batch_size, device)
    import transformers
    import trl

    return {"contender": kind, "step_end_s": clock.ends, "tokens_cum": clock.tokens, "load_time_s": load_time,
            "memory": memory, "heldout": result, "trainable_params": trainable,
            "torch_threads": torch.get_num_threads(), "train_rows": rows,
            "tokens_with_padding": counter.padded, "real_tokens": counter.tokens, "label_tokens": counter.labels,
            "versions": {"transformers": transformers.__version__, "trl": trl.__version__, "torch": torch.__version__},
            "optimizer": optimizer_info(trainer.optimizer), "train_loss_mean": output.training_loss,
            "train_examples": len(ids), "precision": args.precision}


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """Response eval loss of a finished peftlab LoRA run: fp32 base + its adapter, loaded with peft (not peftlab)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    base = AutoModelForCausalLM.from_pretrained(args.model_source, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, Path(args.run_dir) / "adapter")
    return {"heldout": response_eval(model, read_examples(args.eval), args.eval_batch_size, device)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["hf", "trl-packed", "trl-padding-free", "eval"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model-source", required=True)
    parser.add_argument("--train")
    parser.add_argument("--eval", required=True)
    parser.add_argument("--run-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer-step cap (default: one epoch)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = evaluate_run(args) if args.kind == "eval" else train_with(args.kind, args)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
