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

Given a budget (the ticket's completion tokens), the tracker also stops a stream that
goes past it, for an upstream that ignores ``max_tokens``: it forwards at most `budget`
events that carry generated text (OpenAI-compatible servers stream one or more tokens per
such event, so an upstream that keeps to ``max_tokens`` is never cut, whatever its
tokenizer), then ends the stream the way a model that hit its limit does. Counting costs
nothing while the budget is far away: every event is taken to carry text until the count
comes within one event of the budget, and only then are events parsed to see which do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
#: what a chunk that ends a stream copies from the stream's own chunks
_CHUNK_FIELDS = ("id", "object", "created", "model", "system_fingerprint")


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


def error_event(message: str, code: str = "upstream_error") -> bytes:
    """An error in OpenAI's stream format: the `openai` SDK raises it as an APIError."""
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


class StreamTracker:
    def __init__(self, forward_usage: bool, budget: int | None = None) -> None:
        self.forward_usage = forward_usage
        self.budget = budget  # events with generated text that may go out (None: any)
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.cut = False  # stopped at the budget: the upstream went on past it
        self.tail = b""  # the [DONE] event and anything after it, sent after settling
        self._buffer = b""
        self._events: list[bytes] = []  # events handed out, in order
        self._texts: list[str | None] = []  # their generated text, once parsed
        self._confirmed = 0  # how many of them reached the client
        self._with_text = 0  # parsed events that carry text
        self._unparsed: list[int] = []  # events taken to carry text, not parsed yet
        self._last: dict[str, Any] = {}  # the last chunk with choices, once cut

    def feed(self, data: bytes) -> bytes:
        """The complete events in `data` (plus what was buffered) that go to the client."""
        if self.cut:
            return b""
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
                if not self._take(event):
                    start = len(buffer)
                    break
                out.append(event)
        self._buffer = buffer[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        """What is left when the upstream closed: an unterminated last event, to pass on."""
        rest, self._buffer = self._buffer, b""
        if self.cut or not rest.strip() or not self._inspect(rest):
            return b""
        if self.done:
            self.tail = rest
            return b""
        return rest if self._take(rest) else b""

    def confirm(self) -> None:
        """The events handed out by the last :meth:`feed` reached the client."""
        self._confirmed = len(self._events)

    def delivered_text(self) -> str:
        """Everything generated in the events that reached the client, for counting."""
        return "".join(self._text(index) for index in range(self._confirmed))

    def with_usage(self, usage: Mapping[str, Any]) -> None:
        """After a cut: put a usage chunk (what was charged) before the end, for a client
        that asked for one; the upstream's own never came."""
        chunk = {**self._meta(), "choices": [], "usage": dict(usage)}
        self.tail = self.tail.removesuffix(DONE_EVENT) + _event(chunk) + DONE_EVENT

    # -- the budget -----------------------------------------------------------------------
    def _take(self, event: bytes) -> bool:
        """Hand `event` out if it fits the budget; else end the stream here (a cut)."""
        budget = self.budget
        if budget is None:
            self._events.append(event)
            self._texts.append(None)
            return True
        index = len(self._events)
        if index and self._with_text + len(self._unparsed) < budget:
            # room for it even if it carries text: no need to look (the first event is
            # looked at, since it is usually the role chunk, which carries none)
            self._unparsed.append(index)
            self._events.append(event)
            self._texts.append(None)
            return True
        text = _text_of(event)
        if text:
            if self._with_text + len(self._unparsed) >= budget:
                for earlier in self._unparsed:  # near the budget: count exactly
                    if self._text(earlier):
                        self._with_text += 1
                self._unparsed.clear()
            if self._with_text >= budget:
                self._end_at_length()
                return False
            self._with_text += 1
        self._events.append(event)
        self._texts.append(text)
        return True

    def _text(self, index: int) -> str:
        text = self._texts[index]
        if text is None:
            text = self._texts[index] = _text_of(self._events[index])
        return text

    def _end_at_length(self) -> None:
        """The end of a stream cut at the budget, as a model that hit max_tokens ends it:
        a chunk with finish_reason "length" for every choice still open, then [DONE]."""
        self.cut = True
        self._buffer = b""
        opened: list[int] = []
        finished: set[int] = set()
        text_completion = False
        for event in self._events:
            for chunk in _chunks(event):
                choices = chunk.get("choices")
                if not isinstance(choices, list) or not choices:
                    continue
                self._last = chunk
                for choice in choices:
                    if not isinstance(choice, Mapping):
                        continue
                    index = choice.get("index", 0)
                    if not isinstance(index, int) or isinstance(index, bool):
                        continue
                    if index not in opened:
                        opened.append(index)
                    if choice.get("finish_reason"):
                        finished.add(index)
                    text_completion = text_completion or "text" in choice
        open_choices = [index for index in opened if index not in finished] or [0]
        end: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if text_completion:
            end["text"] = ""
        else:
            end["delta"] = {}
        choices = [{**end, "index": index} for index in open_choices]
        self.tail = _event({**self._meta(), "choices": choices}) + DONE_EVENT

    def _meta(self) -> dict[str, Any]:
        meta = {k: self._last[k] for k in _CHUNK_FIELDS if k in self._last}
        meta.setdefault("object", "chat.completion.chunk")
        return meta

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


def _chunks(event: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects in the data lines of one event."""
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
            yield chunk


def _text_of(event: bytes) -> str:
    """Everything generated in one event."""
    texts: list[str] = []
    for chunk in _chunks(event):
        choice_texts(chunk.get("choices"), texts)
    return "".join(texts)


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
