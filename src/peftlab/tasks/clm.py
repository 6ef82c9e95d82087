"""Causal language modelling: tokenize, concatenate, cut into fixed blocks; metric perplexity."""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.data.sources import DataSplit, SplitPlan
from peftlab.errors import UserError
from peftlab.losses import causal_lm_loss_sum, shifted_label_count
from peftlab.tasks import Task, register

CACHE_FORMAT = "blocks-v1"


def group_texts(token_lists: list[list[int]], block_size: int) -> np.ndarray:
    """Concatenate token lists and cut them into ``block_size`` blocks, dropping the remainder.

    Linear time (one concatenation), unlike ``sum(lists, [])``. Returns an int64 array [n_blocks, block_size].
    """
    lengths = [len(t) for t in token_lists]
    total = sum(lengths)
    flat = np.fromiter((tok for toks in token_lists for tok in toks), dtype=np.int64, count=total)
    n_blocks = total // block_size
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes when the tokenizer's vocabulary, merges or special-token handling change."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
                  .encode())
    digest.update(repr((type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token)).encode())
    return digest.hexdigest()[:16]


def tokenize_to_blocks(texts: list[str], tokenizer, block_size: int, batch: int = 1000) -> np.ndarray:
    """Tokenize each text (as the seed does, one call per line) and group into blocks."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        ids.extend(tokenizer(texts[start:start + batch], add_special_tokens=True)["input_ids"])
    return group_texts(ids, block_size)


def cached_blocks(split: DataSplit, tokenizer, block_size: int, text_column: str) -> np.ndarray:
    """Token blocks for a split, cached on disk (memory-mapped) keyed by tokenizer, data and block size."""
    from peftlab.models import cache_dir

    key = hashlib.sha256(f"{CACHE_FORMAT}|{tokenizer_fingerprint(tokenizer)}|{split.fingerprint}|{split.source}|"
                         f"{text_column}|{block_size}".encode()).hexdigest()[:24]
    path = cache_dir() / "data" / f"{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    texts = [str(r[text_column]) for r in split.records if r.get(text_column) is not None]
    blocks = tokenize_to_blocks(texts, tokenizer, block_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, blocks)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


@torch.no_grad()
def perplexity(model: nn.Module, batches, chunked: bool = False) -> dict[str, float]:
    """exp(total NLL / total predicted tokens) over every batch (not a mean of per-batch perplexities)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in batches:
        nll += float(causal_lm_loss_sum(model, batch, chunked=chunked))
        count += shifted_label_count(batch["labels"])
    model.train(was_training)
    if count == 0:
        raise UserError("evaluation split has no predicted tokens; give more evaluation data")
    mean = nll / count
    return {"eval_loss": mean, "perplexity": math.exp(mean), "eval_tokens": count}


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of one prompt."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@register
class CausalLMTask(Task):
    """WikiText-style causal LM: blocks of ``block_size`` tokens, labels = inputs (the model shifts them)."""

    name = "clm"
    metric = "perplexity"
    higher_is_better = False

    def load(self) -> None:
        self.plan: SplitPlan = self.load_plan()
        for split in (self.plan.train, self.plan.eval):
            if split.records and self.cfg.text_column not in split.records[0]:
                have = ", ".join(map(str, split.records[0].keys()))
                raise UserError(f"{split.source}: no column {self.cfg.text_column!r}; the columns are {have}. "
                                "Set --text-column")

    def build(self, tokenizer, model: nn.Module) -> None:
        from peftlab.models import max_positions

        limit = max_positions(model)
        if limit is not None and self.cfg.block_size > limit:
            raise UserError(f"block_size {self.cfg.block_size} exceeds the model's maximum positions ({limit}); "
                            f"use --block-size {limit} or less")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.train_blocks = self._blocks(self.plan.train, self.cfg.train_subset)
        self.eval_blocks = self._blocks(self.plan.eval, self.cfg.eval_subset)

    def _blocks(self, split: DataSplit, subset: int | None) -> np.ndarray:
        blocks = cached_blocks(split, self.tokenizer, self.cfg.block_size, self.cfg.text_column)
        if len(blocks) == 0:
            raise UserError(f"{split.source}: too short for a single block of {self.cfg.block_size} tokens; give "
                            "more text or a smaller --block-size")
        self.full_sizes = getattr(self, "full_sizes", {})
        self.full_sizes[split.split] = len(blocks)
        return blocks[:subset] if subset else blocks

    def num_train_examples(self) -> int:
        return len(self.train_blocks)

    def _batch(self, blocks: np.ndarray, indices) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(blocks[np.asarray(indices)])).to(self.device)
        return {"input_ids": ids, "labels": ids}

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._batch(self.train_blocks, indices)

    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        return shifted_label_count(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch, chunked=self.cfg.chunked_ce)

    def eval_batches(self):
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        for start in range(0, len(self.eval_blocks), size):
            yield self._batch(self.eval_blocks, range(start, min(start + size, len(self.eval_blocks))))

    def evaluate(self, model: nn.Module, stage: str) -> dict[str, float]:
        return perplexity(model, self.eval_batches(), chunked=self.cfg.chunked_ce)

    def sample(self, model: nn.Module) -> dict[str, Any]:
        text = generate_text(model, self.tokenizer, self.cfg.sample_prompt, self.cfg.max_new_tokens)
        return {"prompt": self.cfg.sample_prompt, "generation": text}

    def info(self) -> dict[str, Any]:
        return {
            "train": {"source": self.plan.train.source, "split": self.plan.train.split,
                      "fingerprint": self.plan.train.fingerprint, "blocks_used": len(self.train_blocks),
                      "blocks_total": self.full_sizes.get(self.plan.train.split)},
            "eval": {"source": self.plan.eval.source, "split": self.plan.eval.split,
                     "fingerprint": self.plan.eval.fingerprint, "blocks_used": len(self.eval_blocks),
                     "blocks_total": self.full_sizes.get(self.plan.eval.split)},
            "block_size": self.cfg.block_size,
            "notes": self.notes,
        }

