"""Routing over channels: caps that drop a channel out until its window resets, pinning,
failover on 5xx and refused connections, cool-down, priorities and weights."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream, free_port, running_upstream

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def second() -> Iterator[RunningUpstream]:
    with running_upstream() as up:
        yield up


def ask(gw: RunningGateway, key: str, max_tokens: int = 5, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **extra.pop("headers", {})}
    return gw.http.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "demo-model", "messages": MESSAGES, "max_tokens": max_tokens, **extra},
        headers=headers,
        timeout=10,
    )


async def test_channel_at_its_daily_cap_drops_out_until_the_next_day(
    upstream: RunningUpstream, second: RunningUpstream, tmp_path: Path
) -> None:
    channels = [
        channel("capped", upstream, ["demo-model"], priority=10, daily_token_cap=60),
        channel("spare", second, ["demo-model"]),
    ]
    with running_gateway(tmp_path, channels) as gw:
        key = gw.key("alice")
        served = []
        for _ in range(8):
            response = ask(gw, key, max_tokens=10)
            assert response.status_code == 200
            served.append((await gw.events())[-1].channel)
        # the capped channel took requests until its cap could not hold another one
        switched = served.index("spare")
        assert switched > 0 and set(served[:switched]) == {"capped"}
        assert set(served[switched:]) == {"spare"}
        events = await gw.events()
        assert sum(e.total_tokens for e in events if e.channel == "capped") <= 60
        calls = len(upstream.requests)

        gw.clock.next_day()
        assert ask(gw, key, max_tokens=10).status_code == 200
        assert (await gw.events())[-1].channel == "capped"
        assert len(upstream.requests) == calls + 1


async def test_pinned_channel_at_its_cap_gets_429(
    upstream: RunningUpstream, second: RunningUpstream, tmp_path: Path
) -> None:
    channels = [
        channel("small", upstream, ["demo-model"], rpm=1),
        channel("big", second, ["demo-model"]),
    ]
    with running_gateway(tmp_path, channels) as gw:
        key = gw.key("alice")
        pin = {"X-QuotaGate-Channel": "small"}
        assert ask(gw, key, headers=pin).status_code == 200
        refused = ask(gw, key, headers=pin)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "channel small" in error["message"]
        assert int(refused.headers["retry-after"]) <= 60
        # unpinned, the same request goes to the channel with room
        assert ask(gw, key).status_code == 200
        assert [e.channel for e in await gw.events()] == ["small", "big"]
        unknown = ask(gw, key, headers={"X-QuotaGate-Channel": "nope"})
        assert unknown.status_code == 404


async def test_failover_on_5xx_before_any_byte(
    upstream: RunningUpstream, second: RunningUpstream, tmp_path: Path
) -> None:
    channels = [
        channel("first", upstream, ["demo-model"], priority=1),
        channel("backup", second, ["demo-model"]),
    ]
    upstream.knobs.fail_status = 503
    with running_gateway(tmp_path, channels) as gw:
        key = gw.key("alice")
        assert ask(gw, key).status_code == 200
        with ask_stream(gw, key) as response:
            assert response.status_code == 200
            assert response.read().endswith(b"data: [DONE]\n\n")
        assert len(upstream.requests) == 2 and len(second.requests) == 2
        events = await gw.events()
        assert [e.channel for e in events] == ["backup", "backup"]
        assert await gw.pending() == 0  # the failed attempts' tickets were cancelled


def ask_stream(gw: RunningGateway, key: str) -> Any:
    return gw.http.stream(
        "POST",
        f"{gw.base_url}/chat/completions",
        json={"model": "demo-model", "messages": MESSAGES, "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


async def test_failover_on_connection_refused(second: RunningUpstream, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    channels = [
        channel("dead", dead, ["demo-model"], priority=1),
        channel("alive", second, ["demo-model"]),
    ]
    with running_gateway(tmp_path, channels) as gw:
        response = ask(gw, gw.key("alice"))
        assert response.status_code == 200
        assert [e.channel for e in await gw.events()] == ["alive"]


async def test_all_channels_down_is_502_and_charges_nothing(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    upstream.knobs.fail_status = 500
    with running_gateway(tmp_path, [channel("only", upstream, ["demo-model"])]) as gw:
        response = ask(gw, gw.key("alice"))
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["type"] == "server_error" and "HTTP 500" in error["message"]
        assert await gw.events() == [] and await gw.pending() == 0


async def test_upstream_4xx_is_passed_through_uncharged(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    upstream.knobs.fail_status = 400
    response = ask(gw, gw.key("alice"))
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Demo upstream failing with 400."
    assert await gw.events() == [] and await gw.pending() == 0


async def test_failing_channel_rests_then_comes_back(
    upstream: RunningUpstream, second: RunningUpstream, tmp_path: Path
) -> None:
    channels = [
        channel("flaky", upstream, ["demo-model"], priority=1),
        channel("steady", second, ["demo-model"]),
    ]
    upstream.knobs.fail_status = 502
    with running_gateway(
        tmp_path, channels, channel_failures=2, channel_cooldown_seconds=0.6
    ) as gw:
        key = gw.key("alice")
        for _ in range(2):
            assert ask(gw, key).status_code == 200
        assert len(upstream.requests) == 2  # two failures: flaky now rests
        for _ in range(3):
            assert ask(gw, key).status_code == 200
        assert len(upstream.requests) == 2  # not tried while resting
        auth = {"Authorization": f"Bearer {key}"}  # names only for a caller with a key
        ready = gw.http.get(f"{gw.root_url}/readyz", headers=auth).json()
        assert ready["resting_names"] == ["flaky"]

        time.sleep(0.7)
        upstream.knobs.fail_status = None  # healed
        assert ask(gw, key).status_code == 200
        assert len(upstream.requests) == 3  # tried again after the cool-down
        assert (await gw.events())[-1].channel == "flaky"


async def test_every_channel_resting_is_503(upstream: RunningUpstream, tmp_path: Path) -> None:
    upstream.knobs.fail_status = 500
    with running_gateway(
        tmp_path,
        [channel("only", upstream, ["demo-model"])],
        channel_failures=1,
        channel_cooldown_seconds=30,
    ) as gw:
        key = gw.key("alice")
        assert ask(gw, key).status_code == 502
        resting = ask(gw, key)
        assert resting.status_code == 503
        assert resting.json()["error"]["code"] == "upstream_unavailable"
        assert 1 <= int(resting.headers["retry-after"]) <= 31


async def test_priority_then_weight(
    upstream: RunningUpstream, second: RunningUpstream, tmp_path: Path
) -> None:
    with running_upstream() as low:
        channels = [
            channel("heavy", upstream, ["demo-model"], priority=5, weight=3),
            channel("light", second, ["demo-model"], priority=5, weight=1),
            channel("low", low, ["demo-model"], priority=0),
        ]
        with running_gateway(tmp_path, channels) as gw:
            key = gw.key("alice")
            for _ in range(60):
                assert ask(gw, key, max_tokens=1).status_code == 200
            assert low.requests == []
            heavy, light = len(upstream.requests), len(second.requests)
            assert heavy + light == 60
            assert light > 0 and heavy > 1.5 * light


async def test_upstream_key_is_sent_and_never_shown(
    upstream: RunningUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-upstream-very-secret-123"
    monkeypatch.setenv("DEMO_UPSTREAM_KEY", secret)
    upstream.knobs.api_key = secret
    config = channel("keyed", upstream, ["demo-model"], api_key_env="DEMO_UPSTREAM_KEY")
    caplog.set_level("INFO")
    with running_gateway(tmp_path, [config]) as gw:
        key = gw.key("alice")
        assert ask(gw, key).status_code == 200  # the demo upstream checks the key
        upstream.knobs.fail_status = 500
        assert ask(gw, key).status_code == 502
        ready = gw.http.get(f"{gw.root_url}/readyz").text
        shown = [ready, repr(gw.gateway.router.channels), caplog.text]
    assert all(secret not in text for text in shown)
    assert all(key not in text for text in shown)
    assert '"user":"alice"' in caplog.text  # the access log did run
