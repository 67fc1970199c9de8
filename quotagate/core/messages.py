"""The shape of OpenAI chat messages, checked once for every front door.

The prompt is counted from the messages before a call, so a message the counter cannot
read must be refused, not guessed at (or crashed on). :func:`check_messages` accepts what
OpenAI's Chat Completions API accepts and names the first field that is wrong, in the
``messages[0].tool_calls[0].function`` notation OpenAI uses in its own errors. Content
part types and tool call types it does not know are let through when they are objects
with a string ``type``, so new OpenAI features keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quotagate.core.errors import InvalidInput

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

#: required string fields of the object under the part's type, per known part type
_PART_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "image_url": ("image_url", ("url",)),
    "input_audio": ("input_audio", ("data", "format")),
}
#: string fields a message may have
_TEXT_FIELDS = ("name", "tool_call_id", "refusal")


def check_messages(messages: object, param: str = "messages") -> Sequence[Mapping[str, Any]]:
    """`messages` if it is a list of well-formed chat messages, else an InvalidInput that
    names the offending field in its `param`. (It runs on every chat request: the common
    message, a role and text content, is checked without a call.)"""
    if not isinstance(messages, list) and (
        not isinstance(messages, Sequence) or isinstance(messages, str | bytes)
    ):
        raise InvalidInput(f"'{param}' must be an array of message objects.", param)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) and not isinstance(message, Mapping):
            raise _invalid(f"{param}[{index}]", "must be an object with a role and content")
        role = message.get("role")
        if type(role) is not str or role not in ROLES:
            names = ", ".join(sorted(ROLES))
            raise _invalid(f"{param}[{index}].role", f"must be one of {names}, got {_brief(role)}")
        content = message.get("content")
        if type(content) is not str or len(message) > 2:
            _rest(message, role, content, f"{param}[{index}]")
    return messages


def _rest(message: Mapping[str, Any], role: str, content: object, at: str) -> None:
    """Everything of a message but its role: content parts, names, tool calls."""
    if isinstance(content, list):
        for index, part in enumerate(content):
            _part(part, f"{at}.content[{index}]")
    elif content is None:
        if role not in ("assistant", "function") and "content" in message:
            raise _invalid(f"{at}.content", "must be text or an array of content parts")
    elif not isinstance(content, str):
        raise _invalid(f"{at}.content", "must be text or an array of content parts")
    for name in _TEXT_FIELDS:
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            raise _invalid(f"{at}.{name}", "must be a string")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _invalid(f"{at}.tool_calls", "must be an array of tool calls")
        for index, call in enumerate(calls):
            _tool_call(call, f"{at}.tool_calls[{index}]")
    legacy = message.get("function_call")
    if legacy is not None:
        _function(legacy, f"{at}.function_call")


def _part(part: object, at: str) -> None:
    if isinstance(part, str):
        return  # a bare string part: counted as text (QuotaGate has always read it so)
    if not isinstance(part, Mapping):
        raise _invalid(at, "must be a content part object")
    kind = part.get("type")
    if not isinstance(kind, str) or not kind:
        raise _invalid(f"{at}.type", "must be a string such as 'text'")
    if (kind == "text" or "text" in part) and not isinstance(part.get("text"), str):
        raise _invalid(f"{at}.text", "must be a string")
    if kind in _PART_FIELDS:
        field, required = _PART_FIELDS[kind]
        inner = part.get(field)
        if isinstance(inner, str) and kind == "image_url":
            return  # some clients send the URL itself; OpenAI-compatible servers accept it
        if not isinstance(inner, Mapping):
            raise _invalid(f"{at}.{field}", "must be an object")
        for name in required:
            if not isinstance(inner.get(name), str):
                raise _invalid(f"{at}.{field}.{name}", "must be a string")


def _tool_call(call: object, at: str) -> None:
    if not isinstance(call, Mapping):
        raise _invalid(at, "must be a tool call object")
    kind = call.get("type", "function")
    if not isinstance(kind, str):
        raise _invalid(f"{at}.type", "must be a string such as 'function'")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise _invalid(f"{at}.id", "must be a string")
    if kind == "function" or "function" in call:
        _function(call.get("function"), f"{at}.function")


def _function(function: object, at: str) -> None:
    if not isinstance(function, Mapping):
        raise _invalid(at, "must be an object with a name and arguments")
    if not isinstance(function.get("name"), str):
        raise _invalid(f"{at}.name", "must be a string")
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str):
        raise _invalid(f"{at}.arguments", "must be a string (JSON text)")


def _invalid(param: str, what: str) -> InvalidInput:
    return InvalidInput(f"Invalid '{param}': {what}.", param)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}…"
