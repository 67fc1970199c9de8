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


def chunk(choices: list[dict[str, object]]) -> bytes:
    body = {"id": "c2", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    return b"data: " + orjson.dumps({**body, "choices": choices}) + b"\n\n"


def word(index: int = 0, text: str = "w ") -> bytes:
    return chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}])


ROLE = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
FINISH = chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])


def test_a_stream_within_its_budget_is_not_cut() -> None:
    """The role chunk and the finish chunk carry no text: they do not count."""
    tracker = StreamTracker(forward_usage=False, budget=3)
    wire = ROLE + word() + word() + word() + FINISH
    assert tracker.feed(wire + b"data: [DONE]\n\n") == wire
    assert not tracker.cut and tracker.done


def test_the_events_past_the_budget_are_held_back_and_the_stream_ends() -> None:
    tracker = StreamTracker(forward_usage=True, budget=3)
    out = tracker.feed(ROLE + word() + word())
    out += tracker.feed(word() + word("a long chunk of many tokens") + word())
    assert out == ROLE + word() * 3
    assert tracker.cut and tracker.feed(word()) == b""
    end, done = [e + b"\n\n" for e in tracker.tail.split(b"\n\n") if e]
    assert done == b"data: [DONE]\n\n"
    assert orjson.loads(end[6:]) == {
        "id": "c2",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    }
    tracker.with_usage({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4})
    usage = tracker.tail.split(b"\n\n")[1]
    assert orjson.loads(usage[6:])["usage"]["completion_tokens"] == 3
    assert tracker.tail.endswith(b"\n\ndata: [DONE]\n\n")


def test_the_budget_is_shared_by_the_choices_and_every_open_one_ends() -> None:
    tracker = StreamTracker(forward_usage=False, budget=4)
    done = chunk([{"index": 1, "delta": {}, "finish_reason": "stop"}])
    tracker.feed(word(0) + word(1) + word(2) + done + word(0) + word(2) + word(0))
    assert tracker.cut
    end = orjson.loads(tracker.tail.split(b"\n\n")[0][6:])
    assert [c["index"] for c in end["choices"]] == [0, 2]


def test_legacy_completions_end_with_text() -> None:
    tracker = StreamTracker(forward_usage=False, budget=1)
    text = b'data: {"object":"text_completion","choices":[{"index":0,"text":"a"}]}\n\n'
    assert tracker.feed(text + text) == text
    end = orjson.loads(tracker.tail.split(b"\n\n")[0][6:])
    assert end["object"] == "text_completion"
    assert end["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length", "text": ""}]
