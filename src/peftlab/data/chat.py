"""Chat layouts of a data file: ``messages`` ({role, content}) and ShareGPT ``conversations`` ({from, value}).

ShareGPT (FastChat's layout, and that of most community chat sets used with LLaMA-Factory and axolotl) names its
roles ``human``, ``gpt``, ``system`` and, where tools are used, ``tool``; they are read as ``user``,
``assistant``, ``system`` and ``tool``. Both layouts come out as the same list of ``{role, content}`` messages, so a
ShareGPT record trains exactly as the same conversation written as ``messages``.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import UserError

#: The column of each chat layout.
LAYOUT_COLUMNS = {"messages": "messages", "sharegpt": "conversations"}
CHAT_FORMATS = ("auto", *LAYOUT_COLUMNS)
#: ShareGPT role names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}


def chat_layout(columns: list[str], chat_format: str) -> str | None:
    """The chat layout to read a split with: the one asked for, or (``auto``) the one whose column is present;
    None when ``auto`` finds no chat column."""
    if chat_format != "auto":
        return chat_format
    return next((layout for layout, column in LAYOUT_COLUMNS.items() if column in columns), None)


def sharegpt_messages(record: dict[str, Any], where: str) -> list[Any]:
    """A ShareGPT record's turns as ``{role, content}`` messages; a one-line error naming the row and turn for an
    unknown role or a missing value."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: turn {number} of 'conversations' is a {type(turn).__name__}, not a "
                            "{from, value} object")
        role = SHAREGPT_ROLES.get(turn.get("from"))  # type: ignore[arg-type]
        if role is None:
            raise UserError(f"{where}: turn {number} has role {turn.get('from')!r}; ShareGPT roles are "
                            f"{', '.join(SHAREGPT_ROLES)} (fix the row, or use --set chat_format=messages for a "
                            "'messages' column)")
        if not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: turn {number} ({turn.get('from')}) has no string 'value'; add the text or "
                            "remove the turn")
        messages.append({"role": role, "content": turn["value"]})
    return messages
