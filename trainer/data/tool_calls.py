"""Tool definitions and tool calls, brought to the one shape Hugging Face chat templates expect.

Templates read tools as JSON schemas `{"type": "function", "function": {"name", "description",
"parameters"}}` and tool calls as `{"type": "function", "function": {"name", "arguments"}}` with
`arguments` a mapping: most render it with `tojson`, so a JSON string would come out quoted twice.
Datasets differ: LLaMA-Factory stores bare function definitions and calls as JSON strings, OpenAI
exports give `arguments` as a JSON string. Every variant becomes the one shape here; anything that
cannot is a bad row naming the field and what is wrong with it.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from trainer.data.errors import BadRow

_THOUGHT = re.compile(r"<think>.*?</think>", re.DOTALL)


def _json(text: str, where: str, reason: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRow(reason, f"{where} is not valid JSON ({exc.msg} at column {exc.colno}): {text[:80]!r}") from None


def parse_tools(value: Any, where: str) -> Optional[list[dict]]:
    """A row's tool definitions (a list, one definition, or a JSON string of either); None when there are none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        value = _json(value, where, "bad_tools")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRow("bad_tools", f"{where} should be a list of tool definitions, got {type(value).__name__}")
    return [_tool(tool, f"{where}[{k}]") for k, tool in enumerate(value)] or None


def _tool(tool: Any, where: str) -> dict:
    if not isinstance(tool, dict):
        raise BadRow("bad_tools", f"{where} should be an object, got {type(tool).__name__}")
    if isinstance(tool.get("function"), dict):
        wrapped, function = {"type": "function", **tool}, tool["function"]
    elif "name" in tool:  # a bare function definition, as LLaMA-Factory stores them
        wrapped, function = {"type": "function", "function": tool}, tool
    else:
        raise BadRow("bad_tools", f"{where} has neither 'function' nor 'name' (keys: {', '.join(sorted(tool))})")
    if not isinstance(function.get("name"), str) or not function["name"].strip():
        raise BadRow("bad_tools", f"{where} has no function name")
    return wrapped


def parse_tool_calls(value: Any, where: str) -> Optional[list[dict]]:
    """An assistant turn's `tool_calls`, OpenAI style or flat {name, arguments}; None when empty."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRow("bad_tool_call", f"{where} 'tool_calls' should be a list, got {type(value).__name__}")
    return [tool_call(call, f"{where} tool call {k}") for k, call in enumerate(value)] or None


def tool_call(call: Any, where: str) -> dict:
    """One call as `{"type": "function", "function": {"name", "arguments": mapping}, ...}`; other keys (id) kept."""
    if not isinstance(call, dict):
        raise BadRow("bad_tool_call", f"{where} should be an object, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise BadRow("bad_tool_call", f"{where} 'function' should be an object, got {type(function).__name__}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRow("bad_tool_call", f"{where} has no function name")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        arguments = _json(arguments, f"{where} arguments", "bad_tool_call") if arguments.strip() else {}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise BadRow("bad_tool_call", f"{where} arguments should be an object, got {type(arguments).__name__}")
    details = {k: v for k, v in function.items() if k not in ("name", "arguments")}
    rest = {k: v for k, v in call.items() if k not in ("type", "function", "name", "arguments")}
    return {"type": "function", "function": {"name": name, "arguments": arguments, **details}, **rest}


def sharegpt_function_call(value: Any, where: str) -> tuple[str, list[dict]]:
    """A LLaMA-Factory `function_call` turn: (its thought, its calls).

    The value is JSON {"name", "arguments"} or a list of them (parallel calls), optionally preceded by
    a `<think>…</think>` thought, which stays the turn's content as inline reasoning.
    """
    if isinstance(value, (dict, list)):
        thought, calls = "", value
    elif isinstance(value, str):
        match = _THOUGHT.search(value)
        thought = match.group(0) if match else ""
        calls = _json(value.replace(thought, "", 1).strip(), where, "bad_tool_call")
    else:
        raise BadRow("bad_tool_call", f"{where} should be a JSON string, got {type(value).__name__}")
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise BadRow("bad_tool_call", f"{where} holds no call")
    return thought, [tool_call(c, f"{where} call {k}") for k, c in enumerate(calls)]
