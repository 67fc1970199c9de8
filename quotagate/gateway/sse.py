"""Following a streamed answer: forward events, find the usage, count what was delivered.

The tracker splits the upstream's bytes into server-sent events and hands back exactly
the bytes of the events to forward, unchanged. It looks into each ``data:`` payload for
two things: the usage object (OpenAI sends it in a last chunk with ``"choices": []`` when
``stream_options.include_usage`` is set — the gateway always asks for it and hides that
chunk unless the client asked too), and the text of every delta, so that when no usage
comes back, or the client leaves half way, the tokens actually delivered can be counted.
The ``[DONE]`` event is held back: the gateway settles before it lets the client see the
end of the stream, so a client that reads the ledger right after finishing finds it there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

DONE = b"[DONE]"


def choice_texts(choices: Any, out: list[str]) -> None:
    """Append every generated string of `choices` (stream deltas or full messages)."""
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        text = choice.get("text")
        if isinstance(text, str):
            out.append(text)
        part = choice.get("delta") or choice.get("message")
        if not isinstance(part, Mapping):
            continue
        for key in ("content", "reasoning_content", "reasoning", "refusal"):
            value = part.get(key)
            if isinstance(value, str):
                out.append(value)
        calls = part.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    for key in ("name", "arguments"):
                        value = function.get(key)
                        if isinstance(value, str):
                            out.append(value)


class StreamTracker:
    def __init__(self, forward_usage: bool) -> None:
        self.forward_usage = forward_usage
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.tail = b""  # the [DONE] event and anything after it, sent after settling
        self._buffer = b""
        self._pending: list[str] = []
        self.delivered: list[str] = []

    def feed(self, data: bytes) -> bytes:
        """The complete events in `data` (plus what was buffered) that go to the client."""
        if self.done:
            self.tail += data
            return b""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            skip = 2
            crlf = buffer.find(b"\r\n\r\n", start)
            if crlf != -1 and (end == -1 or crlf < end):
                end, skip = crlf, 4
            if end == -1:
                break
            event = buffer[start : end + skip]
            start = end + skip
            keep = self._inspect(event)
            if self.done:
                self.tail = event + buffer[start:]
                start = len(buffer)
                break
            if keep:
                out.append(event)
        self._buffer = buffer[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        """What is left when the upstream closed: an unterminated last event, passed on."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            self._inspect(rest)
        return rest

    def confirm(self) -> None:
        """The events handed out by the last :meth:`feed` reached the client."""
        if self._pending:
            self.delivered.extend(self._pending)
            self._pending.clear()

    def _inspect(self, event: bytes) -> bool:
        """Record what the event says; False if it must not be forwarded."""
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == DONE:
                self.done = True
                return True
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return True
            if not isinstance(chunk, dict):
                return True
            usage = chunk.get("usage")
            choices = chunk.get("choices")
            if isinstance(usage, dict) and usage:
                self.usage = usage
                if not choices and not self.forward_usage:
                    return False
            choice_texts(choices, self._pending)
        return True
