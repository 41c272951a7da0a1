"""Where each trained assistant turn lies in a rendering, exactly, for any chat template.

Three ways, each derived from the template itself (no role strings are searched for):

- prefix-stable: the conversation up to an assistant turn (with the generation prompt) and through
  it are both prefixes of the whole rendering, so what lies between is exactly that turn. One sample
  per conversation, and it holds for most templates.
- per_turn: each turn is a sample of its own, the conversation up to it rendered with the generation
  prompt and then the turn: what the model sees and is asked to produce at inference. Exact for
  templates that render a turn differently once later turns follow (Qwen3 drops the reasoning of
  earlier turns and gives the last one an empty think block), at the cost of repeating the context.
- whole: one rendering, each turn located in it. The turn's last payload (its answer, or its last
  tool call's name) is replaced by a sentinel, and that rendering must equal the real one everywhere
  else; the turn starts where its generation prompt ends and ends with what the template closes a
  turn with.

Reasoning is located the same way (a sentinel in place of the reasoning text), so that
data.train_on_reasoning=false can cut it out of a trained span.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from trainer.data.errors import BadRow
from trainer.data.reasoning import REASONING_KEYS, answer_start, has_reasoning_field, inline_reasoning

Span = tuple[int, int]
Conversation = list[dict]
RenderFn = Callable[[Conversation, bool], str]
"""(messages, add_generation_prompt) -> the template's text."""

SENTINEL = "Zq7xSentinel"


class Renders:
    """One conversation's renderings; each prefix is rendered at most once (per_turn reuses the prefix checks)."""

    def __init__(self, render: RenderFn, messages: Conversation):
        self.render, self.messages = render, messages
        self._cache: dict[tuple[int, bool], str] = {}

    def prefix(self, n: int, generation_prompt: bool = False) -> str:
        key = (n, generation_prompt)
        if key not in self._cache:
            self._cache[key] = self.render(self.messages[:n], generation_prompt)
        return self._cache[key]

    @property
    def full(self) -> str:
        return self.prefix(len(self.messages))

    def turn_name(self, i: int) -> str:
        k = sum(m["role"] == "assistant" for m in self.messages[:i + 1])
        return f"assistant turn {k} (message {i})"


def assistant_turns(messages: Conversation, last_only: bool) -> list[int]:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return turns[-1:] if last_only else turns


def sentinel_for(*texts: str) -> str:
    """A marker that occurs in none of the texts (so each occurrence in a rendering is ours)."""
    k = 0
    while any(f"{SENTINEL}{k}" in t for t in texts):
        k += 1
    return f"{SENTINEL}{k}"


def locate(variant: str, base: str, mark: str) -> Optional[Span]:
    """Where `base` holds what `variant` holds as `mark`, i.e. variant == base[:a] + mark + base[b:].

    None when the template left the marked value out; LookupError when the mark appears more than once
    or the rest of the rendering changed with it (then no place in `base` is exactly that value).
    """
    count = variant.count(mark)
    if count == 0:
        return None
    a = variant.find(mark)
    rest = variant[a + len(mark):]
    b = len(base) - len(rest)
    if count > 1 or b < a or not base.startswith(variant[:a]) or not base.endswith(rest):
        raise LookupError(mark)
    return a, b


def _replace(messages: Conversation, i: int, **changes) -> Conversation:
    out = list(messages)
    out[i] = {**messages[i], **changes}
    return out


def with_anchor(messages: Conversation, i: int, mark: str) -> tuple[Conversation, str]:
    """Turn i with its last payload replaced by mark (the last tool call's name, else the answer); and what it was."""
    m = messages[i]
    if m.get("tool_calls"):
        calls = list(m["tool_calls"])
        calls[-1] = {**calls[-1], "function": {**calls[-1]["function"], "name": mark}}
        return _replace(messages, i, tool_calls=calls), "last tool call"
    content = m["content"]
    return _replace(messages, i, content=content[:answer_start(content)] + mark), "answer"


def reasoning_variants(messages: Conversation, i: int, mark: str) -> list[Conversation]:
    """Turn i with its reasoning replaced by mark: one variant per place the row holds reasoning."""
    m, out = messages[i], []
    if has_reasoning_field(m):
        out.append(_replace(messages, i, **{k: mark for k in REASONING_KEYS if k in m}))
    inline = inline_reasoning(m["content"]) if m.get("content") else None
    if inline:
        out.append(_replace(messages, i, content=m["content"][:inline[0]] + mark + m["content"][inline[1]:]))
    return out


