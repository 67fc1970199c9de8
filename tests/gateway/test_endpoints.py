"""Each endpoint through the real gateway with the real `openai` SDK: answers arrive as the
upstream sent them, unknown fields reach the upstream, the clamped budget reaches the
upstream, the usage chunk is hidden unless asked for, and the ledger holds what the
upstream reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quotagate.gateway.demo import reply_words
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream

MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say something nice"},
]
DEMO_PROMPT = 2 + 1 + 3 + 1  # the demo counts words plus one per message


def words(n: int) -> str:
    return " ".join(reply_words(n))


async def test_chat_non_stream_passes_through_and_settles(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    gw.limit("everyone", "*", "tokens", "day", 10_000)
    key = gw.key("alice")
    raw = gw.client(key).chat.completions.with_raw_response.create(
        model="demo-model",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0.25,
        extra_body={"x_vendor_field": {"nested": [1, 2]}, "seed": 7},
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == words(5)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (DEMO_PROMPT, 5)
    sent = upstream.requests[-1]
    assert sent["x_vendor_field"] == {"nested": [1, 2]}  # unknown fields are forwarded
    assert sent["seed"] == 7 and sent["temperature"] == 0.25
    assert sent["messages"] == MESSAGES and sent["max_tokens"] == 5
    [event] = await gw.events("alice")
    assert (event.prompt_tokens, event.completion_tokens) == (DEMO_PROMPT, 5)
    assert event.channel == "main" and event.model == "demo-model"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - DEMO_PROMPT - 5)
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert await gw.pending() == 0


async def test_chat_stream_hides_usage_chunk_unless_asked(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    key = gw.key("alice")
    client = gw.client(key)
    chunks = list(
        client.chat.completions.create(
            model="demo-model", messages=MESSAGES, max_tokens=4, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == words(4)
    assert all(c.choices for c in chunks)  # no usage-only chunk reached the client
    assert all(c.usage is None for c in chunks)
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}

    asked = list(
        client.chat.completions.create(
            model="demo-model",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = asked[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (DEMO_PROMPT, 4)
    events = await gw.events("alice")
    assert [(e.prompt_tokens, e.completion_tokens) for e in events] == [(DEMO_PROMPT, 4)] * 2


async def test_stream_is_sse_with_done_and_ratelimit_headers(gw: RunningGateway) -> None:
    gw.limit("everyone", "*", "tokens", "day", 5_000)
    key = gw.key("alice")
    body = {"model": "demo-model", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with gw.http.stream(
        "POST",
        f"{gw.base_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-ratelimit-limit-tokens"] == "5000"
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    # the ledger is written before the client sees [DONE]
    [event] = await gw.events("alice")
    assert event.completion_tokens == 3


async def test_completions_stream_and_not(gw: RunningGateway, upstream: RunningUpstream) -> None:
    key = gw.key("alice")
    client = gw.client(key)
    reply = client.completions.create(model="demo-model", prompt="Once upon a time", max_tokens=6)
    assert reply.choices[0].text == words(6)
    assert upstream.requests[-1]["prompt"] == "Once upon a time"
    streamed = list(
        client.completions.create(
            model="demo-model", prompt="Once upon a time", max_tokens=3, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == words(3)
    events = await gw.events("alice")
    assert [(e.prompt_tokens, e.completion_tokens) for e in events] == [(4, 6), (4, 3)]


async def test_embeddings_charge_input_only(gw: RunningGateway, upstream: RunningUpstream) -> None:
    key = gw.key("alice")
    result = gw.client(key).embeddings.create(
        model="demo-embedding", input=["red apples", "green pears and plums"]
    )
    assert len(result.data) == 2
    assert result.usage.prompt_tokens == 6
    assert "max_tokens" not in upstream.requests[-1]
    [event] = await gw.events("alice")
    assert (event.prompt_tokens, event.completion_tokens) == (6, 0)


async def test_max_tokens_is_clamped_to_what_is_left(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    gw.limit("everyone", "*", "tokens", "day", 40)
    key = gw.key("alice")
    estimate = gw.engine.counter.messages(MESSAGES, "demo-model")
    reply = gw.client(key).chat.completions.create(
        model="demo-model", messages=MESSAGES, max_tokens=1000
    )
    assert upstream.requests[-1]["max_tokens"] == 40 - estimate
    assert reply.choices[0].finish_reason in ("length", "stop")

    # max_completion_tokens is the field clamped when the client used it
    gw.limit("everyone", "*", "tokens", "day", 1_000)
    gw.client(key).chat.completions.create(
        model="demo-model", messages=MESSAGES, max_completion_tokens=5_000
    )
    sent = upstream.requests[-1]
    left = 1_000 - (await gw.events("alice"))[0].total_tokens
    assert sent["max_completion_tokens"] == left - estimate
    assert "max_tokens" not in sent


async def test_request_without_max_tokens_gets_the_default_budget(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    key = gw.key("alice")
    gw.client(key).chat.completions.create(model="demo-model", messages=MESSAGES)
    assert upstream.requests[-1]["max_tokens"] == gw.engine.settings.default_max_tokens


async def test_n_choices_reserve_for_every_choice(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    gw.limit("everyone", "*", "tokens", "day", 100)
    key = gw.key("alice")
    estimate = gw.engine.counter.messages(MESSAGES, "demo-model")
    gw.client(key).chat.completions.create(model="demo-model", messages=MESSAGES, n=3)
    assert upstream.requests[-1]["max_tokens"] == (100 - estimate) // 3


async def test_models_lists_what_the_key_may_use(gw: RunningGateway) -> None:
    everything = gw.client(gw.key("alice")).models.list()
    assert sorted(m.id for m in everything.data) == [
        "demo-embedding",
        "demo-model",
        "demo-model-large",
    ]
    limited = gw.client(gw.key("bob", models=["demo-model", "not-served"]))
    assert [m.id for m in limited.models.list().data] == ["demo-model"]
    assert limited.models.retrieve("demo-model").id == "demo-model"


async def test_channel_renames_models(upstream: RunningUpstream, tmp_path: Path) -> None:
    renamed = channel("renamed", upstream, {"house-model": "demo-model-large"})
    with running_gateway(tmp_path, [renamed]) as gw:
        key = gw.key("alice")
        reply = gw.client(key).chat.completions.create(
            model="house-model", messages=MESSAGES, max_tokens=2
        )
        assert reply.choices[0].message.content == words(2)
        assert upstream.requests[-1]["model"] == "demo-model-large"
        [event] = await gw.events("alice")
        assert event.model == "house-model"
