"""Instruction following: Alpaca or chat records; loss on response tokens only; perplexity and generation metrics.

Headline metric: ROUGE-L of greedy generations against the references. It scores what the model actually writes
(including whether it stops), and unlike perplexity it is comparable across models with different tokenizers and
prompt templates. Response-token perplexity, BLEU and exact match are reported beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.sources import DataSplit, SplitPlan
from peftlab.errors import UserError
from peftlab.losses import (
    IGNORE_INDEX,
    chunked_linear_cross_entropy,
    output_head,
    shift_labels,
    shifted_label_count,
)
from peftlab.prompts import (
    Encoded,
    Example,
    PromptEncoder,
    alpaca_example,
    choose_template,
    left_pad,
    pack_rows,
    packed_batch,
    pad_batch,
)
from peftlab.tasks import Task, register
from peftlab.tasks.classification import row_name

ROLES = ("system", "user", "assistant")


def _field_text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(f"{key!r} is a {type(value).__name__}, not text")


def parse_alpaca(record: dict[str, Any], split: DataSplit, index: int) -> Example | None:
    """An Alpaca record: non-empty instruction, an output, optional input. None for an empty-string output.

    A record without an ``output`` (absent or null) is an error; an output that is present but blank (the
    public alpaca-libre train split has five) has nothing to learn and is skipped, and the run notes it.
    """
    where = f"{split.source}: {row_name(split, index)}"
    if record.get("output") is None:
        raise UserError(f"{where} is missing its 'output' (the response to learn); add it or remove the row")
    try:
        instruction, input_text, output = (_field_text(record, k) for k in ("instruction", "input", "output"))
    except ValueError as exc:
        raise UserError(f"{where}: {exc}; give a string") from None
    if not instruction.strip():
        raise UserError(f"{where} has an empty 'instruction'; fill it or remove the row")
    if not output.strip():
        return None
    return alpaca_example(instruction, input_text, output)


def parse_chat(record: dict[str, Any], split: DataSplit, index: int) -> Example:
    """A chat record: 'messages' with roles; the last message is the assistant's response to learn."""
    where = f"{split.source}: {row_name(split, index)}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                message.get("content"), str):
            raise UserError(f"{where}: message {number} must be an object with 'role' ({', '.join(ROLES)}) and "
                            "a string 'content'")
        if not message["content"].strip():
            raise UserError(f"{where}: message {number} ({message['role']}) has an empty 'content'")
        turns.append({"role": message["role"], "content": message["content"]})
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where} is missing its response: the last message must be from the assistant")
    if not any(t["role"] == "user" for t in turns[:-1]):
        raise UserError(f"{where}: no user message before the assistant's response")
    return Example(tuple(turns[:-1]), turns[-1]["content"])


def parse_split(split: DataSplit) -> tuple[list[Example], int]:
    """Examples of a split, Alpaca-style (instruction/input/output) or chat-style (messages); and how many
    records were skipped for a blank output."""
    have = list(split.records[0].keys()) if split.records else []
    if "messages" in have:
        return [parse_chat(r, split, i) for i, r in enumerate(split.records)], 0
    if "instruction" in have:
        if "output" not in have:
            raise UserError(f"{split.source}: no column 'output'; the columns are {', '.join(map(str, have))}. "
                            "Alpaca records need instruction, optional input, and output")
        parsed = [parse_alpaca(r, split, i) for i, r in enumerate(split.records)]
        examples = [e for e in parsed if e is not None]
        if not examples:
            raise UserError(f"{split.source}: every 'output' is blank; there is nothing to learn")
        return examples, len(parsed) - len(examples)
    raise UserError(f"{split.source}: no 'instruction' (Alpaca) or 'messages' (chat) column; the columns are "
                    f"{', '.join(map(str, have))}")


