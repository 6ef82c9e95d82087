"""Instruction prompts: Alpaca or chat-template rendering, assistant-only labels, truncation, padding and packing.

An example is a conversation before the last response plus that response. It is rendered to text and cut into
pieces that alternate between masked text (system, user and tool turns, the template's markup) and learned text
(an assistant turn). Each piece is tokenized on its own, so the tokens before the last response are exactly the
prompt that generation is given. A learned piece is the assistant's content plus the template's end-of-turn token
(``<|im_end|>``, ``<end_of_turn>``); the Alpaca template has none, so its last response ends with EOS. Either way
the model learns to answer and to stop.

Which assistant turns are learned: every one (``learn="all"``, the default, as TRL's ``assistant_only_loss``,
axolotl and torchtune do) or only the last (``learn="last"``). With a chat template the pieces come from the
template itself: each assistant turn starts where the rendering of the conversation before it, with the
generation prompt, ends, and stops where the rendering through it ends (as TRL finds assistant spans). Each
learned piece is checked to be exactly the turn's content followed by one end-of-turn token.
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


#: Learn every assistant turn of a conversation, or only its last (the response generation metrics score).
CHAT_LOSS = ("all", "last")


@dataclass(frozen=True)
class Encoded:
    """A tokenized conversation. ``ids[:prompt_len]`` is the prompt of the last response (what generation is
    given); ``spans`` are the ``[start, stop)`` token ranges that carry loss (the learned assistant turns)."""

    ids: list[int]
    prompt_len: int
    prompt: str
    reference: str
    truncated: bool = False
    spans: tuple[tuple[int, int], ...] | None = None  # None: everything after the prompt

    @property
    def learned_spans(self) -> tuple[tuple[int, int], ...]:
        return self.spans if self.spans is not None else ((self.prompt_len, len(self.ids)),)

    @property
    def prompt_fits(self) -> bool:
        """The whole prompt of the last response is kept (generation and its metrics need it)."""
        return self.prompt_len < len(self.ids)

    @property
    def labels(self) -> list[int]:
        labels = [IGNORE_INDEX] * len(self.ids)
        for start, stop in self.learned_spans:
            labels[start:stop] = self.ids[start:stop]
        return labels


@dataclass(frozen=True)
class Piece:
    """A stretch of a rendered conversation: masked markup and turns, or an assistant turn to learn."""

    text: str
    learned: bool
    turn: int = 0  # the message number (1-based) of an assistant piece


class PromptEncoder:
    """Renders and tokenizes conversations with one template for one tokenizer."""

    def __init__(self, tokenizer, template: str, max_length: int) -> None:
        if tokenizer.eos_token_id is None:
            raise UserError("the model's tokenizer has no EOS token; instruction tuning needs one to learn to stop")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.eos_id = int(tokenizer.eos_token_id)
        self.end_of_turn_id = self._end_of_turn_id() if template == "chat" else None

    @property
    def stop_ids(self) -> list[int]:
        """The tokens that end a generated answer: EOS and the chat template's end-of-turn token."""
        return sorted({self.eos_id, *([self.end_of_turn_id] if self.end_of_turn_id is not None else [])})

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises TemplateError (and raise_exception's own) for what it refuses
            raise UserError(f"prompt_template: the model's chat template refuses this conversation "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); fix the roles' "
                            "order or use --set prompt_template=alpaca") from None

    def _end_of_turn_id(self) -> int | None:
        """The single token the chat template writes right after an assistant's content, if it writes one."""
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        try:
            prompt, full = self._render(probe[:1], True), self._render(probe)
        except UserError:
            return None
        marker = full[len(prompt):].rstrip().removeprefix("a") if full.startswith(prompt) else ""
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        return int(ids[0]) if len(ids) == 1 else None

    def pieces(self, example: Example) -> list[Piece]:
        """The conversation as alternating masked and assistant pieces (every assistant turn marked learned)."""
        if self.template == "alpaca":
            return self._alpaca_pieces(example)
        conversation = [*example.messages, {"role": "assistant", "content": example.response}]
        full = self._render(conversation)
        out: list[Piece] = []
        done = 0
        for k, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            start = len(self._prefix_of(full, self._render(conversation[:k], generation_prompt=True)))
            stop = len(self._prefix_of(full, self._render(conversation[:k + 1])).rstrip())
            out += [Piece(full[done:start], False), Piece(full[start:stop], True, k + 1)]
            self._check_turn(full[start:stop], message["content"], k + 1)
            done = stop
        return out

    @staticmethod
    def _prefix_of(full: str, part: str) -> str:
        if not full.startswith(part):
            raise UserError("prompt_template: the model's chat template does not render the conversation before an "
                            "assistant turn as a prefix of the whole conversation, so the turn cannot be masked; "
                            "use --set prompt_template=alpaca")
        return part

    def _check_turn(self, text: str, content: str, turn: int) -> None:
        """An assistant piece must be the turn's content (as written, or trimmed as some templates do) followed by
        the template's end-of-turn token, so that exactly the answer and its stop carry loss."""
        for written in (content, content.strip()):
            rest = text.removeprefix(written) if text.startswith(written) else None
            if rest is None:
                continue
            ids = self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
            if ids == ([self.end_of_turn_id] if self.end_of_turn_id is not None else []):
                return
        raise UserError(f"prompt_template: the model's chat template writes message {turn} (assistant) as "
                        f"{text[:60]!r}, not as its content followed by one end-of-turn token, so the turn cannot be "
                        "learned exactly; use --set prompt_template=alpaca")

    @staticmethod
    def _alpaca_pieces(example: Example) -> list[Piece]:
        """The Alpaca rendering (:func:`render_alpaca`) cut at each assistant turn."""
        if example.instruction is not None:
            return [Piece(render_alpaca(example), False), Piece(example.response, True, 2)]
        out: list[Piece] = []
        masked = ""
        for number, message in enumerate([*example.messages, {"role": "assistant", "content": example.response}],
                                         start=1):
            if message["role"] == "assistant":
                out += [Piece(masked + "### Response:\n", False), Piece(message["content"], True, number)]
                masked = "\n\n"
            elif message["role"] == "system":
                masked += f"{message['content']}\n\n"
            else:
                masked += f"### Instruction:\n{message['content']}\n\n"
        return out

    def _tokens(self, text: str, first: bool) -> list[int]:
        """Token ids of one piece (special tokens added only at the start of an Alpaca prompt; a chat template
        writes its own)."""
        return self.tokenizer(text, add_special_tokens=first and self.template == "alpaca")["input_ids"]

    def encode(self, example: Example, learn: str = "all") -> Encoded | None:
        """Tokenize one conversation, cut to ``max_length``; None when no learned token fits (for ``learn="last"``:
        when the last prompt fills ``max_length``)."""
        pieces = self.pieces(example)
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        prompt_len = 0
        for index, piece in enumerate(pieces):
            tokens = self._tokens(piece.text, index == 0)
            last = index == len(pieces) - 1
            if last:
                prompt_len = len(ids)
                if not tokens or tokens[-1] not in self.stop_ids:
                    tokens = [*tokens, self.eos_id]  # where the template writes no end-of-turn token
            if piece.learned and (learn == "all" or last):
                spans.append((len(ids), len(ids) + len(tokens)))
            ids += tokens
        limit = self.max_length
        kept = tuple((start, min(stop, limit)) for start, stop in spans if start < limit)
        if not kept:
            return None
        return Encoded(ids[:limit], prompt_len, "".join(p.text for p in pieces[:-1]), example.response,
                       truncated=any(stop > limit for _, stop in spans), spans=kept)


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
