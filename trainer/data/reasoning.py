"""Reasoning traces: where a turn's chain of thought is, under every name datasets and templates use.

Datasets carry reasoning next to the answer (`reasoning_content`, or the older `reasoning` /
`thinking`) or inline at the start of the content (`<think>…</think>`). transformers copies the first
of those keys into both `reasoning_content` and `thinking` before it renders; doing the same when a
row is parsed keeps our direct rendering identical to its public path and lets a template read the
name it was written for.
"""
from __future__ import annotations

from typing import Optional

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def alias_reasoning(message: dict) -> dict:
    """The message with its reasoning under `reasoning_content` and `thinking`, as transformers passes it."""
    reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def has_reasoning_field(message: dict) -> bool:
    """Reasoning next to the content; an empty one (mixed datasets carry "" for turns without) is none."""
    return any(isinstance(message.get(k), str) and message[k].strip() for k in REASONING_KEYS)


def inline_reasoning(content: str) -> Optional[tuple[int, int]]:
    """Characters of the reasoning text inside an inline `<think>…</think>` block, surrounding whitespace excluded.

    Templates strip that whitespace or add their own, so the text itself is what is located and masked.
    A missing opening tag counts from the start (reasoning models' outputs often begin inside the block).
    """
    close = content.find(THINK_CLOSE)
    if close < 0:
        return None
    opening = content.rfind(THINK_OPEN, 0, close)
    start = opening + len(THINK_OPEN) if opening >= 0 else 0
    inner = content[start:close]
    if not inner.strip():
        return None
    return start + len(inner) - len(inner.lstrip()), close - (len(inner) - len(inner.rstrip()))


def answer_start(content: str) -> int:
    """Where the answer begins: after the last `</think>` and the whitespace that follows it (0 without one)."""
    close = content.rfind(THINK_CLOSE)
    if close < 0:
        return 0
    end = close + len(THINK_CLOSE)
    return end + len(content[end:]) - len(content[end:].lstrip())
