"""The chunked linear cross-entropy equals the plain one, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab.configure import load_config
from peftlab.losses import (
    IGNORE_INDEX,
    causal_lm_loss_sum,
    causal_lm_loss_sum_chunked,
    chunked_linear_cross_entropy,
    output_head,
    shift_labels,
)
from peftlab.methods import get_method
from peftlab.models import load_model


def test_shift_labels_pads_the_last_position():
    labels = torch.tensor([[5, 6, 7], [1, IGNORE_INDEX, 3]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX, 3, IGNORE_INDEX]]


def test_chunked_cross_entropy_matches_plain_with_weight_grad():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[[3, 10, 11]] = IGNORE_INDEX
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    g_h, g_w = torch.autograd.grad(plain * 0.5, (hidden, weight))
    fused = chunked_linear_cross_entropy(hidden, weight, labels, chunk=8)
    f_h, f_w = torch.autograd.grad(fused * 0.5, (hidden, weight))
    torch.testing.assert_close(fused, plain.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_h, g_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_w, g_w, rtol=1e-5, atol=1e-6)


def test_reused_logits_buffer_leaves_earlier_losses_intact():
    """Two losses built before either backward pass (as with several micro-batches) share the scratch buffer."""
    torch.manual_seed(1)
    weight = torch.randn(30, 8)
    inputs = [torch.randn(12, 8, requires_grad=True) for _ in range(2)]
    labels = [torch.randint(0, 30, (12,)) for _ in range(2)]
    losses = [chunked_linear_cross_entropy(h, weight, y, chunk=5) for h, y in zip(inputs, labels, strict=True)]
    for h, y, loss in zip(inputs, labels, losses, strict=True):
        (got,) = torch.autograd.grad(loss, h)
        plain = F.cross_entropy(h @ weight.T, y, reduction="sum")
        (want,) = torch.autograd.grad(plain, h)
        torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_model_loss_matches_plain_for_lora():
    cfg = load_config(None, {"model": "tiny-llama", "dropout": 0.0})
    model = get_method("lora").apply(load_model(cfg).model, cfg, "causal_lm")
    head = output_head(model)
    assert head is not None
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    grads = []
    for fn in (lambda: causal_lm_loss_sum(model, batch), lambda: causal_lm_loss_sum_chunked(model, batch, head, 7)):
        model.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_are_left_out_of_the_loss(method):
    """Prompt-learning methods prepend virtual tokens: both loss paths score only the real tokens, and agree."""
    from transformers import AutoModelForCausalLM

    from peftlab.configure import load_config
    from peftlab.methods import get_method
    from peftlab.models import tiny_model_dir

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny-llama"))
    model = get_method(method).apply(base, load_config(None, {"model": "tiny-llama", "method": method}),
                                     "causal_lm", [])
    ids = torch.randint(0, 100, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    chunked, plain = causal_lm_loss_sum(model, batch, chunked=True), causal_lm_loss_sum(model, batch, chunked=False)
    torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=1e-3)
