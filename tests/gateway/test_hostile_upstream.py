"""Strict mode against an upstream that misbehaves on the accounting (issue 8, §1): one
that ignores max_tokens and streams forever, one that reports no usage, one that reports
more than it was given room for, one that fails half way through a stream. Real servers
on loopback, the real `openai` SDK; whatever the upstream does, no counter passes its
amount, the ledger keeps the truth, and `reconcile` finds nothing to repair."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from typer.testing import CliRunner

from quotagate.admin.cli import app
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.stream_budget_upstream import (
    WORD,
    HostileUpstream,
    Knobs,
    running_hostile_upstream,
)

MESSAGES: list[Any] = [{"role": "user", "content": "tell me everything"}]
MODEL = "demo-model"  # no tiktoken encoding: the offline estimate counts, and errs high


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    with running_hostile_upstream() as upstream:
        yield upstream


@pytest.fixture
def gw(hostile: HostileUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(
        tmp_path, [channel("main", hostile.base_url, [MODEL])], upstream_timeout=1.0
    ) as gateway:
        yield gateway


async def usage(gw: RunningGateway, *args: str) -> str:
    """`quotagate usage` on the gateway's database (in a thread: it runs its own loop)."""
    command = ["--database", gw.reader.path, "usage", *args]
    result = await asyncio.to_thread(CliRunner().invoke, app, command)
    assert result.exit_code == 0, result.output
    return result.stdout


async def assert_counters_within(gw: RunningGateway, amount: int) -> None:
    for key, (used, reserved) in (await gw.counters()).items():
        assert used + reserved <= amount, key


async def assert_reconciled(gw: RunningGateway) -> None:
    assert await gw.reader.reconcile(repair=False) == []


def reserved_prompt(gw: RunningGateway) -> int:
    return gw.engine.counter.messages(MESSAGES, MODEL)


# -- 1.1 a stream past the budget ---------------------------------------------------------


async def test_an_upstream_ignoring_max_tokens_is_cut_at_the_budget(
    gw: RunningGateway, hostile: HostileUpstream
) -> None:
    hostile.knobs = Knobs(ignore_max_tokens=True, delay=0.005)
    gw.limit("everyone", "*", "tokens", "day", 100_000)
    key = gw.key("mallory")
    client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=5)
    chunks = []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    ):
        chunks.append(chunk)
        assert len(chunks) < 100, "the gateway forwards past the budget"
    ended = time.monotonic()
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(t or "" for t in texts) == WORD * 10  # the budget, no more
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None  # asked for: what was charged, as the last chunk
    # the gateway closed the upstream's connection, which stops the generation
    [served] = hostile.served
    deadline = time.monotonic() + 2
    while served.closed_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert served.closed_at is not None and served.closed_at - ended < 1.0
    assert served.events < 40
    [event] = await gw.settled(1, "mallory")
    assert event.estimated
    assert event.prompt_tokens == reserved_prompt(gw)
    assert event.completion_tokens == 10  # the estimate says 60, the ticket allowed 10
    assert chunks[-1].usage.completion_tokens == event.completion_tokens
    assert all(amount <= event.prompt_tokens + 10 for _, amount in event.charges)
    assert event.excess == 0
    assert await gw.pending() == 0
    await assert_reconciled(gw)


