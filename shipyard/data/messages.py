"""One chat record, checked and put in the form the chat template sees at serving time.

A record is OpenAI-style JSON:

    {"messages": [...], "tools": [...function schemas...], "chat_template_kwargs": {"enable_thinking": false}}

`normalise_record` accepts what OpenAI-compatible clients send and turns it into
what vLLM's chat endpoint hands the template, so that training renders a dialog
the way serving will:

- `content: null` (an assistant turn that only calls tools) becomes "";
- `content` as a list of text parts becomes their texts joined by newlines;
- reasoning (`reasoning_content`, or its aliases `reasoning` / `thinking`) is
  offered to the template as both `reasoning_content` and `reasoning`;
- tool-call `arguments` given as a JSON string become a mapping (templates
  expect one; vLLM parses them the same way);
- every other field of a message (`name`, `tool_call_id`, anything custom) is
  kept and passed to the template unchanged.

Anything that cannot be honoured is a `RecordError` naming the field and the fix;
the reader turns it into a `file:line` error or a counted skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
EXAMPLE = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


class RecordError(ValueError):
    """A record shipyard cannot train on; `reason` is its key in the skip counts."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Record:
    messages: list[dict]
    origin: str  # "file:line", shown in every error about this record
    tools: list[dict] | None = None  # function schemas offered to the template (`tools=`)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # this record's chat_template_kwargs


def reasoning_of(message: dict) -> str | None:
    return next((message[k] for k in REASONING_KEYS if isinstance(message.get(k), str)), None)


def without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in REASONING_KEYS}


def _content(value: Any, where: str, role: str, has_tool_calls: bool) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        if role == "assistant" and has_tool_calls:
            return ""
        raise RecordError(f"{where}.content is null; only an assistant turn with tool_calls may omit its content")
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image", "image_url", "audio", "input_audio", "video"):
                raise RecordError(f"{where}.content[{j}] is an {kind} part; this model is text-only")
            else:
                raise RecordError(f'{where}.content[{j}] is not a text part like {{"type": "text", "text": "..."}}')
        return "\n".join(texts)
    raise RecordError(f"{where}.content must be a string, a list of text parts or null (got {type(value).__name__})")


def _tool_calls(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise RecordError(f"{where}.tool_calls must be a list")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(f'{at} must look like {{"type": "function", "function": {{"name": "...", "arguments": {{...}}}}}}')
        if call.get("type", "function") != "function":
            raise RecordError(f"{at}.type is {call.get('type')!r}; only 'function' tool calls exist")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise RecordError(f"{at}.function.arguments is a string but not valid JSON ({e.msg})") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise RecordError(f"{at}.function.arguments must be a JSON object (got {type(arguments).__name__})")
        calls.append({**call, "type": "function", "function": {**function, "arguments": arguments}})
    return calls


def _message(m: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RecordError(f"{where} is not an object")
    role = m.get("role")
    if role not in ROLES:
        raise RecordError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
    out = dict(m)
    tool_calls = m.get("tool_calls")
    if tool_calls is not None and role != "assistant":
        raise RecordError(f"{where} has tool_calls, which only assistant turns make")
    if tool_calls is not None:
        out["tool_calls"] = _tool_calls(tool_calls, where)
        if not out["tool_calls"]:
            del out["tool_calls"]  # an empty list is no call (vLLM drops it too)
    out["content"] = _content(m.get("content"), where, role, bool(out.get("tool_calls")))
    present = [k for k in REASONING_KEYS if m.get(k) is not None]
    if present:
        if role != "assistant":
            raise RecordError(f"{where}.{present[0]} is set on a {role} turn; only assistant turns reason")
        values = {m[k] for k in present}
        if any(not isinstance(v, str) for v in values):
            raise RecordError(f"{where}.{present[0]} must be a string")
        if len(values) > 1:
            raise RecordError(f"{where} gives different texts in {' and '.join(present)}; keep one")
        out["reasoning_content"] = out["reasoning"] = values.pop()
    for key in ("name", "tool_call_id"):
        if key in m and not isinstance(m[key], str):
            raise RecordError(f"{where}.{key} must be a string")
    return out


def normalise_record(obj: Any, origin: str) -> Record:
    """The record as the template will see it, or RecordError saying what is wrong."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise RecordError(f'expected an object with a "messages" list, e.g. {EXAMPLE}')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError('"messages" must be a non-empty list')
    normalised = [_message(m, i) for i, m in enumerate(messages)]
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RecordError('"tools" must be a list of function schemas (objects)')
    kwargs = obj.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RecordError('"chat_template_kwargs" must be an object, e.g. {"enable_thinking": false}')
    if not any(m["role"] == "assistant" for m in normalised):
        raise RecordError("no assistant turn: nothing to learn", reason="no_assistant_turn")
    return Record(normalised, origin, tools or None, dict(kwargs))
