"""Causal language modelling: tokenize, concatenate, cut into fixed blocks; metric perplexity."""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.data.sources import DataSplit
from peftlab.errors import UserError
from peftlab.losses import causal_lm_loss_sum, label_counts, loss_rows, shifted_label_count
from peftlab.tasks import register
from peftlab.tasks.base import Evaluation, ExampleValues, MetricSpec, RawData, Statistic, Task, task_fields
from peftlab.tasks.common import (
    check_positions,
    eval_batch_size,
    eval_mode,
    model_device,
    read_splits,
    require_columns,
    split_info,
)

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
    digest.update(repr((type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                        leading_bos(tokenizer))).encode())
    return digest.hexdigest()[:16]


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every encoding with it (Gemma, Llama): such a model expects it first in
    every sequence; None when it adds none (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_to_blocks(texts: list[str], tokenizer, block_size: int, batch: int = 1000) -> np.ndarray:
    """Tokenize each text (as the seed does, one call per line) and group into blocks. For a tokenizer that adds a
    BOS, every block starts with it and no line adds its own: the block is BOS + ``block_size - 1`` text tokens."""
    bos = leading_bos(tokenizer)
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        ids.extend(tokenizer(texts[start:start + batch], add_special_tokens=bos is None)["input_ids"])
    if bos is None:
        return group_texts(ids, block_size)
    blocks = group_texts(ids, block_size - 1)
    return np.concatenate([np.full((len(blocks), 1), bos, dtype=blocks.dtype), blocks], axis=1)


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
    tmp = path.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.tmp.npy")  # unique even across nodes
    np.save(tmp, blocks)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def perplexity_rows(model: nn.Module, batches, chunked: bool = False) -> tuple[list[float], list[int]]:
    """Summed NLL and predicted tokens of every sequence of the batches, in order."""
    nll: list[float] = []
    tokens: list[int] = []
    with eval_mode(model):
        for batch in batches:
            nll += loss_rows(model, batch, chunked=chunked).double().tolist()
            tokens += label_counts(batch["labels"])
    return nll, tokens


def perplexity_of(nll: list[float], tokens: list[int]) -> dict[str, float]:
    """exp(total NLL / total predicted tokens) over every sequence (not a mean of per-sequence perplexities)."""
    count = sum(tokens)
    if count == 0:
        raise UserError("evaluation split has no predicted tokens; give more evaluation data")
    mean = math.fsum(nll) / count
    return {"eval_loss": mean, "perplexity": math.exp(mean), "eval_tokens": count}


def perplexity(model: nn.Module, batches, chunked: bool = False) -> dict[str, float]:
    """The perplexity metrics of the batches (see :func:`perplexity_of`)."""
    return perplexity_of(*perplexity_rows(model, batches, chunked))


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of one prompt."""
    with eval_mode(model):
        enc = tokenizer(prompt, return_tensors="pt").to(model_device(model))
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@dataclass(frozen=True)
class ClmData:
    """Prepared causal-LM data: read-only token blocks per split (memory-mapped from the cache)."""

    raw: RawData
    tokenizer: Any
    device: torch.device
    train_blocks: np.ndarray
    eval_blocks: np.ndarray
    blocks_total: tuple[int, int]  # blocks in the whole train / eval split, before the subsets
    notes: tuple[str, ...]


@register
class CausalLMTask(Task):
    """WikiText-style causal LM: blocks of ``block_size`` tokens, labels = inputs (the model shifts them)."""

    name = "clm"
    order = 0
    fields = task_fields("ClmFields", "text_column", "block_size", "max_new_tokens", "sample_prompt",
                         training_only=("sample_prompt",))
    metrics = (MetricSpec("perplexity", "Perplexity", higher_is_better=False, fmt=".2f",
                          statistic=Statistic("exp_ratio", "blocks", ("nll", "tokens"))),)
    table_metrics = ()
    example_unit = "blocks"
    eval_fields = ("block_size", "text_column", "eval_subset", "chunked_ce")

    @classmethod
    def seq_len(cls, cfg) -> int:
        return cfg.block_size

    def load(self) -> RawData:
        splits, notes = read_splits(self.cfg)
        for split in (splits.train, splits.eval):
            if split.records:
                require_columns(split, {self.cfg.text_column: "Set --text-column"})
        return RawData(splits, notes)

    def prepare(self, raw: RawData, tokenizer, model: nn.Module) -> ClmData:
        cfg = self.cfg
        check_positions(model, cfg.block_size, f"block_size {cfg.block_size}",
                        "use --block-size {limit} or less")
        train_all = self._blocks(raw.splits.train, tokenizer)
        eval_all = self._blocks(raw.splits.eval, tokenizer)
        return ClmData(raw, tokenizer, model_device(model), train_all[:cfg.train_subset or None],
                       eval_all[:cfg.eval_subset or None], (len(train_all), len(eval_all)), raw.notes)

    def _blocks(self, split: DataSplit, tokenizer) -> np.ndarray:
        blocks = cached_blocks(split, tokenizer, self.cfg.block_size, self.cfg.text_column)
        if len(blocks) == 0:
            raise UserError(f"{split.source}: too short for a single block of {self.cfg.block_size} tokens; give "
                            "more text or a smaller --block-size")
        return blocks

    def num_train_examples(self, data: ClmData) -> int:
        return len(data.train_blocks)

    @staticmethod
    def _batch(data: ClmData, blocks: np.ndarray, indices) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(blocks[np.asarray(indices)])).to(data.device)
        return {"input_ids": ids, "labels": ids}

    def train_batch(self, data: ClmData, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._batch(data, data.train_blocks, indices)

    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        return shifted_label_count(batch["labels"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch, chunked=self.cfg.chunked_ce)

    def eval_batches(self, data: ClmData):
        size = eval_batch_size(self.cfg)
        n = len(data.eval_blocks)
        for start in range(0, n, size):
            yield self._batch(data, data.eval_blocks, range(start, min(start + size, n)))

    def evaluate(self, data: ClmData, model: nn.Module, stage: str) -> Evaluation:
        nll, tokens = perplexity_rows(model, self.eval_batches(data), chunked=self.cfg.chunked_ce)
        return Evaluation(stage, perplexity_of(nll, tokens),
                          examples=ExampleValues({"blocks": {"nll": tuple(nll), "tokens": tuple(tokens)}}))

    def sample(self, data: ClmData, model: nn.Module, result: Evaluation) -> dict[str, Any]:
        text = generate_text(model, data.tokenizer, self.cfg.sample_prompt, self.cfg.max_new_tokens)
        return {"prompt": self.cfg.sample_prompt, "generation": text}

    def info(self, data: ClmData) -> dict[str, Any]:
        splits = data.raw.splits
        return {
            "train": split_info(splits.train, "blocks", len(data.train_blocks), data.blocks_total[0]),
            "eval": split_info(splits.eval, "blocks", len(data.eval_blocks), data.blocks_total[1]),
            "block_size": self.cfg.block_size,
            "notes": list(data.notes),
        }
