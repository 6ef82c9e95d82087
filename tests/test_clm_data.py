"""Causal-LM data: grouping into blocks (linear time), perplexity against a hand computation, the cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from peftlab.tasks.clm import group_texts, perplexity


def test_group_texts_seed_example():
    # The seed's recipe: concatenate all token lists, cut into block_size blocks, drop the remainder.
    tokens = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    blocks = group_texts(tokens, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert blocks.dtype == np.int64


def test_group_texts_matches_quadratic_reference():
    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 1000, size=rng.integers(0, 40)).tolist() for _ in range(200)]
    reference = sum(lists, [])  # the seed's quadratic concatenation, as ground truth
    n = len(reference) // 16 * 16
    expected = [reference[i:i + 16] for i in range(0, n, 16)]
    assert group_texts(lists, 16).tolist() == expected


def test_group_texts_too_short_gives_no_blocks():
    assert group_texts([[1, 2], [3]], block_size=8).shape == (0, 8)


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same at every position."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.row = torch.tensor(logits)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, t, -1).clone())


def test_perplexity_is_exp_of_token_weighted_mean_nll():
    logits = [0.0, math.log(3.0)]  # p(0) = 1/4, p(1) = 3/4
    model = FixedLogits(logits)
    # Two batches of different sizes: the token-weighted mean differs from the mean of batch perplexities.
    b1 = torch.tensor([[0, 1, 1, 1]])  # predicted tokens: 1, 1, 1
    b2 = torch.tensor([[1, 0, 0], [0, 0, 1]])  # predicted: 0, 0, 0, 1
    batches = [{"input_ids": b1, "labels": b1}, {"input_ids": b2, "labels": b2}]
    nll_1, nll_0 = -math.log(0.75), -math.log(0.25)
    total = 3 * nll_1 + (3 * nll_0 + nll_1)
    out = perplexity(model, batches)
    assert out["eval_tokens"] == 7
    assert math.isclose(out["eval_loss"], total / 7, rel_tol=1e-6)
    assert math.isclose(out["perplexity"], math.exp(total / 7), rel_tol=1e-6)
    per_batch_mean = (math.exp(nll_1) + math.exp((3 * nll_0 + nll_1) / 4)) / 2
    assert not math.isclose(out["perplexity"], per_batch_mean, rel_tol=1e-3)


def test_ignored_labels_do_not_count():
    model = FixedLogits([0.0, 0.0])
    ids = torch.tensor([[0, 1, 1, 0]])
    labels = torch.tensor([[0, -100, 1, -100]])
    out = perplexity(model, [{"input_ids": ids, "labels": labels}])
    assert out["eval_tokens"] == 1
    assert math.isclose(out["perplexity"], 2.0, rel_tol=1e-6)


def test_a_tokenizer_that_adds_bos_starts_every_block_with_it():
    """Gemma expects <bos> first (WikiText perplexity ~300 without it, ~38 with): each block is BOS + block - 1
    text tokens, and no line adds a BOS of its own mid-block. SmolLM2's adds none: its blocks are unchanged."""
    from transformers import AutoTokenizer

    from peftlab.models import gemma3_tokenizer_dir, smollm2_tokenizer_dir
    from peftlab.tasks.clm import leading_bos, tokenize_to_blocks

    gemma = AutoTokenizer.from_pretrained(gemma3_tokenizer_dir())
    lines = ["The first line of text.", "", "A second, longer line of the same text follows here."] * 8
    blocks = tokenize_to_blocks(lines, gemma, 16)
    assert leading_bos(gemma) == gemma.bos_token_id
    assert (blocks[:, 0] == gemma.bos_token_id).all() and not (blocks[:, 1:] == gemma.bos_token_id).any()
    text_ids = [i for line in lines for i in gemma(line, add_special_tokens=False)["input_ids"]]
    assert blocks[:, 1:].reshape(-1).tolist() == text_ids[:blocks.shape[0] * 15]
    smollm2 = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    assert leading_bos(smollm2) is None
    assert tokenize_to_blocks(lines, smollm2, 16).tolist() == group_texts(
        [smollm2(line)["input_ids"] for line in lines], 16).tolist()
