"""Following a streamed answer: forward events, find the usage, count what was delivered.

The tracker splits the upstream's bytes into server-sent events and hands back exactly
the bytes of the events to forward, unchanged. It looks for the usage object (OpenAI
sends it in a last chunk with ``"choices": []`` when ``stream_options.include_usage`` is
set — the gateway always asks for it and hides that chunk unless the client asked too),
and keeps the events that reached the client, so that when no usage comes back, or the
client leaves half way, the text actually delivered can be counted. Events are parsed
only when that is needed: a stream that reports its usage costs one JSON parse.
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
        self._pending: list[bytes] = []
        self.delivered: list[bytes] = []  # events that reached the client

    def feed(self, data: bytes) -> bytes:
        """The complete events in `data` (plus what was buffered) that go to the client."""
        if self.done:
            self.tail += data
            return b""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        start = 0
        crlf = b"\r" in buffer  # events end in a blank line: LF LF, or CRLF CRLF
        while True:
            end = buffer.find(b"\n\n", start)
            skip = 2
            if crlf:
                other = buffer.find(b"\r\n\r\n", start)
                if other != -1 and (end == -1 or other < end):
                    end, skip = other, 4
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
        self._pending.extend(out)
        return b"".join(out)

    def finish(self) -> bytes:
        """What is left when the upstream closed: an unterminated last event, to pass on."""
        rest, self._buffer = self._buffer, b""
        if not rest.strip() or not self._inspect(rest):
            return b""
        if self.done:
            self.tail = rest
            return b""
        self._pending.append(rest)
        return rest

    def confirm(self) -> None:
        """The events handed out by the last :meth:`feed` reached the client."""
        if self._pending:
            self.delivered.extend(self._pending)
            self._pending.clear()

    def delivered_text(self) -> str:
        """Everything generated in the events that reached the client, for counting."""
        texts: list[str] = []
        for event in self.delivered:
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == DONE:
                    continue
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(chunk, dict):
                    choice_texts(chunk.get("choices"), texts)
        return "".join(texts)

    def _inspect(self, event: bytes) -> bool:
        """Note the end and the usage; False if the event must not be forwarded.

        Only an event that carries a usage object is parsed (streams with include_usage
        put ``"usage":null`` in every other chunk); the text of the others is read only
        if it has to be counted.
        """
        if DONE in event:
            for line in event.splitlines():
                if line.startswith(b"data:") and line[5:].strip() == DONE:
                    self.done = True
                    return True
        at = event.find(b'"usage":')
        if at == -1:
            return True
        at += 8
        while event[at : at + 1] in (b" ", b"\t"):
            at += 1
        if event[at : at + 1] != b"{":
            return True
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                chunk = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return True
            if not isinstance(chunk, dict):
                return True
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage:
                self.usage = usage
                if not chunk.get("choices") and not self.forward_usage:
                    return False
        return True
