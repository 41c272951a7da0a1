"""Turn one parsed row into what the tokenizer renders: a plain text, or a chat (turns plus tools).

alpaca and sharegpt rows become ordinary `messages`, so there is one path for masks and templates.
Keys of a turn beyond role and content (`reasoning_content`, `tool_calls`, `name`, `tool_call_id`,
...) are kept: the template decides what it renders. Every way a row can be wrong has a short reason
key; counts per key go into the summary and metrics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

from launcher.contract.config import DataFields
from trainer.data.errors import BadRow
from trainer.data.reasoning import REASONING_KEYS, alias_reasoning
from trainer.data.tool_calls import parse_tool_calls, parse_tools, sharegpt_function_call

__all__ = ["BadRow", "Chat", "Conversation", "FORMAT_FIELDS", "check_turn_order", "messages_from", "parse_json",
           "to_chat", "to_sample"]

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FUNCTION_CALL, OBSERVATION = "function_call", "observation"
"""sharegpt speakers that are not roles: an assistant turn of tool calls, and a tool result."""

Conversation = list[dict[str, Any]]

FORMAT_FIELDS = {"text": ("text",), "alpaca": ("instruction", "input", "output", "system"),
                 "messages": ("messages", "role", "content", "tools"),
                 "sharegpt": ("conversations", "speaker", "value", "tools", "function_call", "observation")}
"""The `data.fields` entries each format reads (the others do not change what it produces)."""


@dataclass(frozen=True)
class Chat:
    """A conversation and the tool definitions its template is given (None: the row has none)."""

    messages: Conversation
    tools: Optional[list[dict]] = None


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


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and p.get("type") == "text"
                                                           for p in value)


def _join_parts(value: list) -> str:
    return "".join(p.get("text") if isinstance(p.get("text"), str) else "" for p in value)


def _content(value: Any, where: str) -> str:
    """A turn's text; OpenAI-style lists of text parts are joined, anything else non-text is wrong_type."""
    return _text(_join_parts(value) if _is_text_parts(value) else value, where)


def _tool_result(value: Any, where: str) -> str:
    """A tool's output as text: it may be empty, and structured results are passed on as JSON."""
    if isinstance(value, str):
        return value
    if _is_text_parts(value):
        return _join_parts(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    raise BadRow("wrong_type", f"{where} should be a string, got {type(value).__name__}")


def check_turn_order(messages: Conversation) -> None:
    """System only first; a user turn before any assistant turn; no two users or assistants in a row;
    tool results only right after an assistant turn with tool calls (or after another result)."""
    previous = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            raise BadRow("system_not_first", f"turn {i} is a system message; only the first turn may be")
        if role == "assistant" and previous in (None, "system"):
            raise BadRow("assistant_before_user", f"turn {i} is an assistant message before any user message")
        answers_a_call = previous == "tool" or (previous == "assistant" and messages[i - 1].get("tool_calls"))
        if role == "tool" and not answers_a_call:
            raise BadRow("tool_without_call", f"turn {i} is a tool result that does not follow an assistant turn "
                                              "with tool_calls")
        if role == previous and role in ("user", "assistant"):
            raise BadRow(f"consecutive_{role}", f"turns {i - 1} and {i} are both {role} messages")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", "no assistant message to train on")


def _role(turn: Any, i: int, role_key: str, role_map: dict[str, str] | None) -> str:
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
    return role


def _message(turn: dict, i: int, role: str, role_key: str, content_key: str) -> dict:
    """One turn as the template gets it: role, content, and every other key of the turn that has a value."""
    where = f"turn {i} {content_key!r}"
    extras = {k: v for k, v in turn.items() if k not in (role_key, content_key) and v is not None}
    raw = turn.get(content_key)
    calls = parse_tool_calls(extras.pop("tool_calls", None), f"turn {i}") if role == "assistant" else None
    if raw is None and not calls:
        raise BadRow("missing_field", f"turn {i} has no {content_key!r}")
    if role == FUNCTION_CALL:
        content, calls = sharegpt_function_call(raw, where)
        role = "assistant"
    elif role in ("tool", OBSERVATION):
        content, role = _tool_result(raw, where), "tool"
    elif calls and (raw is None or (isinstance(raw, str) and not raw.strip())):
        content = ""  # a turn that only calls tools; templates expect a string here
    else:
        content = _content(raw, where)
    message = {"role": role, "content": content, **extras}
    if calls:
        message["tool_calls"] = calls
    for key in REASONING_KEYS:
        if key in message and not isinstance(message[key], str):
            raise BadRow("wrong_type", f"turn {i} {key!r} should be a string, got {type(message[key]).__name__}")
    return alias_reasoning(message)


def messages_from(turns: list, role_key: str, content_key: str, role_map: dict[str, str] | None) -> Conversation:
    """Validated turns with roles mapped onto system/user/assistant/tool (role_map: sharegpt speakers,
    case-insensitive, where function_call / observation become assistant tool calls / tool results)."""
    out = [_message(turn, i, _role(turn, i, role_key, role_map), role_key, content_key) for i, turn in enumerate(turns)]
    if not out:
        raise BadRow("empty_content", "the conversation has no turns")
    check_turn_order(out)
    return out


def sharegpt_roles(f: DataFields) -> dict[str, str]:
    return {**SHAREGPT_ROLES, f.function_call.lower(): FUNCTION_CALL, f.observation.lower(): OBSERVATION}


def to_chat(row: dict, fmt: str, f: DataFields) -> Union[str, Chat]:
    """A `text` row gives its string; every other format gives a validated chat."""
    if fmt == "text":
        return _text(_field(row, f.text, str), repr(f.text))
    if fmt == "alpaca":
        instruction = _text(_field(row, f.instruction, str), repr(f.instruction))
        extra = _field(row, f.input, str, optional=True)
        output = _text(_field(row, f.output, str), repr(f.output))
        system = _field(row, f.system, str, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = ([{"role": "system", "content": system}] if system and system.strip() else [])
        return Chat(turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
    if fmt == "messages":
        messages = messages_from(_field(row, f.messages, list), f.role, f.content, None)
    elif fmt == "sharegpt":
        messages = messages_from(_field(row, f.conversations, list), f.speaker, f.value, sharegpt_roles(f))
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return Chat(messages, parse_tools(row.get(f.tools), repr(f.tools)))


def to_sample(row: dict, fmt: str, f: DataFields) -> Union[str, Conversation]:
    """Like to_chat, with a chat given as its list of turns (what evaluation reads)."""
    sample = to_chat(row, fmt, f)
    return sample.messages if isinstance(sample, Chat) else sample
