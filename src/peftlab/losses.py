"""Loss functions shared by tasks. Every loss returns a *sum* over its counted items, in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted_label_count(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a causal LM batch: label positions 1..T that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] at position t, IGNORE_INDEX at the last position.

    Shifting the labels instead of slicing the logits avoids a copy of the [batch, seq, vocab] logits and, in the
    backward pass, a zero-filled tensor of that size.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy: position t predicts labels[t + 1].

    ``chunked`` runs the LM head and the loss together in token chunks (see :func:`chunked_linear_cross_entropy`)
    when the model's head allows it; the result is the same within float rounding.
    """
    head = output_head(model) if chunked else None
    if head is not None:
        return causal_lm_loss_sum_chunked(model, batch, head)
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    labels = shift_labels(batch["labels"])
    logits = out.logits[:, -labels.size(1):]  # without the virtual tokens of prompt-learning methods
    if logits.dtype != torch.float32:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def loss_rows(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy per sequence of the batch ([batch], float32), for evaluation only: what is
    reported per block or response. Padded, packed (``position_ids``) and prompt-learning batches as the losses."""
    labels = shift_labels(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"]
    head = output_head(model) if chunked else None
    if head is not None:
        out = model(**inputs, output_hidden_states=True,
                    logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["input_ids"].device))
        hidden = out.hidden_states[-1][:, -labels.size(1):]
        return torch.stack([chunked_linear_cross_entropy(hidden[i:i + 1], head.weight, labels[i:i + 1]).float()
                            for i in range(labels.size(0))])
    logits = model(**inputs).logits[:, -labels.size(1):].float()
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="none")
    return per_token.view(labels.shape).sum(dim=1)


def step_counts(task, micro: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(items the loss sums over, real tokens) of one optimizer step's micro-batches, as ``task`` counts them.

    The counts are taken from host copies of the batches' integer tensors, made in one transfer before the step's
    first forward pass: asking the task for each count on accelerator tensors would synchronise the host with the
    device twice per micro-batch.
    """
    on_device = any(t.device.type != "cpu" for b in micro for t in b.values())
    host = [{k: (t.to("cpu", non_blocking=True) if not t.is_floating_point() else t) for k, t in b.items()}
            for b in micro] if on_device else micro
    if on_device and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return sum(task.loss_count(b) for b in host), sum(task.tokens_in(b) for b in host)


def label_counts(labels: torch.Tensor) -> list[int]:
    """Tokens that carry loss per sequence (as :func:`shifted_label_count`, row by row)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused [rows, vocab] buffer for one chunk's logits.

    Allocating ~100 MB afresh for every micro-batch makes the allocator map and zero new pages each time (on CPU,
    glibc serves blocks over 32 MB with mmap): about 25k page faults per micro-batch. One buffer per shape is kept
    instead; the buffer is scratch space, never part of the autograd graph.
    """
    key = (rows, vocab, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None:
        if len(_WORKSPACE) >= 2:  # a full chunk and a batch's last, shorter one; drop the older of two
            del _WORKSPACE[next(iter(_WORKSPACE))]
        buf = _WORKSPACE[key] = torch.empty(rows, vocab, dtype=dtype, device=device)
    return buf


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ weight.T, labels), computed in token chunks without keeping the logits.

    The forward pass computes each chunk's logits, its loss, and at once its gradient with respect to the hidden
    states (and the weight, if trained); the backward pass only scales them. Peak memory holds one chunk of logits
    instead of all of them, and the [tokens, vocab] log-softmax is never stored.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        need_weight_grad = weight.requires_grad
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The matmuls run in compute_dtype (bf16 under bf16 autocast: the head is a large share of a small model's
        # FLOPs); the softmax, the loss and the accumulated gradients stay fp32.
        weight_c = weight.to(compute_dtype)
        for start in range(0, hidden.size(0), chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            y = labels[start:start + chunk]
            valid = y != IGNORE_INDEX  # a chunk without labels adds zeros: skipping it would cost a host sync
            safe_y = torch.where(valid, y, torch.zeros_like(y))
            logits = _logits_buffer(h.size(0), weight.size(0), compute_dtype, h.device)
            torch.mm(h, weight_c.T, out=logits)
            logits = logits.float()
            target = logits.gather(1, safe_y[:, None]).squeeze(1)
            # softmax in place: one [chunk, vocab] buffer, no separate log-softmax or exp tensors
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(dim=1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1)
            total += ((lse - target) * valid).sum()
            # d loss / d logits = softmax - onehot, on valid rows only
            keep = valid[:, None].to(probs.dtype)
            probs.mul_(keep / row_sum)
            probs.scatter_add_(1, safe_y[:, None], -keep)
            grad_logits = probs.to(compute_dtype)
            grad_hidden[start:start + chunk] = grad_logits @ weight_c
            if need_weight_grad:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if need_weight_grad else torch.empty(0))
        ctx.need_weight_grad = need_weight_grad
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gw = (grad_weight * grad_out).to(grad_hidden.dtype) if ctx.need_weight_grad else None
        return grad_hidden * grad_out.to(grad_hidden.dtype), gw, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels`` (IGNORE_INDEX skipped), in chunks."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        flat, flat_labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
        return sum((F.cross_entropy((flat[i:i + chunk] @ weight.T).float(), flat_labels[i:i + chunk],
                                    ignore_index=IGNORE_INDEX, reduction="sum")
                    for i in range(0, flat.size(0), chunk)), torch.zeros((), device=hidden.device))
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    with torch.autocast(device_type, enabled=False):  # forward casts explicitly to compute_dtype
        return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1),
                                                chunk, compute_dtype)


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's plain linear LM head, when the chunked loss can replace it (else None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "_orig_mod", base)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None  # absent, adapted (e.g. LoRA on lm_head) or with a bias
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # Gemma-2 soft-capping, Cohere scaling: the head is not a plain matmul
    return head


def causal_lm_loss_sum_chunked(model: nn.Module, batch: dict[str, torch.Tensor], head: nn.Linear,
                               chunk: int = 1024) -> torch.Tensor:
    """As :func:`causal_lm_loss_sum`, but the LM head and the loss run in chunks (no full logits)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["input_ids"].device),
                output_hidden_states=True, use_cache=False)
    labels = shift_labels(batch["labels"])
    # prompt-learning methods (prompt tuning, P-tuning) prepend virtual tokens: the real tokens are the last ones
    hidden = out.hidden_states[-1][:, -labels.size(1):]
    return chunked_linear_cross_entropy(hidden, head.weight, labels, chunk)
