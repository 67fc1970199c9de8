"""Slow, silent and greedy clients cannot hold the gateway: real raw-socket clients against
the real gateway under uvicorn (the options `quotagate serve` uses, quotagate/gateway/protocol.py),
while a well-behaved client is served."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from quotagate.admin.cli import app
from quotagate.gateway.protocol import connection_cap
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.server_hardening_clients import Answer, RawClient, request_head
from tests.support.upstream import RunningUpstream, free_port

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 1
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 40
MODELS = ["demo-model"]
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def strict(upstream: RunningUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    """The gateway with short timeouts and small header limits."""
    with running_gateway(
        tmp_path,
        [channel("main", upstream, MODELS)],
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        keep_alive_timeout=KEEP_ALIVE,
        max_header_bytes=MAX_HEADER_BYTES,
        max_headers=MAX_HEADERS,
    ) as gw:
        yield gw


def port_of(gw: RunningGateway) -> int:
    return int(gw.root_url.rsplit(":", 1)[1])


def chat(gw: RunningGateway, key: str) -> str | None:
    reply = gw.client(key).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    content: str | None = reply.choices[0].message.content
    return content


def error_code(answer: Answer) -> str:
    error = orjson.loads(answer.body)["error"]
    assert error["message"] and error["type"]
    code: str = error["code"]
    return code


def chat_head(key: str, length: int) -> bytes:
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Content-Length": str(length),
    }
    return request_head("/v1/chat/completions", headers, "POST")


async def test_slow_header_clients_are_cut_while_a_normal_client_is_served(
    strict: RunningGateway,
) -> None:
    key = strict.key("alice")
    head = chat_head(key, 20)  # ~200 bytes: 20 s at a byte every 0.1 s
    opened = time.monotonic()
    slow = [await RawClient.open(port_of(strict)) for _ in range(20)]
    dribbling = [asyncio.create_task(c.dribble(head, 0.1)) for c in slow]
    assert await asyncio.to_thread(chat, strict, key)  # served while they dribble
    answers = await asyncio.gather(*(c.answer(timeout=HEADER_TIMEOUT + 5) for c in slow))
    for answer in answers:
        assert answer.status == 408 and error_code(answer) == "request_timeout"
        assert answer.headers["connection"] == "close"
        assert HEADER_TIMEOUT - 0.1 < answer.closed_at - opened < HEADER_TIMEOUT + 3
    assert not any(await asyncio.gather(*dribbling))  # cut off before they finished
    assert len(await strict.events("alice")) == 1 and await strict.pending() == 0


async def test_silent_and_idle_connections_are_closed(strict: RunningGateway) -> None:
    opened = time.monotonic()
    silent = [await RawClient.open(port_of(strict)) for _ in range(50)]
    kept = await RawClient.open(port_of(strict))
    assert await kept.send(request_head("/healthz"))
    asked = time.monotonic()
    # a new connection that never speaks is closed without an answer after header_timeout
    answers = await asyncio.gather(*(c.answer(timeout=HEADER_TIMEOUT + 5) for c in silent))
    for answer in answers:
        assert answer.raw == b""
        assert HEADER_TIMEOUT - 0.1 < answer.closed_at - opened < HEADER_TIMEOUT + 3
    # a kept-alive connection is closed keep_alive_timeout after its last answer
    answered = await kept.answer(timeout=KEEP_ALIVE + 5)
    assert answered.status == 200 and answered.body == b'{"status":"ok"}'
    assert KEEP_ALIVE - 0.1 < answered.closed_at - asked < KEEP_ALIVE + 3


async def test_the_next_request_on_a_kept_alive_connection_has_the_header_timeout(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    channels = [channel("main", upstream, MODELS)]
    with running_gateway(tmp_path, channels, header_timeout=1, body_timeout=6) as gw:
        client = await RawClient.open(port_of(gw))
        # a body slower than the header deadline moves the connection's timer to the later
        # body deadline; the next request's header deadline must still hold
        body = orjson.dumps(CHAT)
        assert await client.send(chat_head(gw.key("alice"), len(body)))
        await asyncio.sleep(1.3)
        assert await client.send(body)
        assert (await client.response()).status == 200
        begun = time.monotonic()
        dribbling = asyncio.create_task(client.dribble(request_head("/healthz"), 0.1))
        answer = await client.answer(timeout=8)
        assert answer.status == 408 and b"headers" in answer.body
        assert 0.9 < answer.closed_at - begun < 3.5  # not the body's deadline (6 s)
        assert not await dribbling


async def test_slow_body_clients_get_408_and_change_nothing(
    strict: RunningGateway, upstream: RunningUpstream
) -> None:
    key = strict.key("alice")
    body = orjson.dumps(CHAT)
    slow = [await RawClient.open(port_of(strict)) for _ in range(10)]
    for client in slow:
        assert await client.send(chat_head(key, len(body)))
    dribbling = [asyncio.create_task(c.dribble(body, 0.1)) for c in slow]
    answers = await asyncio.gather(*(c.answer(timeout=BODY_TIMEOUT + 5) for c in slow))
    for answer in answers:
        assert answer.status == 408 and error_code(answer) == "request_timeout"
        assert b"body" in answer.body
    assert not any(await asyncio.gather(*dribbling))
    assert upstream.requests == []
    assert await strict.events() == [] and await strict.pending() == 0
    assert await asyncio.to_thread(chat, strict, key)


async def test_a_slow_body_answered_before_it_arrived_is_closed_without_a_second_answer(
    strict: RunningGateway,
) -> None:
    body = orjson.dumps(CHAT)
    client = await RawClient.open(port_of(strict))
    assert await client.send(chat_head("qg-not-a-key", len(body)))
    dribbling = asyncio.create_task(client.dribble(body, 0.1))
    answer = await client.answer(timeout=BODY_TIMEOUT + 3)
    assert answer.status == 401
    assert answer.raw.count(b"HTTP/1.1 ") == 1  # the 401 only, then closed
    assert not await dribbling


async def test_huge_headers_get_431_after_at_most_the_limit_was_read(
    strict: RunningGateway,
) -> None:
    client = await RawClient.open(port_of(strict))
    assert await client.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    # 1 KiB at a time, until the gateway answers or hangs up (or ten times the limit)
    while client.sent < 10 * MAX_HEADER_BYTES:
        if not await client.send(b"a" * 1024) or not await client.is_open(0.02):
            break
    answer = await client.answer(timeout=5)
    assert answer.status == 431 and error_code(answer) == "request_header_fields_too_large"
    # the gateway never held more than the limit (and the read that crossed it)
    assert client.sent <= MAX_HEADER_BYTES + 4 * 1024
    # a request line of that size is refused alike
    client = await RawClient.open(port_of(strict))
    await client.send(b"GET /" + b"a" * (MAX_HEADER_BYTES + 1) + b" HTTP/1.1\r\n")
    assert (await client.answer(timeout=5)).status == 431


async def test_too_many_header_fields_get_431(strict: RunningGateway) -> None:
    client = await RawClient.open(port_of(strict))
    headers = {f"X-Field-{i}": "v" for i in range(MAX_HEADERS + 1)}
    assert await client.send(request_head("/healthz", headers))
    answer = await client.answer(timeout=5)
    assert answer.status == 431 and error_code(answer) == "request_header_fields_too_large"
    assert answer.headers["connection"] == "close"
    # at the limit, it is served
    client = await RawClient.open(port_of(strict))
    headers = {f"X-Field-{i}": "v" for i in range(MAX_HEADERS - 1)}  # and Host
    assert await client.send(request_head("/healthz", headers))
    assert (await client.response()).status == 200


async def test_large_headers_under_the_limit_with_a_large_body_in_one_write_are_served(
    strict: RunningGateway,
) -> None:
    """The bytes of a read that also carries the body do not count as headers."""
    key = strict.key("alice")
    body = orjson.dumps(
        {"model": "demo-model", "messages": [{"role": "user", "content": "word " * 40_000}]}
        | {"max_tokens": 3}
    )
    head = chat_head(key, len(body))
    head = head[:-2] + b"X-Padding: " + b"p" * (MAX_HEADER_BYTES - len(head) - 200) + b"\r\n\r\n"
    client = await RawClient.open(port_of(strict))
    assert await client.send(head + body)
    answer = await client.response()
    assert answer.status == 200, answer.raw[:300]


async def test_idle_connections_beyond_max_connections_make_room(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    limit = 20
    with running_gateway(
        tmp_path,
        [channel("main", upstream, MODELS)],
        max_connections=limit,
        header_timeout=60,  # no timeout comes to the rescue here
    ) as gw:
        key = gw.key("alice")
        port = port_of(gw)
        idle = [await RawClient.open(port) for _ in range(30)]
        slow = [await RawClient.open(port) for _ in range(10)]
        for client in slow:
            assert await client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.2)
        # a well-behaved client is served
        assert await asyncio.to_thread(chat, gw, key)
        response = await asyncio.to_thread(httpx.get, f"{gw.root_url}/healthz", timeout=5)
        assert response.status_code == 200
        still = [await c.is_open() for c in idle + slow]
        assert sum(still) <= limit - 1  # room was made for the well-behaved ones
        assert sum(still) >= limit - 4
        assert not any(still[:10])  # the ones that waited longest went first


async def test_a_new_connection_gets_503_when_every_connection_is_busy(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    upstream.knobs.first_byte_delay = 1.5
    with running_gateway(tmp_path, [channel("main", upstream, MODELS)], max_connections=3) as gw:
        key = gw.key("alice")
        body = orjson.dumps(CHAT)
        busy = [await RawClient.open(port_of(gw)) for _ in range(3)]
        for client in busy:
            assert await client.send(chat_head(key, len(body)) + body)
        await asyncio.sleep(0.3)
        refused = await RawClient.open(port_of(gw))
        answer = await refused.answer(timeout=3)
        assert answer.status == 503 and error_code(answer) == "too_many_connections"
        assert answer.headers["retry-after"] == "1"
        # the busy ones were not disturbed
        for client in busy:
            assert (await client.response()).status == 200
        assert len(await gw.settled(3, "alice")) == 3


def test_connection_cap_keeps_descriptors_for_accepting() -> None:
    assert connection_cap(1000, 20_000) == 1000
    assert connection_cap(1000, 1024) == (1024 - 64) // 2
    assert connection_cap(1000, 10) == 1


def test_serve_with_workers_under_a_low_descriptor_limit_stays_reachable(tmp_path: Path) -> None:
    """`quotagate serve --workers 2` with 160 descriptors per process: 400 idle connections
    would take every descriptor of both workers, and then no client could be accepted."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_CONFIG"] = str(tmp_path / "none.toml")
    env["QUOTAGATE_HEADER_TIMEOUT"] = "60"

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    script = str(Path(sys.executable).parent / "quotagate")
    server = subprocess.Popen(
        [script, "serve", "--port", str(port), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=few_descriptors,
    )
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        made = CliRunner().invoke(
            app, ["--database", str(tmp_path / "quotagate.db"), "keys", "create", "--user", "a"]
        )
        secret = made.stdout.strip().splitlines()[-1]

        idle.extend(socket.create_connection(("127.0.0.1", port)) for _ in range(400))
        time.sleep(0.5)
        with httpx.Client(timeout=5) as client:
            for _ in range(4):  # reaches both workers
                reply = client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                )
                assert reply.status_code == 200, reply.text
    finally:
        for client in idle:
            client.close()
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert "Traceback" not in err
    assert "max_connections lowered from 1000 to 48" in err
    access = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sum(a["path"] == "/v1/chat/completions" and a["status"] == 200 for a in access) == 4
