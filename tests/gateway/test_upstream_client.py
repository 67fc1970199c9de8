"""The gateway's HTTP client against hand-written servers on loopback: the framings a
provider may use, a keep-alive connection the provider closed, timeouts, TLS.

Each server here is a few lines of asyncio that answer with exact bytes, so the test
controls what a real client library would smooth over.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from quotagate.gateway.upstream import UpstreamClient, UpstreamFailure

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


async def test_reused_connection_closed_under_a_request_is_retried_once() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        if number in (1, 2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        if number != 2:
            # the next request arrives as the server gives up on the connection: read,
            # never answered (what an idle-timeout race looks like to the client)
            await read_request(reader)
            writer.close()
            return
        await reader.read()

    client = UpstreamClient(read_timeout=5)
    async with serve(handler) as url:
        assert await (await client.post(url, b"{}", None)).read() == b"ok"  # connection 1
        # connection 1 is reused, dropped under the request, and the call retried on 2
        assert await (await client.post(url, b"{}", None)).read() == b"ok"
        assert connections == 2
        await client.close()
        # a fresh connection that fails the same way is a real failure: no retry
        with pytest.raises(UpstreamFailure, match="closed the connection"):
            await client.post(url, b"{}", None)
        assert connections == 3
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
