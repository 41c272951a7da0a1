"""Turn one parsed row into what the tokenizer renders: a plain text or a list of chat turns.

alpaca and sharegpt rows become ordinary `messages`, so there is one path for masks and templates.
Every way a row can be wrong has a short reason key; counts per key go into the summary and metrics.
"""
from __future__ import annotations

import json
from typing import Any, Union

from launcher.contract.config import DataFields

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

Conversation = list[dict[str, str]]

FORMAT_FIELDS = {"text": ("text",), "alpaca": ("instruction", "input", "output", "system"),
                 "messages": ("messages", "role", "content"), "sharegpt": ("conversations", "speaker", "value")}
"""The `data.fields` entries each format reads (the others do not change what it produces)."""


class BadRow(Exception):
    """A row that cannot be trained on; `reason` is a short stable key, the message says more."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def parse_json(text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRow("invalid_json", f"{exc.msg} at column {exc.colno}") from None
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    return row


def _field(row: dict, key: str, kind: type, optional: bool = False) -> Any:
    if key not in row or row[key] is None:
        if optional:
            return None
        raise BadRow("missing_field", f"no {key!r} field (row keys: {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if not isinstance(value, kind):
        raise BadRow("wrong_type", f"{key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{where} should be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_content", f"{where} is empty")
    return value


def check_turn_order(messages: Conversation) -> None:
    """System only first; a user turn before any assistant turn; no two users or assistants in a row."""
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            raise BadRow("system_not_first", f"turn {i} is a system message; only the first turn may be")
        if role == "assistant" and previous in (None, "system"):
            raise BadRow("assistant_before_user", f"turn {i} is an assistant message before any user message")
        if role == previous and role in ("user", "assistant"):
            raise BadRow(f"consecutive_{role}", f"turns {i - 1} and {i} are both {role} messages")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", "no assistant message to train on")


def _content(value: Any, where: str) -> str:
    """A turn's text; OpenAI-style lists of text parts are joined, anything else non-text is wrong_type."""
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(p.get("text") if isinstance(p.get("text"), str) else "" for p in value)
    return _text(value, where)


def messages_from(turns: list, role_key: str, content_key: str, role_map: dict[str, str] | None) -> Conversation:
    """Validated turns with roles mapped onto system/user/assistant (role_map: sharegpt speakers, case-insensitive)."""
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"turn {i} should be an object, got {type(turn).__name__}")
        if turn.get(role_key) is None:
            raise BadRow("missing_field", f"turn {i} has no {role_key!r}")
        raw_role = turn[role_key]
        if not isinstance(raw_role, str):
            raise BadRow("wrong_type", f"turn {i} {role_key!r} should be a string, got {type(raw_role).__name__}")
        role = role_map.get(raw_role.lower()) if role_map else (raw_role if raw_role in ROLES else None)
        if role is None:
            allowed = sorted(role_map) if role_map else list(ROLES)
            raise BadRow("unknown_role", f"turn {i} has role {raw_role!r}; allowed: {', '.join(allowed)}")
        if turn.get(content_key) is None:
            raise BadRow("missing_field", f"turn {i} has no {content_key!r}")
        out.append({"role": role, "content": _content(turn[content_key], f"turn {i} {content_key!r}")})
    if not out:
        raise BadRow("empty_content", "the conversation has no turns")
    check_turn_order(out)
    return out


def to_sample(row: dict, fmt: str, f: DataFields) -> Union[str, Conversation]:
    """A `text` row gives its string; every other format gives a validated conversation."""
    if fmt == "text":
        return _text(_field(row, f.text, str), repr(f.text))
    if fmt == "alpaca":
        instruction = _text(_field(row, f.instruction, str), repr(f.instruction))
        extra = _field(row, f.input, str, optional=True)
        output = _text(_field(row, f.output, str), repr(f.output))
        system = _field(row, f.system, str, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = ([{"role": "system", "content": system}] if system and system.strip() else [])
        return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "messages":
        return messages_from(_field(row, f.messages, list), f.role, f.content, None)
    if fmt == "sharegpt":
        return messages_from(_field(row, f.conversations, list), f.speaker, f.value, SHAREGPT_ROLES)
    raise ValueError(f"unknown data format {fmt!r}")