async def test_the_cut_stream_ends_like_one_that_hit_its_limit(
    gw: RunningGateway, hostile: HostileUpstream
) -> None:
    """On the wire: the events that fit, a chunk with finish_reason "length", [DONE]."""
    hostile.knobs = Knobs(ignore_max_tokens=True, delay=0.002)
    key = gw.key("mallory")
    with gw.http.stream(
        "POST",
        f"{gw.base_url}/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=5,
    ) as response:
        wire = b""
        for data in response.iter_raw():
            wire += data
            assert wire.count(b"\n\n") < 100, "the gateway forwards past the budget"
        events = [e for e in wire.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    last = orjson.loads(events[-2].removeprefix(b"data: "))
    assert last["id"] == "chatcmpl-hostile" and last["object"] == "chat.completion.chunk"
    assert last["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    content = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert sum(1 for c in content if c["choices"][0]["delta"].get("content")) == 5
    assert not any(c.get("usage") for c in content)  # not asked for: none made up


async def test_an_upstream_keeping_to_max_tokens_is_never_cut(
    gw: RunningGateway, hostile: HostileUpstream
) -> None:
    """The budget counts events, not the (high) estimate: an honest answer arrives whole,
    with the upstream's own end and usage, though the estimate counts 6× its tokens."""
    hostile.knobs = Knobs(tokens=50)
    key = gw.key("olga")
    chunks = list(
        gw.client(key).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == WORD * 50
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    [event] = await gw.settled(1, "olga")
    assert chunks[-1].usage is not None
    assert not event.estimated and event.completion_tokens == 50
    assert hostile.served[0].finished


# -- 1.2 usage the gateway counts itself -----------------------------------------------------


async def test_no_usage_from_the_upstream_never_passes_the_limit(
    gw: RunningGateway, hostile: HostileUpstream
) -> None:
    """Streams and plain answers, four at a time, until the allowance refuses: the
    estimate (6 tokens a word) never charges more than a ticket allowed."""
    limit = 2_000
    hostile.knobs = Knobs(usage="none", tokens=30)
    gw.limit("everyone", "*", "tokens", "day", limit)
    client = gw.async_client(gw.key("nina"))

    async def one(stream: bool) -> int:
        """Tokens delivered (one a word), or -1 once refused."""
        try:
            if stream:
                chunks = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=40, stream=True
                )
                text = "".join([c.choices[0].delta.content or "" async for c in chunks])
            else:
                reply = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=40
                )
                text = reply.choices[0].message.content or ""
        except openai.RateLimitError:
            return -1
        await assert_counters_within(gw, limit)
        return text.count(WORD)

    delivered = 0
    for _ in range(40):
        got = await asyncio.gather(*(one(stream=i % 2 == 0) for i in range(4)))
        delivered += sum(n for n in got if n > 0)
        if -1 in got:
            break
    else:
        pytest.fail("never refused")
    events = await gw.events("nina")
    prompt = reserved_prompt(gw)
    assert delivered + prompt * len(events) <= limit
    assert sum(e.total_tokens for e in events) <= limit
    for event in events:
        assert event.estimated
        assert event.prompt_tokens == prompt  # as reserved: the upstream never said
    # each answer's completion within what its ticket allowed (the max_tokens sent up)
    budgets = sorted(served.body["max_tokens"] for served in hostile.served)
    completions = sorted(event.completion_tokens for event in events)
    assert len(budgets) == len(completions)
    assert all(c <= b for c, b in zip(completions, budgets))
    await assert_counters_within(gw, limit)
    await assert_reconciled(gw)


# -- 1.3 an upstream reporting more than the reservation ------------------------------------


async def test_over_reported_usage_is_recorded_not_charged_past_the_limit(
    gw: RunningGateway, hostile: HostileUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 1_000
    hostile.knobs = Knobs(usage="over", tokens=40, over_prompt=50, over_completion=20)
    gw.limit("everyone", "*", "tokens", "day", limit)
    client = gw.client(gw.key("oscar"))
    caplog.set_level(logging.WARNING, "quotagate.engine")
    for count in range(60):
        try:
            if count % 2:
                reply = client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=40
                )
                assert reply.usage is not None
            else:
                for _ in client.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    max_tokens=40,
                    stream=True,
                    stream_options={"include_usage": True},
                ):
                    pass
        except openai.RateLimitError:
            break
        await assert_counters_within(gw, limit)
    else:
        pytest.fail("never refused")
    events = await gw.events("oscar")
    prompt = reserved_prompt(gw)
    assert len(events) >= 5
    for event in events:
        # the truth as the upstream reported it, and what it was over the reservation
        assert not event.estimated
        assert event.prompt_tokens == len(MESSAGES[0]["content"].split()) + 1 + 50
        assert event.excess == (event.prompt_tokens - prompt) + 20
        assert sum(amount for _, amount in event.charges) < event.total_tokens
    assert "(prompt and completion over)" in caplog.text
    await assert_counters_within(gw, limit)
    await assert_reconciled(gw)

    [row] = json.loads(await usage(gw, "--format", "json"))
    assert row["excess"] == sum(e.excess for e in events) > 0
    table = await usage(gw)
    assert "excess" in table and f"{row['excess']:,}" in table


async def test_only_the_part_that_was_over_is_named(
    gw: RunningGateway, hostile: HostileUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    gw.limit("everyone", "*", "tokens", "day", 10_000)
    client = gw.client(gw.key("pia"))
    caplog.set_level(logging.WARNING, "quotagate.engine")
    # the upstream counts the prompt as reserved (4 words + 11), and 7 more completion tokens
    hostile.knobs = Knobs(usage="over", tokens=5, over_prompt=11, over_completion=7)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert "(completion over)" in caplog.text and "prompt over" not in caplog.text
    caplog.clear()
    hostile.knobs = Knobs(usage="over", tokens=5, over_prompt=500)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert "(prompt over)" in caplog.text and "completion over" not in caplog.text
    first, second = sorted(await gw.events("pia"), key=lambda e: e.settled_at)
    assert (first.prompt_tokens, first.completion_tokens, first.excess) == (15, 12, 7)
    assert second.excess == second.prompt_tokens - reserved_prompt(gw)


# -- 1.6 a stream that fails half way --------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [Knobs(tokens=20, drop_after=3), Knobs(tokens=20, delay=3.0)],
    ids=["connection dropped", "timed out"],
)
async def test_a_failure_mid_stream_reaches_the_client_as_an_error(
    gw: RunningGateway, hostile: HostileUpstream, knobs: Knobs
) -> None:
    hostile.knobs = knobs
    key = gw.key("quinn")
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in gw.client(key).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=20, stream=True
        ):
            received.append(chunk.choices[0].delta.content or "")
    assert "upstream failed" in raised.value.message
    assert isinstance(raised.value.body, dict) and raised.value.body["type"] == "server_error"
    text = "".join(received)
    assert 0 < text.count(WORD) < 20
    [event] = await gw.settled(1, "quinn")
    assert event.estimated
    assert event.prompt_tokens == reserved_prompt(gw)
    assert event.completion_tokens == min(20, gw.engine.counter.text(text, MODEL))
    assert await gw.pending() == 0
    await assert_reconciled(gw)
