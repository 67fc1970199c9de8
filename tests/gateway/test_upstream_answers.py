"""What the gateway makes of a misbehaving upstream's answers, seen from real clients.

The upstream is the raw asyncio server of tests/support/upstream_client_upstream.py:
it drops connections at every stage, echoes the channel's key in its errors, names its
account in its headers and sends gzip bombs. The clients are the real `openai` SDK.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream, free_port
from tests.support.upstream_client_upstream import RawUpstream, running_raw_upstream

SECRET = "sk-channel-secret-4f9a2b7c1d"
#: headers of the upstream that name its account, hosts or own limits (as it sends them)
PRIVATE = {
    "openai-organization": "org-hidden-account",
    "openai-project": "proj_hidden",
    "via": "1.1 edge-proxy.internal",
    "set-cookie": "session=abc; Path=/",
    "server": "gpu-box-17.internal",
    "x-ratelimit-remaining-tokens": "12345",
}


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    with running_raw_upstream() as up:
        yield up


def ask(client: openai.OpenAI, content: str, model: str = "m") -> object:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=20
    )
    return answer.choices[0].message.content


def admitted(gw: RunningGateway) -> float:
    text = gw.http.get(f"{gw.root_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("quotagate_admitted_total{")
    )


async def test_one_upstream_generation_per_admitted_request(tmp_path: Path) -> None:
    """Connections dropped at every stage, idle ones closed as they are reused, 40 clients
    at once: no request reaches the upstream twice, every answer has its one ledger row."""
    answering = ("ok", "stream", "mid-stream")  # the client gets a 200 (a stream may break)
    stages = (*answering, "before-read", "after-read", "after-status", "mid-body")
    count = 280
    with (
        running_raw_upstream(idle_timeout=0.05, idle_jitter=0.1) as up,
        running_gateway(
            tmp_path, [channel("raw", up.base_url, ["m"])], channel_failures=100_000
        ) as gw,
    ):
        keys = {f"t{number}": gw.key(f"t{number}") for number in range(count)}
        base = gw.async_client("unused")
        gate = asyncio.Semaphore(40)
        statuses: dict[str, int] = {}

        async def one(number: int) -> None:
            tag = f"t{number}"
            stage = stages[number % len(stages)]
            client = base.with_options(api_key=keys[tag])
            messages = [{"role": "user", "content": f"{stage} {tag}"}]
            async with gate:
                try:
                    if stage in ("stream", "mid-stream"):
                        stream = await client.chat.completions.create(
                            model="m", messages=messages, max_tokens=20, stream=True
                        )
                        statuses[tag] = 200
                        try:
                            async for _ in stream:
                                pass
                        except openai.APIError:
                            pass  # a stream the upstream broke off (still answered)
                    else:
                        await client.chat.completions.create(
                            model="m", messages=messages, max_tokens=20
                        )
                        statuses[tag] = 200
                except openai.APIStatusError as exc:
                    statuses[tag] = exc.status_code
                await asyncio.sleep(random.uniform(0, 0.02))

        await asyncio.gather(*(one(number) for number in range(count)))
        await base.close()
        events = await gw.settled(list(statuses.values()).count(200))
        assert await gw.pending() == 0
        assert admitted(gw) == count  # each request admitted once (one channel, no retry)

    generated = Counter(up.generations)
    assert max(generated.values()) == 1  # no request reached the upstream twice
    assert set(statuses.values()) <= {200, 502}
    rows = Counter(event.user_id for event in events)
    assert len(events) == list(statuses.values()).count(200)
    for tag, status in statuses.items():
        stage = stages[int(tag[1:]) % len(stages)]
        if status == 200:
            assert stage in answering
            assert (rows[tag], generated[tag]) == (1, 1), tag
        else:
            assert rows[tag] == 0, tag  # a failed attempt is not charged
            if stage in answering or stage == "before-read":
                assert generated[tag] == 0, tag  # it failed before the upstream read it
    for stage in answering:
        tags = [t for t in statuses if stages[int(t[1:]) % len(stages)] == stage]
        assert [statuses[t] for t in tags].count(200) > len(tags) / 2


async def test_answers_carry_their_own_upstream_headers(raw: RawUpstream, tmp_path: Path) -> None:
    with running_gateway(tmp_path, [channel("raw", raw.base_url, ["m"])]) as gw:
        client = gw.async_client(gw.key("alice"))
        gate = asyncio.Semaphore(40)

        async def one(number: int) -> tuple[str, dict[str, str]]:
            tag = f"req-{number}"
            stream = number % 10 == 0
            async with gate:
                raw_response = await client.chat.completions.with_raw_response.create(
                    model="m",
                    messages=[{"role": "user", "content": f"{'stream' if stream else 'ok'} {tag}"}],
                    max_tokens=20,
                    stream=stream,
                )
                parsed = raw_response.parse()
                if stream:
                    async for _ in parsed:  # type: ignore[union-attr]
                        pass
                return tag, dict(raw_response.headers)

        answers = await asyncio.gather(*(one(number) for number in range(400)))
        await client.close()
    for tag, headers in answers:
        assert headers.get("x-request-id") == tag  # its own, on every answer
        assert headers.get("openai-processing-ms") == "7"
        assert all(headers.get(name) != value for name, value in PRIVATE.items())
        assert "openai-organization" not in headers and "openai-project" not in headers


async def test_upstream_refusing_the_channel_key_is_502_without_the_key(
    raw: RawUpstream,
    upstream: RunningUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("RAW_KEY", SECRET)
    refusing = channel("refusing", raw.base_url, ["m", "demo-model"], api_key_env="RAW_KEY")
    caplog.set_level("INFO")
    with running_gateway(tmp_path, [refusing]) as gw:
        client = gw.client(gw.key("alice"))
        with pytest.raises(openai.APIStatusError) as refused:
            ask(client, "echo-401 a")
        assert await gw.pending() == 0 and await gw.events() == []
    error = refused.value
    assert error.status_code == 502  # the operator's problem, not the client's key
    body = error.response.text
    assert SECRET not in body and "127.0.0.1" not in body and str(raw.url) not in body
    assert error.response.json()["error"]["code"] == "upstream_error"
    assert "refused the gateway's credentials" in error.response.json()["error"]["message"]
    # the log says what happened, where, and what the upstream said — but not the key
    port = raw.base_url.rsplit(":", 1)[1].split("/")[0]
    logged = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert any(f"127.0.0.1:{port}" in line and "HTTP 401" in line for line in logged)
    assert any("Invalid key in authorization: bearer [redacted]" in line for line in logged)
    assert SECRET not in caplog.text

    # with another channel, the call moves on to it
    backup = channel("backup", upstream, ["demo-model"], priority=-1)
    (tmp_path / "2").mkdir()
    with running_gateway(tmp_path / "2", [refusing, backup]) as gw:
        assert ask(gw.client(gw.key("alice")), "echo-401 b", model="demo-model")
        assert [event.channel for event in await gw.events()] == ["backup"]


async def test_upstream_4xx_reaches_the_client_rewritten_and_scrubbed(
    raw: RawUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAW_KEY", SECRET)
    keyed = channel("raw", raw.base_url, ["m"], api_key_env="RAW_KEY")
    with running_gateway(tmp_path, [keyed]) as gw:
        client = gw.client(gw.key("alice"))
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, "echo-400 a")
        assert await gw.pending() == 0 and await gw.events() == []  # not charged
    response = refused.value.response
    assert SECRET not in response.text
    assert set(response.headers) >= {"x-request-id"}
    assert "openai-organization" not in response.headers
    error = response.json()["error"]
    assert error["message"].startswith("You sent authorization: bearer [redacted]. This context")
    assert len(error["message"]) == 1000  # capped
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )


async def test_the_providers_429_is_the_gateways_words(raw: RawUpstream, tmp_path: Path) -> None:
    with running_gateway(tmp_path, [channel("raw", raw.base_url, ["m"])]) as gw:
        client = gw.client(gw.key("alice"))
        with pytest.raises(openai.RateLimitError) as limited:
            ask(client, "limit-429 a")  # the provider's rate limit: retry shortly
        with pytest.raises(openai.APIStatusError) as out:
            ask(client, "quota-429 b")  # the provider account has run out: the operator's
        assert await gw.pending() == 0 and await gw.events() == []
    response = limited.value.response
    assert "org-hidden-account" not in response.text
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "2"
    assert out.value.status_code == 502
    assert "org-hidden-account" not in out.value.response.text
    assert out.value.response.json()["error"]["message"] == (
        "The upstream failed: channel raw has no quota left at the provider (HTTP 429)."
    )


async def test_502_names_no_internal_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    caplog.set_level("INFO")
    dead = channel("dead", f"http://127.0.0.1:{port}/v1", ["m"])
    with running_gateway(tmp_path, [dead]) as gw, pytest.raises(openai.APIStatusError) as failed:
        ask(gw.client(gw.key("alice")), "ok a")
    assert failed.value.status_code == 502
    message = failed.value.response.json()["error"]["message"]
    assert message == "The upstream failed: channel dead could not be reached."
    assert f"127.0.0.1:{port}" in caplog.text  # the operator's log has it


async def test_a_gzip_bomb_is_a_clean_502(raw: RawUpstream, tmp_path: Path) -> None:
    with running_gateway(
        tmp_path, [channel("raw", raw.base_url, ["m"])], max_upstream_body_bytes=1 << 20
    ) as gw:
        client = gw.client(gw.key("alice"))
        assert ask(client, "gzip small 200000") == "hello"
        with pytest.raises(openai.APIStatusError) as failed:
            ask(client, "gzip bomb 20000000")  # 20 KB on the wire, 20 MB inflated
        assert failed.value.status_code == 502
        assert "larger than the gateway accepts" in failed.value.response.text
        assert len(await gw.events()) == 1 and await gw.pending() == 0


async def test_readyz_names_channels_only_to_key_holders(gw: RunningGateway) -> None:
    url = f"{gw.root_url}/readyz"
    anonymous = gw.http.get(url).json()
    assert anonymous == {"status": "ready", "channels": 1, "resting": 0}
    wrong = gw.http.get(url, headers={"Authorization": "Bearer qg-wrong"})
    assert (wrong.status_code, wrong.json()) == (200, anonymous)  # a probe, not an error
    known = gw.http.get(url, headers={"Authorization": f"Bearer {gw.key('alice')}"}).json()
    assert known == {**anonymous, "channel_names": ["main"], "resting_names": []}
