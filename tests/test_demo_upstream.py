"""The demo upstream speaks OpenAI's protocol as the real SDK understands it, and its knobs work.

The gateway tests lean on this server for their ground truth (usage counts, failures, dropped
streams), so its own behaviour is pinned here with the official `openai` client and raw httpx.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from quotagate.gateway.demo import REPLY_WORDS
from tests.support.upstream import RunningUpstream, running_upstream, upstream

__all__ = ["upstream"]  # the fixture, re-exported so pytest finds it by name

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count three words please"},
]
PROMPT_TOKENS = 3 + 1 + 4 + 1  # words per message + 1 per message


def client(up: RunningUpstream, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key=key, max_retries=0, timeout=10)


def test_models_lists_configured_models(upstream: RunningUpstream) -> None:
    upstream.knobs.models = ["alpha", "beta"]
    ids = [m.id for m in client(upstream).models.list()]
    assert ids == ["alpha", "beta"]


def test_non_stream_chat_reports_usage_by_the_documented_rule(upstream: RunningUpstream) -> None:
    resp = client(upstream).chat.completions.create(
        model="demo-model", messages=MESSAGES, max_tokens=7
    )
    text = resp.choices[0].message.content or ""
    assert text.split() == list(REPLY_WORDS[:7])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 7 == len(text.split())
    assert resp.usage.prompt_tokens == PROMPT_TOKENS
    assert resp.usage.total_tokens == PROMPT_TOKENS + 7
    # The body the upstream received is recorded, clamped max_tokens included.
    assert upstream.requests[-1]["max_tokens"] == 7
    assert upstream.requests[-1]["messages"] == MESSAGES


def test_default_length_and_stop_when_not_cut(upstream: RunningUpstream) -> None:
    upstream.knobs.default_tokens = 5
    resp = client(upstream).chat.completions.create(
        model="demo-model", messages=MESSAGES, max_tokens=100
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "stop"
    resp = client(upstream).chat.completions.create(
        model="demo-model", messages=MESSAGES, max_completion_tokens=3
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 3


def test_stream_with_include_usage_ends_with_usage_chunk(upstream: RunningUpstream) -> None:
    stream = client(upstream).chat.completions.create(
        model="demo-model",
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == list(REPLY_WORDS[:6])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens == PROMPT_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_without_include_usage_has_no_usage(upstream: RunningUpstream) -> None:
    chunks = list(
        client(upstream).chat.completions.create(
            model="demo-model", messages=MESSAGES, max_tokens=4, stream=True
        )
    )
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 4


def test_stream_wire_format_is_openai_sse(upstream: RunningUpstream) -> None:
    body = {
        "model": "demo-model",
        "messages": MESSAGES,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(f"{upstream.base_url}/chat/completions", json=body, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == ""  # the body ends with a blank line after [DONE]
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    # role chunk, 2 words, finish chunk, usage chunk, [DONE]
    assert len(events) == 6


def test_omit_usage_knob(upstream: RunningUpstream) -> None:
    upstream.knobs.omit_usage = True
    chunks = list(
        client(upstream).chat.completions.create(
            model="demo-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    resp = client(upstream).chat.completions.create(model="demo-model", messages=MESSAGES)
    assert resp.usage is None


@pytest.mark.parametrize("status", [500, 503])
def test_fail_knob_answers_status_with_openai_error(upstream: RunningUpstream, status: int) -> None:
    upstream.knobs.fail_status = status
    with pytest.raises(openai.APIStatusError) as info:
        client(upstream).chat.completions.create(model="demo-model", messages=MESSAGES)
    assert info.value.status_code == status
    r = httpx.post(
        f"{upstream.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES, "stream": True},
    )
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fail_count_fails_only_the_next_requests(upstream: RunningUpstream) -> None:
    upstream.knobs.fail_status = 503
    upstream.knobs.fail_count = 2
    url = f"{upstream.base_url}/chat/completions"
    codes = [
        httpx.post(url, json={"model": "m", "messages": MESSAGES}).status_code for _ in range(3)
    ]
    assert codes == [503, 503, 200]
    assert len(upstream.requests) == 3  # failures are recorded too


def test_close_mid_stream_knob_drops_the_connection(upstream: RunningUpstream) -> None:
    upstream.knobs.close_after_chunks = 3
    received = []
    with pytest.raises(openai.APIConnectionError):
        for c in client(upstream).chat.completions.create(
            model="demo-model", messages=MESSAGES, stream=True
        ):
            received.append(c)
    # role chunk + 2 words arrived before the drop
    assert len(received) == 3
    with (
        httpx.stream(
            "POST",
            f"{upstream.base_url}/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        ) as r,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        r.read()


def test_api_key_knob(upstream: RunningUpstream) -> None:
    upstream.knobs.api_key = "sk-upstream"
    with pytest.raises(openai.AuthenticationError):
        client(upstream, key="wrong").chat.completions.create(model="m", messages=MESSAGES)
    resp = client(upstream, key="sk-upstream").chat.completions.create(model="m", messages=MESSAGES)
    assert resp.usage is not None
    assert upstream.log[-1].headers["authorization"] == "Bearer sk-upstream"


def test_completions_and_embeddings(upstream: RunningUpstream) -> None:
    c = client(upstream)
    resp = c.completions.create(model="demo-model", prompt="one two three", max_tokens=4)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 4)
    assert len(resp.choices[0].text.split()) == 4
    streamed = list(
        c.completions.create(
            model="demo-model",
            prompt="one two",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 3
    assert "".join(x.choices[0].text for x in streamed if x.choices).split() == list(
        REPLY_WORDS[:3]
    )
    # The SDK asks for base64 by default and decodes it; floats work too.
    emb = c.embeddings.create(model="demo-embedding", input=["a b", "c"])
    assert [len(d.embedding) for d in emb.data] == [8, 8]
    assert emb.usage.prompt_tokens == 3
    floats = c.embeddings.create(model="demo-embedding", input="a b", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-5)


def test_unpacking_and_chunk_delay() -> None:
    with running_upstream() as up:
        base_url, knobs, requests = up
        knobs.chunk_delay = 0.02
        knobs.default_tokens = 3
        r = httpx.post(
            f"{base_url}/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        )
        # 5 events after the first (2 more words, finish, [DONE]) each wait 20 ms
        assert r.elapsed.total_seconds() >= 0.08
        assert requests[-1]["stream"] is True
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/models", timeout=2)
