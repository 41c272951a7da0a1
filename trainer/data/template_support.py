"""What a chat template renders beyond roles and content: tool definitions, tool calls, tool results, reasoning.

A template that ignores one of them renders the row without it, and training would silently drop what
the data holds (a tool call trained as an empty turn, say). So each is probed once, by rendering a small
conversation that carries sentinel values and checking that they come out; a row that needs what the
template leaves out is a bad row that says so.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from trainer.data.errors import BadRow
from trainer.data.reasoning import alias_reasoning, has_reasoning_field

ChatRender = Callable[[list, bool, Optional[list]], str]
"""(messages, add_generation_prompt, tools) -> the template's text."""

_TOOL, _CALL, _RESULT, _THOUGHT = "ZqProbeToolDef", "ZqProbeCallName", "ZqProbeResult", "ZqProbeThought"


@dataclass(frozen=True)
class Support:
    tools: bool
    tool_calls: bool
    tool_results: bool
    reasoning: bool


def _renders(render: ChatRender, messages: list, tools: Optional[list], mark: str) -> bool:
    try:
        return mark in render(messages, False, tools)
    except Exception:  # noqa: BLE001 - a template that raises on it does not support it either
        return False


def probe(render: ChatRender) -> Support:
    question = {"role": "user", "content": "probe question"}
    call = {"type": "function", "function": {"name": _CALL, "arguments": {"x": 1}}, "id": "call_0"}
    with_call = [question, {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": _RESULT, "name": _CALL, "tool_call_id": "call_0"},
                 {"role": "assistant", "content": "probe answer"}]
    tool = {"type": "function", "function": {"name": _TOOL, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    plain = [question, {"role": "assistant", "content": "probe answer"}]
    reasoned = alias_reasoning({"role": "assistant", "content": "probe answer", "reasoning_content": _THOUGHT})
    thought = [question, reasoned]
    return Support(tools=_renders(render, plain, [tool], _TOOL), tool_calls=_renders(render, with_call, None, _CALL),
                   tool_results=_renders(render, with_call, None, _RESULT),
                   reasoning=_renders(render, thought, None, _THOUGHT))


def check_support(messages: list, tools: Optional[list], support: Support) -> None:
    """Raise a BadRow when the row holds something the template does not render."""
    advice = "set data.chat_template to a template that renders them"
    if tools and not support.tools:
        raise BadRow("template_ignores_tools", f"the row has {len(tools)} tool definition(s) but the chat template "
                                               f"does not render `tools`; {advice}")
    for i, m in enumerate(messages):
        if m.get("tool_calls") and not support.tool_calls:
            raise BadRow("template_ignores_tool_calls", f"turn {i} calls tools but the chat template does not render "
                                                        f"`tool_calls`; {advice}")
        if m["role"] == "tool" and not support.tool_results:
            raise BadRow("template_ignores_tool_results", f"turn {i} is a tool result but the chat template does not "
                                                          f"render `tool` messages; {advice}")
        if m["role"] == "assistant" and has_reasoning_field(m) and not support.reasoning:
            raise BadRow("template_ignores_reasoning", f"turn {i} has reasoning_content but the chat template does not "
                                                       "render it; use a template that does, or put the reasoning "
                                                       "inline as <think>…</think> at the start of the content")
