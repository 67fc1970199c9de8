"""A request several limits refuse at once is told about the one that frees up last.

It fits again only once every refusing limit has room, so naming the first one found
(an hourly allowance, a key's per-minute limit) sends the client back too early, as a
rate limit to retry, while a weekly or daily limit is used up.
"""

from __future__ import annotations

import httpx

from tests.gateway.harness import RunningGateway

MESSAGES = [{"role": "user", "content": "hello there"}]


def ask(gw: RunningGateway, key: str, max_tokens: int) -> httpx.Response:
    return gw.http.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "demo-model", "messages": MESSAGES, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


async def test_hourly_and_weekly_used_up_together_tell_the_week(gw: RunningGateway) -> None:
    # the prompt counts 13 (the demo reports 3): after 3 + 10 the 12 left in either limit
    # cannot hold the prompt and one more token
    gw.limit("user", "alice", "tokens", "hour", 25)
    gw.limit("user", "alice", "tokens", "week", 25)
    key = gw.key("alice")
    assert ask(gw, key, 10).status_code == 200

    refused = ask(gw, key, 30)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["message"].startswith("This request does not fit in your weekly token")
    assert error["type"] == error["code"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false"
    assert int(refused.headers["retry-after"]) > 3600  # not the end of this hour


async def test_a_keys_minute_limit_and_a_used_up_day_tell_the_day(gw: RunningGateway) -> None:
    key = gw.key("alice")
    gw.limit("key", key.removeprefix("qg-").split("-")[0], "requests", "minute", 1)
    gw.limit("user", "alice", "tokens", "day", 25)
    assert ask(gw, key, 10).status_code == 200

    refused = ask(gw, key, 30)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["message"].startswith("This request does not fit in your daily token")
    assert error["code"] == "insufficient_quota"
