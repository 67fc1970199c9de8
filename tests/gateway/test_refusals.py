"""A request over a limit gets OpenAI's 429: a body naming the limit, what was used and
when it resets, Retry-After, and the x-ratelimit-* headers of that limit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest

from quotagate.gateway.ratelimit import duration
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream

BERLIN = ZoneInfo("Europe/Berlin")

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


# -- rate limit or quota, by the window's length ---------------------------------------------


@pytest.fixture
def berlin(upstream: RunningUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    """The gateway of a deployment in Berlin: calendar windows and resets in local time."""
    models = ["demo-model"]
    with running_gateway(
        tmp_path, [channel("main", upstream, models)], timezone="Europe/Berlin"
    ) as gateway:
        yield gateway


def refused_by_sdk(gw: RunningGateway, key: str, **extra: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        gw.client(key).chat.completions.create(
            model="demo-model",
            messages=MESSAGES,  # type: ignore[arg-type]
            **extra,
        )
    return caught.value


@pytest.mark.parametrize(
    ("window", "kind", "longest_wait"),
    [
        ("rolling:59m", "rate_limit_exceeded", 60 * 60),
        ("rolling:60m", "rate_limit_exceeded", 61 * 60),
        ("hour", "rate_limit_exceeded", 60 * 60),
        ("rolling:61m", "insufficient_quota", 62 * 60),
        ("day", "insufficient_quota", 25 * 3600),
    ],
)
def test_the_429_type_follows_the_windows_length(
    berlin: RunningGateway, window: str, kind: str, longest_wait: int
) -> None:
    """Up to an hour is a rate limit (the SDK may retry), longer is a quota (it must not),
    whether the window is written `hour`, `rolling:60m` or `rolling:59m`."""
    gw = berlin
    gw.limit("user", "alice", "tokens", window, 20)
    key = gw.key("alice")
    assert ask(gw, key, 5).status_code == 200  # 3 + 5 used, 12 left: 13 + 1 do not fit
    error = refused_by_sdk(gw, key, max_tokens=5)
    assert (error.type, error.code, error.param) == (kind, kind, None)
    headers = error.response.headers
    assert headers.get("x-should-retry") == (None if kind == "rate_limit_exceeded" else "false")
    wait = int(headers["retry-after"])
    assert 0 < wait <= longest_wait
    assert headers["x-ratelimit-limit-tokens"] == "20"
    assert headers["x-ratelimit-remaining-tokens"] == "12"
    assert headers["x-ratelimit-reset-tokens"] == duration(wait)
    assert isinstance(error.body, dict)
    assert error.body["message"].startswith("This request does not fit in your ")
    assert " Europe/Berlin (in " in error.body["message"]


# -- the message ---------------------------------------------------------------------------


def test_the_reset_is_told_in_the_configured_timezone(berlin: RunningGateway) -> None:
    berlin.limit("user", "alice", "tokens", "day", 5)
    error = refused_by_sdk(berlin, berlin.key("alice"))
    assert isinstance(error.body, dict)
    message = error.body["message"]
    now = berlin.clock()
    midnight = (now.astimezone(BERLIN) + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    assert "It resets at 00:00 Europe/Berlin (in " in message, message
    assert "UTC" not in message and "+00:00" not in message
    assert abs(int(error.response.headers["retry-after"]) - (midnight - now).total_seconds()) < 5


@pytest.mark.parametrize(
    ("limit", "name"),
    [
        (("user", "alice", "tokens", "day", 5), "your daily token allowance"),
        (("everyone", "*", "tokens", "week", 5), "your weekly token allowance"),
        (
            ("model", "demo-model", "tokens", "day", 5, {"per_user": False}),
            "the daily token cap of model demo-model, shared by everyone",
        ),
        (
            ("model", "demo-model", "tokens", "rolling:5h", 5, {"per_user": True}),
            "your 5-hour rolling token limit for model demo-model",
        ),
        (("channel", "main", "tokens", "hour", 5), "the hourly token capacity of upstream"),
    ],
)
def test_the_message_names_the_limit_in_words(
    gw: RunningGateway, limit: tuple[Any, ...], name: str
) -> None:
    *args, extra = limit if isinstance(limit[-1], dict) else (*limit, {})
    gw.limit(*args, **extra)
    error = refused_by_sdk(gw, gw.key("alice"), max_tokens=5)
    assert isinstance(error.body, dict)
    message = error.body["message"]
    assert message.startswith(f"This request does not fit in {name}"), message
    assert "allowance" not in message or "allowance" in name  # no catalog label
    assert "alice override" not in message and "per user" not in message


def test_a_key_request_limit_is_named_in_words(gw: RunningGateway) -> None:
    key = gw.key("alice")
    gw.limit("key", key.removeprefix("qg-").split("-")[0], "requests", "minute", 1)
    assert ask(gw, key).status_code == 200
    error = refused_by_sdk(gw, key, max_tokens=5)
    assert isinstance(error.body, dict)
    assert error.body["message"].startswith(
        "Your API key's per-minute request limit is used up: 1 of 1 requests used, 0 left. "
        "It resets at "
    ), error.body["message"]


async def test_needs_is_what_the_decision_refused(gw: RunningGateway) -> None:
    """Without max_tokens the reservation asks for default_max_tokens, but the request is
    admitted with far less: the prompt and min_output_tokens. That is what it "needs"."""
    gw.limit("user", "alice", "tokens", "day", 30)
    key = gw.key("alice")
    assert ask(gw, key, 14).status_code == 200  # 3 + 14 used: 13 left, the prompt is 13
    prompt = gw.engine.counter.messages(MESSAGES, "demo-model")
    error = refused_by_sdk(gw, key)  # no max_tokens: 2,048 asked for
    assert isinstance(error.body, dict)
    message = error.body["message"]
    assert f"13 left; this request needs at least {prompt + 1}." in message, message
    assert "2,061" not in message and "2,048" not in message
    # and that is exactly enough: one more token of room and the same request is admitted
    gw.limit("user", "alice", "tokens", "day", 31)
    reply = gw.client(key).chat.completions.create(
        model="demo-model",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 1


async def test_retrying_at_the_told_reset_of_a_rolling_window_succeeds(
    berlin: RunningGateway,
) -> None:
    """Three requests a minute apart; a large one needs the two oldest buckets to leave the
    rolling hour. The refusal says when that is (Retry-After, x-ratelimit-reset-tokens and
    the message, in Berlin time); a second earlier it is refused again, then it goes."""
    gw = berlin
    key = gw.key("alice")
    gw.limit("user", "alice", "tokens", "rolling:60m", 1_000_000)
    start = (gw.clock() + timedelta(minutes=1)).replace(second=0, microsecond=0)

    def at(moment: datetime) -> None:
        gw.clock.advance(seconds=(moment - gw.clock()).total_seconds())

    at(start + timedelta(seconds=5))
    assert ask(gw, key, 10).status_code == 200
    charged = (await gw.events("alice"))[0].total_tokens
    big = [{"role": "user", "content": " ".join(["word"] * 60)}]
    need = gw.engine.counter.messages(big, "demo-model") + 1
    amount = need + charged  # fits once two of the three small charges have left
    gw.limit("user", "alice", "tokens", "rolling:60m", amount)
    for minute in (1, 2):
        at(start + timedelta(minutes=minute, seconds=5))
        assert ask(gw, key, 10).status_code == 200
    assert [e.total_tokens for e in await gw.settled(3, "alice")] == [charged] * 3

    def big_ask() -> httpx.Response:
        return gw.http.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "demo-model", "messages": big, "max_tokens": 5},
            headers={"Authorization": f"Bearer {key}"},
        )

    at(start + timedelta(minutes=2, seconds=10))
    refused = big_ask()
    assert refused.status_code == 429
    fits = start + timedelta(minutes=1, seconds=60 + 3600)  # the 2nd bucket leaves
    told = (fits - (start + timedelta(minutes=2, seconds=10))).total_seconds()
    assert int(refused.headers["retry-after"]) == told
    assert refused.headers["x-ratelimit-reset-tokens"] == duration(told)
    message = refused.json()["error"]["message"]
    local = fits.astimezone(BERLIN).strftime("%H:%M")
    assert f"It has room for this request again at {local} Europe/Berlin (in 59 min 50 s)." in (
        message
    ), message
    assert f"this request needs at least {need}" in message

    at(fits - timedelta(seconds=1))
    early = big_ask()
    assert early.status_code == 429, early.text
    assert early.headers["retry-after"] == "1"
    at(fits)
    assert big_ask().status_code == 200