def not_located(r: Renders, i: int, why: str) -> BadRow:
    return BadRow("turn_not_located", f"{r.turn_name(i)} cannot be located exactly in the chat template's rendering: "
                                      f"{why}")


def prefix_stable_spans(r: Renders, turns: list[int]) -> Optional[list[Span]]:
    """Each turn between its generation prompt and its end, if both are prefixes of the whole; else None."""
    full, spans = r.full, []
    for i in turns:
        before, through = r.prefix(i, True), r.prefix(i + 1)
        if not (full.startswith(before) and full.startswith(through) and len(through.rstrip()) > len(before)):
            return None
        # The turn ends with its end-of-turn token; whitespace after it is layout, not something to learn.
        spans.append((len(before), len(through.rstrip())))
    return spans


def per_turn_samples(r: Renders, turns: list[int]) -> list[tuple[str, Span]]:
    """(text, span) per turn: the conversation through the turn, trained from the end of its generation prompt."""
    out = []
    for i in turns:
        before, through = r.prefix(i, True), r.prefix(i + 1)
        if not (through.startswith(before) and len(through.rstrip()) > len(before)):
            raise not_located(r, i, "rendered as the last message it does not continue the generation prompt "
                                    "(the template prompts for an answer differently from how it renders one)")
        out.append((through, (len(before), len(through.rstrip()))))
    return out


def whole_spans(r: Renders, turns: list[int]) -> list[Span]:
    """Each turn located in the single rendering of the whole conversation."""
    full = r.full
    mark = sentinel_for(full)
    spans, low = [], 0
    for i in turns:
        variant, what = with_anchor(r.messages, i, mark)
        try:
            anchor = locate(r.render(variant, False), full, mark)
        except LookupError:
            raise not_located(r, i, f"with its {what} replaced, the rest of the rendering changes too") from None
        if anchor is None:
            raise not_located(r, i, f"the template leaves its {what} out of the whole conversation")
        start = _turn_start(r, i, full, low, anchor[0])
        end = _turn_end(r, i, full, anchor[1], mark)
        spans.append((start, end))
        low = end
    return spans


def _turn_start(r: Renders, i: int, full: str, low: int, anchor: int) -> int:
    """Where turn i's output begins: after its generation prompt, found where the template puts it."""
    before = r.prefix(i, True)
    if full.startswith(before) and low <= len(before) <= anchor:
        return len(before)
    # Earlier turns render differently in the whole conversation: find this turn's header (the generation
    # prompt's own text) nearest before its payload instead.
    plain = r.prefix(i)
    header = before[len(plain):] if before.startswith(plain) else ""
    at = full.rfind(header, low, anchor) if header.strip() else -1
    if at < 0:
        raise not_located(r, i, "the text before it differs from the conversation up to it, and the generation "
                                "prompt does not mark where it starts")
    return at + len(header)


def _turn_end(r: Renders, i: int, full: str, anchor_end: int, mark: str) -> int:
    """Where turn i ends: after what the template renders after its payload when the turn ends a conversation."""
    variant, _ = with_anchor(r.messages[:i + 1], i, mark)
    last = r.render(variant, False)
    if last.count(mark) != 1:
        raise not_located(r, i, "its payload does not render exactly once as the last message")
    closing = last[last.find(mark) + len(mark):].rstrip()
    if not full.startswith(closing, anchor_end):
        raise not_located(r, i, f"it closes with {closing!r} as the last message, differently inside the conversation")
    return anchor_end + len(closing)


def reasoning_spans(r: Renders, n: int, i: int, text: str) -> list[Span]:
    """Where turn i's reasoning lies in `text`, the rendering of the first n messages ([] where it is left out)."""
    mark = sentinel_for(text)
    found = []
    for variant in reasoning_variants(r.messages[:n], i, mark):
        try:
            at = locate(r.render(variant, False), text, mark)
        except LookupError:
            raise not_located(r, i, "its reasoning renders twice or changes the rest of the rendering") from None
        if at is not None:
            found.append(at)
    return found


def without(spans: list[Span], holes: list[Span]) -> list[Span]:
    """The parts of the spans outside every hole (holes: reasoning that carries no loss)."""
    out = []
    for start, end in spans:
        pieces = [(start, end)]
        for h0, h1 in holes:
            pieces = [p for a, b in pieces for p in ((a, min(b, h0)), (max(a, h1), b)) if p[0] < p[1]]
        out.extend(pieces)
    return sorted(out)