def response_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled (response) tokens; padded or packed batches.

    ``use_cache=False``: besides saving memory, transformers only reads restarting position ids as packed
    sequences (block-diagonal attention) when no cache is passed. ``chunked`` runs the LM head and the loss in
    token chunks, as the causal-LM task does (:func:`peftlab.losses.chunked_linear_cross_entropy`).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
              "position_ids": batch.get("position_ids"), "use_cache": False}
    labels = shift_labels(batch["labels"])
    head = output_head(model) if chunked else None
    if head is not None:
        out = model(**inputs, output_hidden_states=True,
                    logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["input_ids"].device))
        return chunked_linear_cross_entropy(out.hidden_states[-1], head.weight, labels)
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


@register
class InstructionTask(Task):
    """Supervised instruction tuning with response-only loss; ROUGE-L headline, perplexity, BLEU, exact match."""

    name = "instruction"
    metric = "rougeL"
    higher_is_better = True

    # --- raw data -------------------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        self.plan: SplitPlan = self.load_plan()
        examples = {}
        for role, split, subset in (("train", self.plan.train, cfg.train_subset),
                                    ("eval", self.plan.eval, cfg.eval_subset)):
            parsed, blank = parse_split(split)
            if blank:
                self.notes.append(f"{role}: skipped {blank} records of {split.source} whose 'output' is blank")
            examples[role] = parsed[: subset or None]
        self.train_examples, self.eval_examples = examples["train"], examples["eval"]

    # --- tokenized data -------------------------------------------------------------------------------------
    def build(self, tokenizer, model: nn.Module) -> None:
        from peftlab.models import max_positions

        cfg = self.cfg
        limit = max_positions(model)
        if limit is not None and cfg.max_length + cfg.max_new_tokens > limit:
            raise UserError(f"max_length {cfg.max_length} + max_new_tokens {cfg.max_new_tokens} exceeds the "
                            f"model's maximum positions ({limit}); lower --max-length or max_new_tokens")
        if cfg.packing and cfg.method == "prefix":
            raise UserError("packing does not work with prefix tuning (its prefix breaks the per-example masks); "
                            "use --set packing=false")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.template = choose_template(cfg.prompt_template, tokenizer)
        self.encoder = PromptEncoder(tokenizer, self.template, cfg.max_length)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.counts: dict[str, dict[str, int]] = {}
        self.train_enc = self._encode(self.train_examples, "train")
        self.eval_enc = self._encode(self.eval_examples, "eval")
        self.generation_enc = self.eval_enc[: cfg.generation_subset or None]
        self.rows = pack_rows([len(e.ids) for e in self.train_enc], cfg.max_length) if cfg.packing else None
        self.predictions: dict[str, list[str]] = {}

    def _encode(self, examples: list[Example], role: str) -> list[Encoded]:
        encoded = [self.encoder.encode(e) for e in examples]
        kept = [e for e in encoded if e is not None]
        dropped = len(encoded) - len(kept)
        truncated = sum(e.truncated for e in kept)
        self.counts[role] = {"examples": len(kept), "truncated_responses": truncated,
                             "dropped_prompt_too_long": dropped}
        if truncated:
            self.notes.append(f"{role}: {truncated} responses truncated to fit max_length {self.cfg.max_length}")
        if dropped:
            self.notes.append(f"{role}: {dropped} examples dropped: the prompt alone fills max_length "
                              f"{self.cfg.max_length}")
        if not kept:
            raise UserError(f"{role} split: every prompt is longer than max_length {self.cfg.max_length}; raise "
                            "--max-length")
        return kept

    def num_train_examples(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.train_enc)

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.rows is not None:
            return packed_batch([[self.train_enc[j] for j in self.rows[i]] for i in indices], self.pad_id,
                                self.device)
        return pad_batch([self.train_enc[i] for i in indices], self.pad_id, self.device)

    # --- loss -----------------------------------------------------------------------------------------------
    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        return shifted_label_count(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return response_loss_sum(model, batch, chunked=self.cfg.chunked_ce)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        if "token_mask" in batch:
            return int(batch["token_mask"].sum())
        return super().tokens_in(batch)

    # --- evaluation -----------------------------------------------------------------------------------------
    def _eval_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.batch_size

    @torch.no_grad()
    def response_perplexity(self, model: nn.Module) -> dict[str, float]:
        """exp(mean NLL over every response token of the evaluation examples), EOS included."""
        nll, count = 0.0, 0
        size = self._eval_size()
        for start in range(0, len(self.eval_enc), size):
            batch = pad_batch(self.eval_enc[start:start + size], self.pad_id, self.device)
            nll += float(response_loss_sum(model, batch, chunked=self.cfg.chunked_ce))
            count += shifted_label_count(batch["labels"])
        mean = nll / count
        return {"eval_loss": mean, "perplexity": math.exp(mean), "eval_tokens": count}

    @torch.no_grad()
    def generate(self, model: nn.Module, items: list[Encoded]) -> list[str]:
        """Greedy, batched (left-padded, longest prompts first) generations, in the order of ``items``."""
        gen_cfg = getattr(model, "generation_config", None)
        eos = {self.encoder.eos_id}
        extra = getattr(gen_cfg, "eos_token_id", None)
        eos.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        order = sorted(range(len(items)), key=lambda i: -items[i].prompt_len)
        out: list[str] = [""] * len(items)
        size = self._eval_size()
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            enc = left_pad([items[i].ids[:items[i].prompt_len] for i in chunk], self.pad_id, self.device)
            generated = model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                       num_beams=1, pad_token_id=self.pad_id, eos_token_id=sorted(eos))
            new = generated[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(chunk):
                out[i] = self.tokenizer.decode(new[j], skip_special_tokens=True).strip()
        return out

    def evaluate(self, model: nn.Module, stage: str) -> dict[str, float]:
        from peftlab.metrics import generation_metrics

        was_training = model.training
        model.eval()
        try:
            metrics = self.response_perplexity(model)
            generations = self.generate(model, self.generation_enc)
        finally:
            model.train(was_training)
        self.predictions[stage] = generations
        references = [e.reference for e in self.generation_enc]
        return {**generation_metrics(generations, references), **metrics,
                "generated_examples": len(generations), "max_new_tokens": self.cfg.max_new_tokens}

    def _latest(self) -> str | None:
        return next((s for s in ("after", "eval", "before") if s in getattr(self, "predictions", {})), None)

    def sample(self, model: nn.Module) -> dict[str, Any]:
        stage = self._latest()
        if stage is None:
            return {}
        first = self.generation_enc[0]
        return {"prompt": first.prompt, "reference": first.reference, "generation": self.predictions[stage][0]}

    def write_artifacts(self, run_dir, model: nn.Module) -> None:
        """predictions.jsonl: prompt, reference, generation (and the base model's, when evaluated before)."""
        stage = self._latest()
        if stage is None:
            return
        before = self.predictions.get("before") if stage != "before" else None
        with open(Path(run_dir) / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for i, e in enumerate(self.generation_enc):
                row = {"index": i, "prompt": e.prompt, "reference": e.reference,
                       "generation": self.predictions[stage][i]}
                if before is not None:
                    row["base_generation"] = before[i]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def info(self) -> dict[str, Any]:
        counts = getattr(self, "counts", {})
        return {
            "train": {"source": self.plan.train.source, "split": self.plan.train.split,
                      "fingerprint": self.plan.train.fingerprint,
                      "examples_used": counts.get("train", {}).get("examples", len(self.train_examples)),
                      "examples_total": len(self.plan.train.records)},
            "eval": {"source": self.plan.eval.source, "split": self.plan.eval.split,
                     "fingerprint": self.plan.eval.fingerprint,
                     "examples_used": counts.get("eval", {}).get("examples", len(self.eval_examples)),
                     "examples_total": len(self.plan.eval.records)},
            "prompt_template": getattr(self, "template", self.cfg.prompt_template),
            "packing": self.cfg.packing,
            "packed_rows": len(self.rows) if getattr(self, "rows", None) is not None else None,
            "max_length": self.cfg.max_length,
            "generation_examples": len(getattr(self, "generation_enc", [])),
            "max_new_tokens": self.cfg.max_new_tokens,
            "truncation": counts,
            "notes": self.notes,
        }
