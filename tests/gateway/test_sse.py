"""The stream tracker on its own: events forwarded byte for byte however the network cuts
them, the usage chunk found (and hidden unless asked for), [DONE] held back, and the
delivered text counted only from events that reached the client."""

from __future__ import annotations

import orjson

from quotagate.gateway.sse import StreamTracker


def event(content: str | None = None, usage: object = None, choices: bool = True) -> bytes:
    chunk: dict[str, object] = {"id": "c1", "usage": usage}
    chunk["choices"] = [{"index": 0, "delta": {"content": content}}] if choices else []
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
STREAM = [event("Hello"), event(' "usage": {tricky}'), event(choices=False, usage=USAGE)]
WIRE = b"".join(STREAM) + b"data: [DONE]\n\n"


def run(tracker: StreamTracker, cuts: list[int]) -> bytes:
    out = b""
    last = 0
    for cut in [*cuts, len(WIRE)]:
        out += tracker.feed(WIRE[last:cut])
        tracker.confirm()
        last = cut
    return out


def test_any_cut_gives_the_same_events_and_usage() -> None:
    for cut in range(1, len(WIRE), 7):
        tracker = StreamTracker(forward_usage=True)
        out = run(tracker, [cut])
        assert out == b"".join(STREAM)
        assert tracker.usage == USAGE
        assert tracker.done and tracker.tail == b"data: [DONE]\n\n"
        assert tracker.delivered_text() == 'Hello "usage": {tricky}'


def test_usage_chunk_hidden_unless_asked() -> None:
    tracker = StreamTracker(forward_usage=False)
    assert run(tracker, [10, 200]) == b"".join(STREAM[:2])
    assert tracker.usage == USAGE


def test_crlf_events_and_unterminated_last_event() -> None:
    tracker = StreamTracker(forward_usage=False)
    wire = b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\ndata: {"choices":[{"text":"b"}]}'
    assert tracker.feed(wire) == wire.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    tracker.confirm()
    assert tracker.finish() == b'data: {"choices":[{"text":"b"}]}'
    tracker.confirm()
    assert tracker.delivered_text() == "ab"


def test_only_confirmed_events_count_as_delivered() -> None:
    tracker = StreamTracker(forward_usage=False)
    tracker.feed(event("one"))
    tracker.confirm()
    tracker.feed(event("two"))  # handed out, but the client was gone before it was sent
    assert tracker.delivered_text() == "one"
