"""Instruction prompts: Alpaca or chat-template rendering, response-only labels, truncation, padding and packing.

An example is a conversation before the response plus the response. It is rendered to a prompt string (what the
model sees at generation time) and tokenized as ``prompt_ids + response_ids + [EOS]``; only the response ids and the
EOS carry loss, so the model learns to answer and to stop. The prompt is tokenized on its own, exactly as it is at
generation time, so training and generation see the same prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab.errors import UserError
from peftlab.losses import IGNORE_INDEX

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class Example:
    """One instruction example: the turns before the response, and the response.

    Alpaca records keep their ``instruction`` and ``input`` so that the Alpaca template renders them exactly.
    """

    messages: tuple[dict[str, str], ...]
    response: str
    instruction: str | None = None
    input: str | None = None


def alpaca_example(instruction: str, input_text: str, output: str) -> Example:
    """An Alpaca record (instruction, optional input, output) as an Example."""
    user = instruction + (f"\n\n{input_text}" if input_text else "")
    return Example(({"role": "user", "content": user},), output, instruction, input_text)


def render_alpaca(example: Example) -> str:
    """The Alpaca prompt (Taori et al. 2023) ending in '### Response:\\n'. Chat records render turn by turn."""
    if example.instruction is not None:
        if example.input:
            return ALPACA_PROMPT.format(instruction=example.instruction, input=example.input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=example.instruction)
    parts = []
    for message in example.messages:
        if message["role"] == "system":
            parts.append(f"{message['content']}\n\n")
        elif message["role"] == "assistant":
            parts.append(f"### Response:\n{message['content']}\n\n")
        else:
            parts.append(f"### Instruction:\n{message['content']}\n\n")
    return "".join(parts) + "### Response:\n"


def choose_template(requested: str, tokenizer) -> str:
    """'chat' or 'alpaca': auto picks the model's chat template when it has one."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_chat:
        raise UserError("prompt_template: 'chat' was asked for but the model's tokenizer has no chat template; "
                        "use --set prompt_template=alpaca")
    if requested == "auto":
        return "chat" if has_chat else "alpaca"
    return requested


@dataclass(frozen=True)
class Encoded:
    """A tokenized example: ``ids = prompt + response (+ EOS)``; the first ``prompt_len`` ids carry no loss."""

    ids: list[int]
    prompt_len: int
    prompt: str
    reference: str
    truncated: bool = False

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_len + self.ids[self.prompt_len:]


class PromptEncoder:
    """Renders and tokenizes examples with one template for one tokenizer."""

    def __init__(self, tokenizer, template: str, max_length: int) -> None:
        if tokenizer.eos_token_id is None:
            raise UserError("the model's tokenizer has no EOS token; instruction tuning needs one to learn to stop")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.eos_id = int(tokenizer.eos_token_id)

    def prompt_text(self, example: Example) -> str:
        """What the model is given at generation time."""
        if self.template == "alpaca":
            return render_alpaca(example)
        return self.tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True)

    def response_text(self, example: Example, prompt: str) -> str:
        """The response as the template writes it (with the chat template's end-of-turn marker, if any)."""
        if self.template == "alpaca":
            return example.response
        full = self.tokenizer.apply_chat_template(
            [*example.messages, {"role": "assistant", "content": example.response}], tokenize=False)
        if not full.startswith(prompt):
            raise UserError("prompt_template: the model's chat template does not render the prompt as a prefix of "
                            "the full conversation, so the response cannot be masked; use --set "
                            "prompt_template=alpaca")
        return full[len(prompt):].rstrip()

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt (special tokens added only for Alpaca; a chat template writes its own)."""
        return self.tokenizer(prompt, add_special_tokens=self.template == "alpaca")["input_ids"]

    def encode(self, example: Example) -> Encoded | None:
        """Tokenize one example, truncating the response to fit ``max_length``; None if the prompt fills it."""
        prompt = self.prompt_text(example)
        p_ids = self.prompt_ids(prompt)
        r_ids = self.tokenizer(self.response_text(example, prompt), add_special_tokens=False)["input_ids"]
        if not r_ids or r_ids[-1] != self.eos_id:
            r_ids = [*r_ids, self.eos_id]
        room = self.max_length - len(p_ids)
        if room < 1:
            return None
        return Encoded(p_ids + r_ids[:room], len(p_ids), prompt, example.response, truncated=len(r_ids) > room)


def pad_batch(items: list[Encoded], pad_id: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-padded training/scoring batch; padding has attention 0 and label IGNORE_INDEX."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        mask[row, :len(e.ids)] = 1
        labels[row, :len(e.ids)] = torch.tensor(e.labels)
    return {k: v.to(device) if device is not None else v
            for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation (every prompt ends at the last column)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return {"input_ids": ids.to(device) if device is not None else ids,
            "attention_mask": mask.to(device) if device is not None else mask}


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group whole examples, in order, into rows of at most ``max_length`` tokens (next-fit; none is split)."""
    rows: list[list[int]] = []
    used = max_length + 1
    for index, length in enumerate(lengths):
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def packed_batch(rows: list[list[Encoded]], pad_id: int, device: torch.device | None = None) -> dict[str, Any]:
    """A batch of packed rows with per-example position ids and no attention mask.

    transformers reads restarting position ids (with no 2-D mask) as packed sequences and builds a block-diagonal
    causal mask, so one example never attends to another. Tail padding forms its own block, carries no loss, and is
    excluded from ``token_mask`` (the real tokens counted for tokens/s).
    """
    width = max(sum(len(e.ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        col = 0
        for e in row:
            n = len(e.ids)
            ids[r, col:col + n] = torch.tensor(e.ids)
            labels[r, col:col + n] = torch.tensor(e.labels)
            positions[r, col:col + n] = torch.arange(n)
            real[r, col:col + n] = True
            col += n
        positions[r, col:] = torch.arange(width - col)
    out = {"input_ids": ids, "labels": labels, "position_ids": positions, "token_mask": real}
    return {k: v.to(device) if device is not None else v for k, v in out.items()}
