"""Instruction following: Alpaca or chat records; loss on response tokens only; perplexity and generation metrics.

Headline metric: ROUGE-L of greedy generations against the references. It scores what the model actually writes
(including whether it stops), and unlike perplexity it is comparable across models with different tokenizers and
prompt templates. Response-token perplexity, BLEU and exact match are reported beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.chat import LAYOUT_COLUMNS, chat_layout, sharegpt_messages
from peftlab.data.sources import DataSplit
from peftlab.errors import UserError
from peftlab.losses import (
    IGNORE_INDEX,
    chunked_linear_cross_entropy,
    label_counts,
    loss_rows,
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
from peftlab.tasks import register
from peftlab.tasks.base import Evaluation, ExampleValues, MetricSpec, RawData, Statistic, Task, task_fields
from peftlab.tasks.common import (
    check_positions,
    columns_of,
    eval_batch_size,
    eval_mode,
    model_device,
    progress,
    read_splits,
    require_columns,
    split_info,
)

ROLES = ("system", "user", "assistant", "tool")


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
    where = f"{split.source}: {split.row_name(index)}"
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


def parse_chat(messages: Any, split: DataSplit, index: int) -> Example:
    """A chat record's messages (every assistant turn a response; the last message the response that generation
    metrics score)."""
    where = f"{split.source}: {split.row_name(index)}"
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


def parse_split(split: DataSplit, chat_format: str = "auto") -> tuple[list[Example], int]:
    """Examples of a split: chat (``messages``, or ShareGPT ``conversations``: ``chat_format`` picks, ``auto`` by
    the column present) or Alpaca (instruction/input/output); and how many records were skipped for a blank
    output."""
    have = columns_of(split)
    layout = chat_layout(have, chat_format)
    if layout is not None:
        column = LAYOUT_COLUMNS[layout]
        require_columns(split, {column: f"chat_format={layout} reads the {column!r} column (or use --set "
                                        "chat_format=auto)"})
        if layout == "sharegpt":
            return [parse_chat(sharegpt_messages(r, f"{split.source}: {split.row_name(i)}"), split, i)
                    for i, r in enumerate(split.records)], 0
        return [parse_chat(r.get("messages"), split, i) for i, r in enumerate(split.records)], 0
    if "instruction" in have:
        require_columns(split, {"output": "Alpaca records need instruction, optional input, and output"})
        parsed = [parse_alpaca(r, split, i) for i, r in enumerate(split.records)]
        examples = [e for e in parsed if e is not None]
        if not examples:
            raise UserError(f"{split.source}: every 'output' is blank; there is nothing to learn")
        return examples, len(parsed) - len(examples)
    raise UserError(f"{split.source}: no 'instruction' (Alpaca), 'messages' (chat) or 'conversations' (ShareGPT) "
                    f"column; the columns are {', '.join(have)}")


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


@dataclass(frozen=True)
class InstructionRaw(RawData):
    """Parsed instruction examples of both splits (subsets applied)."""

    train_examples: tuple[Example, ...]
    eval_examples: tuple[Example, ...]


@dataclass(frozen=True)
class EncodeCounts:
    """What tokenizing one split kept, truncated and dropped."""

    examples: int
    truncated_responses: int
    dropped_prompt_too_long: int


@dataclass(frozen=True)
class InstructionData:
    """Prepared instruction data: encoded examples, the packed rows (if packing), and the prompt encoder."""

    raw: InstructionRaw
    tokenizer: Any
    device: torch.device
    template: str
    encoder: PromptEncoder
    pad_id: int
    train_enc: tuple[Encoded, ...]
    eval_enc: tuple[Encoded, ...]
    generation_enc: tuple[Encoded, ...]
    rows: tuple[tuple[int, ...], ...] | None  # packed rows of train_enc indices, None without packing
    counts: tuple[tuple[str, EncodeCounts], ...]  # role -> counts
    notes: tuple[str, ...]


@register
class InstructionTask(Task):
    """Supervised instruction tuning with response-only loss; ROUGE-L headline, perplexity, BLEU, exact match."""

    name = "instruction"
    order = 2
    fields = task_fields("InstructionFields", "max_length", "prompt_template", "packing", "max_new_tokens",
                         "generation_subset", "generation_batch_size", "chat_loss", "chat_format",
                         training_only=("packing", "chat_loss"), needs={"packing": "packing"})
    metrics = (MetricSpec("rougeL", "ROUGE-L", higher_is_better=True, generated=True,
                          statistic=Statistic("mean", "generations", ("rougeL",))),
               MetricSpec("bleu", "BLEU", higher_is_better=True, fmt=".2f", generated=True),  # corpus-level
               MetricSpec("exact_match", "Exact match", higher_is_better=True, generated=True,
                          statistic=Statistic("mean", "generations", ("exact_match",))),
               MetricSpec("perplexity", "Perplexity", higher_is_better=False, fmt=".2f",
                          statistic=Statistic("exp_ratio", "responses", ("nll", "tokens"))))
    table_metrics = ("bleu", "exact_match", "perplexity")
    example_unit = "examples"
    eval_fields = ("max_length", "prompt_template", "chat_format", "eval_subset", "generation_subset",
                   "max_new_tokens", "generation_batch_size", "chunked_ce")
    eval_pads = True  # batched greedy generation is left-padded

    # --- raw data -------------------------------------------------------------------------------------------
    def load(self) -> InstructionRaw:
        cfg = self.cfg
        splits, notes = read_splits(cfg)
        notes = list(notes)
        examples = {}
        for role, split, subset in (("train", splits.train, cfg.train_subset),
                                    ("eval", splits.eval, cfg.eval_subset)):
            parsed, blank = parse_split(split, cfg.chat_format)
            if blank:
                notes.append(f"{role}: skipped {blank} records of {split.source} whose 'output' is blank")
            examples[role] = tuple(parsed[: subset or None])
        return InstructionRaw(splits, tuple(notes), examples["train"], examples["eval"])

    # --- tokenized data -------------------------------------------------------------------------------------
    def prepare(self, raw: InstructionRaw, tokenizer, model: nn.Module) -> InstructionData:
        cfg = self.cfg
        check_positions(model, cfg.max_length + cfg.max_new_tokens,
                        f"max_length {cfg.max_length} + max_new_tokens {cfg.max_new_tokens}",
                        "lower --max-length or max_new_tokens")
        template = choose_template(cfg.prompt_template, tokenizer)
        encoder = PromptEncoder(tokenizer, template, cfg.max_length)
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        notes = list(raw.notes)
        # Training learns the assistant turns chat_loss names; evaluation scores every assistant turn (so runs with
        # either chat_loss compare on one measure) and needs the whole last prompt, which generation answers.
        train_enc, train_counts = self._encode(encoder, raw.train_examples, "train", notes, cfg.chat_loss)
        eval_enc, eval_counts = self._encode(encoder, raw.eval_examples, "eval", notes, "all", whole_prompt=True)
        rows = (tuple(tuple(r) for r in pack_rows([len(e.ids) for e in train_enc], cfg.max_length))
                if cfg.packing else None)
        return InstructionData(raw, tokenizer, model_device(model), template, encoder, pad_id, train_enc, eval_enc,
                               eval_enc[: cfg.generation_subset or None], rows,
                               (("train", train_counts), ("eval", eval_counts)), tuple(notes))

    def _encode(self, encoder: PromptEncoder, examples: tuple[Example, ...], role: str, notes: list[str],
                learn: str, whole_prompt: bool = False) -> tuple[tuple[Encoded, ...], EncodeCounts]:
        """Encoded examples of one split and their counts; appends the notes on truncated and dropped ones."""
        encoded = [encoder.encode(e, learn) for e in examples]
        kept = tuple(e for e in encoded if e is not None and (e.prompt_fits or not whole_prompt))
        dropped = len(encoded) - len(kept)
        truncated = sum(e.truncated for e in kept)
        if truncated:
            notes.append(f"{role}: {truncated} responses truncated to fit max_length {self.cfg.max_length}")
        if dropped:
            notes.append(f"{role}: {dropped} examples dropped: the prompt alone fills max_length "
                         f"{self.cfg.max_length}")
        if not kept:
            raise UserError(f"{role} split: every prompt is longer than max_length {self.cfg.max_length}; raise "
                            "--max-length")
        return kept, EncodeCounts(len(kept), truncated, dropped)

    def num_train_examples(self, data: InstructionData) -> int:
        return len(data.rows) if data.rows is not None else len(data.train_enc)

    def train_batch(self, data: InstructionData, indices: list[int]) -> dict[str, torch.Tensor]:
        if data.rows is not None:
            return packed_batch([[data.train_enc[j] for j in data.rows[i]] for i in indices], data.pad_id,
                                data.device)
        return pad_batch([data.train_enc[i] for i in indices], data.pad_id, data.device)

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
    def response_nll(self, data: InstructionData, model: nn.Module) -> tuple[list[float], list[int]]:
        """Summed NLL and token count of every evaluation conversation's assistant turns (end-of-turn or EOS
        included), in order."""
        nll: list[float] = []
        tokens: list[int] = []
        size = eval_batch_size(self.cfg)
        with eval_mode(model):
            for start in range(0, len(data.eval_enc), size):
                batch = pad_batch(list(data.eval_enc[start:start + size]), data.pad_id, data.device)
                nll += loss_rows(model, batch, chunked=self.cfg.chunked_ce).double().tolist()
                tokens += label_counts(batch["labels"])
        return nll, tokens

    def generate(self, data: InstructionData, model: nn.Module, items, desc: str = "generate") -> list[str]:
        """Greedy, batched (left-padded, longest prompts first) generations, in the order of ``items``."""
        gen_cfg = getattr(model, "generation_config", None)
        eos = set(data.encoder.stop_ids)
        extra = getattr(gen_cfg, "eos_token_id", None)
        eos.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        order = sorted(range(len(items)), key=lambda i: -items[i].prompt_len)
        out: list[str] = [""] * len(items)
        size = self.cfg.generation_batch_size or eval_batch_size(self.cfg)
        with eval_mode(model), progress(len(items), desc, "example") as bar:
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                enc = left_pad([items[i].ids[:items[i].prompt_len] for i in chunk], data.pad_id, data.device)
                generated = model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                           num_beams=1, pad_token_id=data.pad_id, eos_token_id=sorted(eos))
                new = generated[:, enc["input_ids"].shape[1]:]
                for j, i in enumerate(chunk):
                    out[i] = data.tokenizer.decode(new[j], skip_special_tokens=True).strip()
                bar.update(len(chunk))
        return out

    def evaluate(self, data: InstructionData, model: nn.Module, stage: str) -> Evaluation:
        from peftlab.metrics import corpus_bleu, exact_matches, rouge_l_scores

        nll, tokens = self.response_nll(data, model)
        mean = math.fsum(nll) / sum(tokens)
        generations = self.generate(data, model, data.generation_enc, f"generate ({stage})")
        references = [e.reference for e in data.generation_enc]
        rouge, exact = rouge_l_scores(generations, references), exact_matches(generations, references)
        metrics = {"bleu": corpus_bleu(generations, references), "rougeL": sum(rouge) / len(rouge),
                   "exact_match": sum(exact) / len(exact), "eval_loss": mean, "perplexity": math.exp(mean),
                   "eval_tokens": sum(tokens), "generated_examples": len(generations),
                   "max_new_tokens": self.cfg.max_new_tokens}
        examples = ExampleValues({"responses": {"nll": tuple(nll), "tokens": tuple(tokens)},
                                  "generations": {"rougeL": tuple(rouge),
                                                  "exact_match": tuple(float(e) for e in exact)}})
        return Evaluation(stage, metrics, tuple(generations), examples)

    def sample(self, data: InstructionData, model: nn.Module, result: Evaluation) -> dict[str, Any]:
        first = data.generation_enc[0]
        return {"prompt": first.prompt, "reference": first.reference, "generation": result.outputs[0]}

    def write_artifacts(self, data: InstructionData, run_dir, result: Evaluation,
                        before: Evaluation | None = None) -> None:
        """predictions.jsonl: prompt, reference, generation (and the base model's, when evaluated before)."""
        with open(Path(run_dir) / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for i, e in enumerate(data.generation_enc):
                row = {"index": i, "prompt": e.prompt, "reference": e.reference, "generation": result.outputs[i]}
                if before is not None:
                    row["base_generation"] = before.outputs[i]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def info(self, data: InstructionData) -> dict[str, Any]:
        splits, counts = data.raw.splits, dict(data.counts)
        return {
            "train": split_info(splits.train, "examples", counts["train"].examples, len(splits.train.records)),
            "eval": split_info(splits.eval, "examples", counts["eval"].examples, len(splits.eval.records)),
            "prompt_template": data.template,
            "packing": self.cfg.packing,
            "chat_loss": self.cfg.chat_loss,
            "learned_turns": {"train": sum(len(e.learned_spans) for e in data.train_enc),
                              "eval": sum(len(e.learned_spans) for e in data.eval_enc)},
            "packed_rows": len(data.rows) if data.rows is not None else None,
            "max_length": self.cfg.max_length,
            "generation_examples": len(data.generation_enc),
            "max_new_tokens": self.cfg.max_new_tokens,
            "truncation": {role: asdict(c) for role, c in data.counts},
            "notes": list(data.notes),
        }
