"""Calling an upstream channel: a small HTTP/1.1 client with keep-alive connections.

Why not a general client: the gateway sends one kind of request (a JSON POST) to a few
known upstreams and must add as little as possible to each call. Measured against the
same local upstream, httpx made about a sixth of aiohttp's requests per second, and
aiohttp spent a quarter of the gateway's CPU per request, most of it in machinery this
use does not need (per-chunk stream bookkeeping, cookie jars, redirects, tracing); see
docs/benchmarks.md. This client is an :class:`asyncio.Protocol` that writes each request
with one ``write`` and parses responses with httptools (llhttp, the parser uvicorn uses):
Content-Length, chunked and read-until-close bodies, TLS through the standard ``ssl``
module, gzip/deflate bodies decoded. Connections are kept per (scheme, host, port) and
reused; a reused connection that the upstream had already closed is retried once on a
fresh one, before any byte of an answer arrived. Proxies from the environment are not
used.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from quotagate.gateway.asgi import Headers

#: response headers never passed on: hop-by-hop, framing the gateway redoes, and the
#: upstream's own rate-limit headers (the client sees QuotaGate's)
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"content-encoding",
        b"content-type",
        b"date",
        b"server",
        b"set-cookie",
        b"alt-svc",
        b"proxy-authenticate",
        b"trailer",
        b"upgrade",
    }
)
#: an idle connection older than this is not reused (servers close idle connections after
#: a few seconds; uvicorn, which vLLM and many others run on, after 5)
IDLE_SECONDS = 4.0
#: stop reading from the upstream while this much of its answer waits to be forwarded
HIGH_WATER = 1 << 20


class UpstreamFailure(Exception):
    """The upstream could not be reached, timed out or dropped the connection."""


@dataclass(frozen=True)
class _Target:
    pool: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    path: bytes
    host_header: bytes


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the response being read on it."""

    def __init__(self, pool: tuple[str, str, int]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.parser = httptools.HttpResponseParser(self)
        self.begin()

    def begin(self) -> None:
        """Ready for the next response."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.delimited = False  # the body has a length or chunked framing
        self.received = False
        self.body: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.error: UpstreamFailure | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail("the upstream sent an invalid HTTP response")
            self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.headers_done and not self.delimited:
            self.on_message_complete()  # a body that ends when the connection does
        else:
            self.fail("the upstream closed the connection")

    # -- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (
            name == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.delimited = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self.wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self.wake()

    # -- waiting ---------------------------------------------------------------------------
    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = UpstreamFailure(message)
        self.wake()

    async def wait(self, timeout: float) -> None:
        """Until something new happens on the connection (raises on error or timeout)."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        # a timer rather than asyncio.wait_for: this runs several times per request
        timer = loop.call_later(timeout, self._time_out)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None
        if self.error is not None:
            raise self.error

    def _time_out(self) -> None:
        self.fail("timed out")
        self.drop()

    def take(self) -> bytes:
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def drop(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    def __init__(self, client: UpstreamClient, connection: _Connection) -> None:
        self._client = client
        self._connection = connection
        self._done = False
        self.status = connection.status
        encoding = next((v for k, v in connection.headers if k == b"content-encoding"), b"")
        encoding = encoding.strip().lower()
        self._decoder: Any = None
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, by their header

    @property
    def content_type(self) -> bytes:
        for name, value in self._connection.headers:
            if name == b"content-type":
                return value
        return b"application/json"

    def headers(self) -> Headers:
        """The upstream's headers worth passing on (lower-case names)."""
        return [
            (name, value)
            for name, value in self._connection.headers
            if name not in _DROP and not name.startswith(b"x-ratelimit")
        ]

    def _decode(self, data: bytes) -> bytes:
        if self._decoder is None:
            return data
        try:
            return bytes(self._decoder.decompress(data))
        except zlib.error:
            raise UpstreamFailure("the upstream sent a body that does not decompress") from None

    async def read(self) -> bytes:
        connection = self._connection
        timeout = self._client.read_timeout
        try:
            while not connection.complete:
                await connection.wait(timeout)
        except UpstreamFailure:
            self.close()
            raise
        data = self._decode(connection.take())
        self._finish()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        connection = self._connection
        timeout = self._client.read_timeout
        try:
            while True:
                if connection.body:
                    data = self._decode(connection.take())
                    if data:
                        yield data
                elif connection.complete:
                    self._finish()
                    return
                else:
                    await connection.wait(timeout)
        except UpstreamFailure:
            self.close()
            raise

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._client._release(self._connection)

    def close(self) -> None:
        """Done with the answer: the connection goes back to the pool if the answer was
        read to its end, else it is dropped (which stops a stream at the upstream)."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        if connection.complete and not connection.body:
            self._client._release(connection)
        else:
            connection.drop()


class UpstreamClient:
    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 600.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamFailure(f"unsupported upstream URL scheme {parts.scheme!r}")
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            default = port == (443 if tls else 80)
            host = parts.hostname
            shown = f"[{host}]" if ":" in host else host
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = _Target(
                (parts.scheme, host, port),
                host,
                port,
                tls,
                path.encode(),
                (shown if default else f"{shown}:{port}").encode("idna"),
            )
            if len(self._targets) > 1000:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _connect(self, target: _Target) -> _Connection:
        idle = self._idle.get(target.pool)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                connection.reused = True
                return connection
            connection.drop()
        if target.tls and self._tls is None:
            self._tls = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(target.pool),
                    target.host,
                    target.port,
                    ssl=self._tls if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamFailure(f"timed out connecting to {target.host}:{target.port}") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UpstreamFailure(
                f"cannot connect to {target.host}:{target.port} ({reason})"
            ) from None
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or not connection.keep_alive or connection.body:
            connection.drop()
            return
        connection.begin()
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.pool, []).append(connection)

    async def post(self, url: str, body: bytes, api_key: str | None) -> UpstreamResponse:
        target = self._target(url)
        head = [
            b"POST ",
            target.path,
            b" HTTP/1.1\r\nHost: ",
            target.host_header,
            b"\r\nContent-Type: application/json\r\nAccept: */*\r\n"
            b"User-Agent: quotagate\r\nContent-Length: ",
            b"%d" % len(body),
            b"\r\n",
        ]
        if api_key:
            head += [b"Authorization: Bearer ", api_key.encode("latin-1"), b"\r\n"]
        head.append(b"\r\n")
        request = b"".join(head) + body
        for attempt in (1, 2):
            connection = await self._connect(target)
            assert connection.transport is not None
            connection.transport.write(request)
            try:
                while not connection.headers_done:
                    await connection.wait(self.read_timeout)
            except UpstreamFailure:
                stale = connection.reused and not connection.received
                connection.drop()
                if stale and attempt == 1:
                    continue  # the upstream had closed the idle connection: once more
                raise
            return UpstreamResponse(self, connection)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.drop()
        self._idle.clear()
