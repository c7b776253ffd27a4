"""One chat record, checked and put in the form the chat template sees at serving time.

A record is OpenAI-style JSON:

    {"messages": [...], "tools": [...function schemas...], "chat_template_kwargs": {"enable_thinking": false}}

`normalise_record` accepts what OpenAI-compatible clients send and turns it into
what vLLM's chat endpoint hands the template, so that training renders a dialog
the way serving will:

- `content: null` (an assistant turn that only calls tools) becomes "";
- `content` as a list of text parts becomes their texts joined by newlines; a list
  with images stays a list of `{"type": "text"}` and `{"type": "image", "image": REF}`
  parts (REF an absolute path or data: URI, see data/images.py), which is what a
  vision-language template iterates over; audio parts become `{"type": "audio",
  "audio": PATH}` (see data/audio.py for how a text template sees them);
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
from pathlib import Path
from typing import Any

from shipyard.data.parts import AUDIO_PART_TYPES, IMAGE_PART_TYPES

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


def text_of(content: str | list) -> str:
    """The text of a message's content (image parts left out)."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def without_images(record: Record) -> Record:
    """`record` with its image and audio parts removed (data.drop_images): text content as a text-only model sees it."""
    messages = [{**m, "content": text_of(m["content"])} for m in record.messages]
    return Record(messages, record.origin, record.tools, record.template_kwargs)


def resolve_media_ref(part: dict, where: str, root: Path | None, kind: str = "image") -> str:
    """The location of an image or audio content part (`{"type": KIND, KIND: REF}` or OpenAI's
    `{"type": "KIND_url", "KIND_url": {"url": REF}}`): an absolute path, or a data: URI as it is
    (RecordError if the part is malformed or names a web address)."""
    if part.get("type") == f"{kind}_url":
        url = part.get(f"{kind}_url")
        ref = url.get("url") if isinstance(url, dict) else url
    else:
        ref = part.get(kind)
    example = {"image": "path.png", "audio": "clip.wav"}[kind]
    if not isinstance(ref, str) or not ref:
        raise RecordError(f'{where} is an {kind} part without a location; use {{"type": "{kind}", "{kind}": "{example}"}}',
                          reason=f"bad_{kind}")
    if ref.startswith("data:"):
        return ref
    if ref.startswith(("http://", "https://")):
        raise RecordError(f"{where}: {kind} URLs are not fetched during training ({ref[:60]}); download the file "
                          "and give its path", reason=f"bad_{kind}")
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    return str(path.resolve())


def _content(value: Any, where: str, role: str, has_tool_calls: bool, image_root: Path | None) -> str | list[dict]:
    if isinstance(value, str):
        return value
    if value is None:
        if role == "assistant" and has_tool_calls:
            return ""
        raise RecordError(f"{where}.content is null; only an assistant turn with tool_calls may omit its content")
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in IMAGE_PART_TYPES:
                if role == "assistant":
                    raise RecordError(f"{where}.content[{j}] is an image in an assistant turn; models read images, "
                                      "they do not write them", reason="image_in_assistant_turn")
                parts.append({"type": "image", "image": resolve_media_ref(part, f"{where}.content[{j}]", image_root)})
            elif kind in AUDIO_PART_TYPES:
                if role == "assistant":
                    raise RecordError(f"{where}.content[{j}] is audio in an assistant turn; speech-LMs read audio, "
                                      "they do not write it", reason="audio_in_assistant_turn")
                parts.append({"type": "audio", "audio": resolve_media_ref(part, f"{where}.content[{j}]", image_root, "audio")})
            elif kind in ("input_audio", "video"):
                raise RecordError(f'{where}.content[{j}] is an {kind} part; give audio as {{"type": "audio", '
                                  '"audio": "clip.wav"}; videos are not trained')
            else:
                raise RecordError(f'{where}.content[{j}] is not a text part like {{"type": "text", "text": "..."}}, '
                                  'an image part like {"type": "image", "image": "path.png"} or an audio part like '
                                  '{"type": "audio", "audio": "clip.wav"}')
        if any(p["type"] in ("image", "audio") for p in parts):
            return parts
        return "\n".join(p["text"] for p in parts)
    raise RecordError(f"{where}.content must be a string, a list of text/image parts or null (got {type(value).__name__})")


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


def _message(m: Any, i: int, image_root: Path | None = None) -> dict:
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
    out["content"] = _content(m.get("content"), where, role, bool(out.get("tool_calls")), image_root)
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


def normalise_record(obj: Any, origin: str, image_root: Path | None = None) -> Record:
    """The record as the template will see it, or RecordError saying what is wrong.

    Relative image paths are resolved against `image_root` (the JSONL's folder, or data.image_root)."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise RecordError(f'expected an object with a "messages" list, e.g. {EXAMPLE}')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError('"messages" must be a non-empty list')
    normalised = [_message(m, i, image_root) for i, m in enumerate(messages)]
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RecordError('"tools" must be a list of function schemas (objects)')
    kwargs = obj.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RecordError('"chat_template_kwargs" must be an object, e.g. {"enable_thinking": false}')
    if not any(m["role"] == "assistant" for m in normalised):
        raise RecordError("no assistant turn: nothing to learn", reason="no_assistant_turn")
    return Record(normalised, origin, tools or None, dict(kwargs))


def shape_of(record: Record) -> tuple[str, ...]:
    """The features of a dialog that change how a template renders it."""
    m = record.messages
    features = {
        "multi_turn": sum(x["role"] == "assistant" for x in m) > 1,
        "reasoning": any(reasoning_of(x) or "</think>" in x["content"] for x in m if x["role"] == "assistant"),
        "tool_calls": any(x.get("tool_calls") for x in m),
        "tools": bool(record.tools),
        "system": any(x["role"] == "system" for x in m),
        "template_kwargs": bool(record.template_kwargs),
        "images": any(isinstance(x["content"], list) for x in m),
    }
    return tuple(name for name, present in features.items() if present) or ("single_turn",)
