"""The gateway's HTTP client against hand-written servers on loopback: the framings a
provider may use, a keep-alive connection the provider closed, timeouts, TLS, connections
dropped at every stage (a POST is never sent twice), headers under concurrency, size caps.

Each server here is a few lines of asyncio that answer with exact bytes (or the raw
upstream of tests/support/upstream_client_upstream.py, on a loop of its own), so the test
controls what a real client library would smooth over.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import socket
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from quotagate.gateway.upstream import UpstreamClient, UpstreamFailure
from tests.support.upstream_client_upstream import body_for, completion, running_raw_upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def test_keep_alive_reuse_and_a_connection_the_server_closed() -> None:
    connections = 0
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):  # two answers per connection, then close without warning
            requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    client = UpstreamClient(read_timeout=5)
    async with serve(handler) as url:
        bodies = []
        for _ in range(3):
            response = await client.post(url, b'{"a":1}', "sk-up")
            bodies.append(await response.read())
            await asyncio.sleep(0.05)  # let the close arrive (or not) before the next call
        assert bodies == [b"ok"] * 3
        assert connections == 2  # reused once, then a fresh connection after the close
        assert requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer sk-up\r\n" in requests[0]
        assert requests[0].endswith(b'\r\n\r\n{"a":1}')
    await client.close()


async def test_reused_connection_closed_under_a_request_is_not_sent_again() -> None:
    connections = 0
    received = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, received
        connections += 1
        await read_request(reader)
        received += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # the next request arrives as the server gives up on the connection: read, never
        # answered (what an idle-timeout race, or a crash, looks like to the client)
        await read_request(reader)
        received += 1
        writer.close()

    client = UpstreamClient(read_timeout=5)
    async with serve(handler) as url:
        assert await (await client.post(url, b"{}", None)).read() == b"ok"
        # the upstream read the request: it may be generating, so it is never sent again
        with pytest.raises(UpstreamFailure, match="closed the connection"):
            await client.post(url, b"{}", None)
        assert (connections, received) == (1, 2)
        assert await (await client.post(url, b"{}", None)).read() == b"ok"  # a new one
        assert (connections, received) == (2, 3)
    await client.close()


async def test_chunked_close_delimited_and_gzip_bodies() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n"
        b"\r\n5\r\ndata:\r\n3\r\n 1\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
        % len(gzip.compress(b'{"usage":{}}'))
        + gzip.compress(b'{"usage":{}}'),
        b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"until": "close"}',
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    client = UpstreamClient(read_timeout=5)
    async with serve(handler) as url:
        stream = await client.post(url, b"{}", None)
        assert stream.content_type == b"text/event-stream"
        assert b"".join([chunk async for chunk in stream.chunks()]) == b"data: 1\n"
        zipped = await client.post(url, b"{}", None)
        assert await zipped.read() == b'{"usage":{}}'
        assert all(name != b"content-encoding" for name, _ in zipped.headers())
        assert await (await client.post(url, b"{}", None)).read() == b'{"until": "close"}'
    await client.close()


async def test_truncated_body_and_timeouts_fail() -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    client = UpstreamClient(read_timeout=0.3)
    async with serve(truncated) as url:
        response = await client.post(url, b"{}", None)
        with pytest.raises(UpstreamFailure):
            await response.read()
    async with serve(silent) as url:
        with pytest.raises(UpstreamFailure, match="timed out"):
            await client.post(url, b"{}", None)
    await client.close()


async def test_tls_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
        await writer.drain()

    async with serve(handler, server_tls) as url:
        with pytest.raises(UpstreamFailure):  # an unknown certificate is refused
            await UpstreamClient().post(url, b"{}", None)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how an operator trusts its own CA
        client = UpstreamClient()
        assert await (await client.post(url, b"{}", None)).read() == b"secure"
        await client.close()


async def test_a_request_the_upstream_read_is_never_sent_again() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5)
        for stage in ("after-read", "after-status", "mid-body"):
            await (await client.post(up.url, body_for("ok", f"pooled-{stage}"), None)).read()
            with pytest.raises(UpstreamFailure):  # on the pooled connection
                await (await client.post(up.url, body_for(stage, stage), None)).read()
        await client.close()
    assert sorted(Counter(up.generations).values()) == [1] * 6


async def test_pooled_connections_the_upstream_closed_are_not_written_to() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5)
        answers = await asyncio.gather(
            *(client.post(up.url, body_for("ok", f"p{i}"), None) for i in range(3))
        )
        for answer in answers:
            await answer.read()
        assert up.connections == 3  # all three now idle in the pool
        up.close_idle()
        time.sleep(0.1)  # this loop is busy: the FINs wait unread in the sockets
        response = await client.post(up.url, body_for("ok", "after"), None)
        assert await response.read() == completion("after")
        assert up.connections == 4  # a new connection, not one of the closed ones
        await client.close()
    assert sorted(up.generations) == ["after", "p0", "p1", "p2"]


async def test_a_write_that_finds_the_connection_dead_goes_again_on_a_new_one() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5)
        answers = await asyncio.gather(
            *(client.post(up.url, body_for("ok", f"p{i}"), None) for i in range(2))
        )
        for answer in answers:
            await answer.read()
        # both pooled connections die on our side in a way only a write notices: the
        # send fails at once (EPIPE), so no byte of the request left
        for pooled in [c for idle in client._idle.values() for c in idle]:
            assert pooled.transport is not None
            fd = pooled.transport.get_extra_info("socket").fileno()
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_WR)
        response = await client.post(up.url, body_for("ok", "again"), None)
        assert await response.read() == completion("again")
        assert up.connections == 3  # once more on a new connection, not the other pooled one
        await client.close()
    assert sorted(up.generations) == ["again", "p0", "p1"]


async def test_drops_at_every_stage_under_concurrency_never_generate_twice() -> None:
    answering = ("ok", "stream")
    stages = (*answering, "before-read", "after-read", "after-status", "mid-body", "mid-stream")
    outcomes: dict[str, tuple[str, str]] = {}
    # idle connections are closed after 5-25 ms: reuse races the close all the time
    with running_raw_upstream(idle_timeout=0.005, idle_jitter=0.02) as up:
        client = UpstreamClient(read_timeout=5)
        gate = asyncio.Semaphore(40)

        async def one(number: int) -> None:
            stage = stages[number % len(stages)]
            tag = f"t{number}"
            async with gate:
                try:
                    response = await client.post(up.url, body_for(stage, tag), None)
                    async for _ in response.chunks():
                        pass
                    outcomes[tag] = (stage, "answered")
                except UpstreamFailure:
                    outcomes[tag] = (stage, "failed")
                await asyncio.sleep(random.uniform(0, 0.02))

        await asyncio.gather(*(one(number) for number in range(350)))
        await client.close()
    generated = Counter(up.generations)
    assert set(generated) <= set(outcomes)
    assert max(generated.values()) == 1  # nothing was sent twice
    for tag, (stage, outcome) in outcomes.items():
        if stage in answering:
            # answered once, or failed on a connection closed before it was read
            assert generated[tag] == (1 if outcome == "answered" else 0), (tag, stage)
        else:
            assert outcome == "failed", (tag, stage)
            if stage == "before-read":
                assert generated[tag] == 0
    answerable = [outcome for stage, outcome in outcomes.values() if stage in answering]
    assert answerable.count("answered") > len(answerable) / 2
    assert up.connections < len(outcomes)  # pooled connections were reused (and raced)


async def test_each_answer_keeps_its_own_headers_under_concurrency() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5)
        gate = asyncio.Semaphore(40)

        async def one(number: int) -> dict[bytes, bytes]:
            async with gate:
                response = await client.post(up.url, body_for("ok", f"id-{number}"), None)
                await response.read()
                await asyncio.sleep(0)  # the connection serves someone else meanwhile
                return dict(response.headers())

        headers = await asyncio.gather(*(one(number) for number in range(400)))
        await client.close()
    assert up.connections <= 40  # connections were reused
    for number, seen in enumerate(headers):
        # only the allowed ones: none naming the provider's account, hosts or own limits
        assert seen == {b"x-request-id": b"id-%d" % number, b"openai-processing-ms": b"7"}


async def test_a_gzip_answer_is_inflated_only_up_to_the_cap() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5, max_body_bytes=1 << 20)
        small = await client.post(up.url, body_for("gzip", "small 500000"), None)
        assert len(await small.read()) == 500_000
        # about 100 KB on the wire that would inflate to 100 MB
        bomb = await client.post(up.url, body_for("gzip", "bomb 100000000"), None)
        with pytest.raises(UpstreamFailure, match="larger than the gateway accepts"):
            await bomb.read()
        streamed = await client.post(up.url, body_for("gzip", "bomb 100000000"), None)
        received = 0
        with pytest.raises(UpstreamFailure, match="larger than the gateway accepts"):
            async for chunk in streamed.chunks():
                received += len(chunk)
        assert received <= 1 << 20
        await client.close()


async def test_a_large_answer_is_read_whole() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5)
        started = time.monotonic()
        response = await client.post(up.url, body_for("big", "big 3000000"), None)
        assert len(await response.read()) == 3_000_000  # more than the read-ahead buffer
        assert time.monotonic() - started < 4  # read as it came, not at the timeout
        plain = await client.post(up.url, body_for("big", "capped 3000000"), None)
        client.max_body_bytes = 1 << 20
        with pytest.raises(UpstreamFailure, match="larger than the gateway accepts"):
            await plain.read()
        await client.close()


async def test_bytes_on_an_idle_connection_retire_it() -> None:
    with running_raw_upstream() as up:
        client = UpstreamClient(read_timeout=5)
        first = await client.post(up.url, body_for("garbage-when-idle", "a"), None)
        await first.read()
        await asyncio.sleep(0.2)  # an unsolicited 408 arrives on the pooled connection
        second = await client.post(up.url, body_for("ok", "b"), None)
        assert second.status == 200  # not the 408 as the answer to this request
        assert await second.read() == completion("b")
        assert up.connections == 2
        await client.close()
