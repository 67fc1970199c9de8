"""Many streaming clients of one user at once: strict mode never lets the user's daily
usage pass the limit, and the ledger equals the usage the upstream reported."""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.gateway.harness import RunningGateway
from tests.support.upstream import RunningUpstream

CLIENTS = 40
LIMIT = 600


async def test_forty_streams_of_one_user_stay_within_the_limit(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    gw.limit("user", "carol", "tokens", "day", LIMIT)
    upstream.knobs.chunk_delay = 0.005  # keep the streams overlapping
    key = gw.key("carol")
    client = gw.async_client(key)
    reported: list[tuple[int, int]] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        try:
            stream = await client.chat.completions.create(
                model="demo-model",
                messages=[{"role": "user", "content": f"tell me story number {i}"}],
                max_tokens=30,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage: Any = None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
            assert usage is not None
            reported.append((usage.prompt_tokens, usage.completion_tokens))
        except openai.RateLimitError:
            refused += 1

    await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    await client.close()

    assert refused > 0 and reported  # the limit was really contended
    assert refused + len(reported) == CLIENTS
    events = await gw.settled(len(reported), "carol")
    total = sum(e.total_tokens for e in events)
    assert total <= LIMIT
    assert sorted((e.prompt_tokens, e.completion_tokens) for e in events) == sorted(reported)
    assert await gw.pending() == 0
    counters = await gw.counters()
    [(used, reserved)] = [v for k, v in counters.items() if k.startswith("a|tokens|carol|")]
    assert (used, reserved) == (total, 0)
