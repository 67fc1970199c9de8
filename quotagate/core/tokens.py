"""Counting prompt tokens before a call, and completion tokens when no usage comes back.

tiktoken is used when the model's encoding is available on this machine (its files are
cached after a first download, or shipped via ``TIKTOKEN_CACHE_DIR``). Otherwise QuotaGate
estimates from the UTF-8 length: byte-level BPE tokens average 3.5–4.5 bytes in English
and about 3 in code or CJK text, so `bytes / bytes_per_token` with the default of 3 errs
on the side of counting too many, which is what a strict quota needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Protocol

#: Tokens OpenAI's chat format adds per message and per reply (role markers and such).
PER_MESSAGE_OVERHEAD = 4
PER_REPLY_OVERHEAD = 3


class Encoder(Protocol):
    def encode(self, text: str, *, disallowed_special: Any = ...) -> list[int]: ...


@lru_cache(maxsize=32)
def _encoding_for(model: str) -> Encoder | None:
    """tiktoken's encoding for `model` if its data is on this machine, else None."""
    try:
        import tiktoken

        try:
            name = tiktoken.encoding_name_for_model(model)
        except KeyError:
            return None
        return tiktoken.get_encoding(name)
    except Exception:  # offline, no cache, unknown model: fall back to the estimate
        return None


class TokenCounter:
    """Counts tokens for a model; exact with tiktoken, conservative without."""

    def __init__(self, bytes_per_token: float = 3.0, use_tiktoken: bool = True) -> None:
        if bytes_per_token <= 0:
            raise ValueError("bytes_per_token must be positive")
        self.bytes_per_token = bytes_per_token
        self.use_tiktoken = use_tiktoken

    def text(self, text: str, model: str = "") -> int:
        if not text:
            return 0
        encoding = _encoding_for(model) if self.use_tiktoken and model else None
        if encoding is not None:
            return len(encoding.encode(text, disallowed_special=()))
        return math.ceil(len(text.encode("utf-8")) / self.bytes_per_token)

    def messages(self, messages: Iterable[Mapping[str, Any]], model: str = "") -> int:
        """Prompt tokens of a chat: every text part of every message plus the format overhead."""
        total = PER_REPLY_OVERHEAD
        for message in messages:
            total += PER_MESSAGE_OVERHEAD
            for value in _texts(message):
                total += self.text(value, model)
        return total


def _texts(message: Mapping[str, Any]) -> Iterable[str]:
    """The strings of a message that reach the model: role, name, content parts, tool calls."""
    for key in ("role", "name"):
        value = message.get(key)
        if isinstance(value, str):
            yield value
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part, str):
                yield part
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, Mapping):
            yield from _function_texts(call.get("function"))
    yield from _function_texts(message.get("function_call"))  # the legacy single call


def _function_texts(function: object) -> Iterable[str]:
    if isinstance(function, Mapping):
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                yield function[key]
