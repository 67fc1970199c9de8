"""A request over a limit gets OpenAI's 429: a body naming the limit, what was used and
when it resets, Retry-After, and the x-ratelimit-* headers of that limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from tests.gateway.harness import RunningGateway
from tests.support.upstream import RunningUpstream

MESSAGES = [{"role": "user", "content": "hello there"}]


def ask(gw: RunningGateway, key: str, max_tokens: int = 10) -> httpx.Response:
    return gw.http.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "demo-model", "messages": MESSAGES, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


async def test_daily_quota_refusal(gw: RunningGateway, upstream: RunningUpstream) -> None:
    # the prompt is estimated at 13 tokens (the demo reports 3): 13 + 10 fit in 25; after
    # the first call (3 + 10 used) the 12 left cannot hold the prompt and one more token
    gw.limit("user", "alice", "tokens", "day", 25)
    assert gw.engine.counter.messages(MESSAGES, "demo-model") == 13
    key = gw.key("alice")
    assert ask(gw, key, 10).status_code == 200
    used = (await gw.events("alice"))[0].total_tokens
    calls = len(upstream.requests)

    response = ask(gw, key, 30)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert error["message"].startswith("This request does not fit in your daily token allowance")
    assert f": {used:,} of 25 tokens used, {25 - used} left;" in error["message"]
    assert "It resets at 00:00 UTC (in " in error["message"]
    midnight = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    wait = int(response.headers["retry-after"])
    seconds_to_midnight = (
        datetime.fromisoformat(f"{midnight}T00:00:00+00:00") - datetime.now(UTC)
    ).total_seconds()
    assert abs(wait - seconds_to_midnight) < 5
    assert response.headers["x-ratelimit-limit-tokens"] == "25"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(25 - used)
    assert response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == calls  # the refused request never left
    assert len(await gw.events("alice")) == 1 and await gw.pending() == 0

    with pytest.raises(openai.RateLimitError) as caught:
        gw.client(key).chat.completions.create(
            model="demo-model",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=30,
        )
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["retry-after"] == response.headers["retry-after"]


async def test_requests_per_minute_is_a_rate_limit(gw: RunningGateway) -> None:
    gw.limit("key", "placeholder", "requests", "minute", 1)  # ignored: other key
    key = gw.key("alice")
    key_id = key.removeprefix("qg-").split("-")[0]
    gw.limit("key", key_id, "requests", "minute", 2)
    assert ask(gw, key).status_code == 200
    second = ask(gw, key)
    assert second.status_code == 200
    assert second.headers["x-ratelimit-limit-requests"] == "2"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    third = ask(gw, key)
    assert third.status_code == 429
    error = third.json()["error"]
    assert error["type"] == error["code"] == "rate_limit_exceeded"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in third.headers
