"""Calling an upstream channel: a small HTTP/1.1 client with keep-alive connections.

Why not a general client: the gateway sends one kind of request (a JSON POST) to a few
known upstreams and must add as little as possible to each call. Measured against the
same local upstream, httpx made about a sixth of aiohttp's requests per second, and
aiohttp spent a quarter of the gateway's CPU per request, most of it in machinery this
use does not need (per-chunk stream bookkeeping, cookie jars, redirects, tracing); see
docs/benchmarks.md. This client is an :class:`asyncio.Protocol` that writes each request
with one ``write`` and parses responses with httptools (llhttp, the parser uvicorn uses):
Content-Length, chunked and read-until-close bodies, TLS through the standard ``ssl``
module, gzip/deflate bodies decoded up to a size cap. Connections are kept per (scheme,
host, port) and reused. Proxies from the environment are not used.

A POST is a generation someone is billed for, so a request is never sent twice. It is sent
again only when it provably never left: a pooled connection is used only if nothing
arrived on it while idle (neither in the event loop's view nor, one ``poll`` away, in the
socket: an unread FIN or RST), and if the write itself finds the connection dead — a
transport closes at once only when its first send fails, so no byte of the request went
out — the request goes once more on a connection opened for it. A connection that fails
once the request was handed to the kernel is the caller's failure (the proxy moves to the
next channel, admitted afresh): the upstream may have read the request.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from quotagate.gateway.asgi import Headers

#: the upstream headers a client gets: the request's id at the provider (what its support
#: asks for), how long the provider worked on it, and when to retry after a 429. Nothing
#: else passes: not the provider's account (openai-organization, openai-project,
#: anthropic-organization-id), hosts and infrastructure (server, via, cf-ray, x-envoy-*),
#: cookies, its own rate limits (the client sees QuotaGate's) or the framing the gateway redoes
PASSED_HEADERS = frozenset(
    {
        b"x-request-id",
        b"request-id",
        b"openai-processing-ms",
        b"openai-version",
        b"retry-after",
        b"retry-after-ms",
    }
)
#: the longest value of a passed header: ids and timings are short, and one header of
#: kilobytes makes HTTP clients refuse the whole answer (aiohttp's limit is 8 KB)
PASSED_VALUE_BYTES = 256
#: what the upstream may send at most of one answer, decoded (``max_upstream_body_bytes``)
MAX_BODY = 64 * 1024 * 1024
#: an idle connection older than this is not reused (servers close idle connections after
#: a few seconds; uvicorn, which vLLM and many others run on, after 5)
IDLE_SECONDS = 4.0
#: stop reading from the upstream while this much of its answer waits to be forwarded
HIGH_WATER = 1 << 20


class UpstreamFailure(Exception):
    """The upstream could not be reached, timed out, dropped the connection or sent an
    answer the gateway cannot use.

    ``str()`` is for the log and may name the upstream's host; ``reason`` is what a client
    may be told (a verb phrase naming nothing internal: "closed the connection").
    ``reached``: the request may have reached the upstream, which may be generating for
    it, so it goes to no other channel (False: it provably never left, or the upstream
    answered that it refused or failed it).
    """

    def __init__(self, reason: str, detail: str | None = None, *, reached: bool = True) -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.reached = reached


@dataclass(frozen=True)
class _Target:
    pool: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    path: bytes
    host_header: bytes

    @property
    def origin(self) -> str:
        """host:port, for the log (never for a client)"""
        return f"{self.host}:{self.port}"


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the response being read on it."""

    def __init__(self, pool: tuple[str, str, int]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.closed = False
        self.idle = False
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
        self.body: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.error: UpstreamFailure | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # nothing is asked on an idle connection: whatever this is (a 408, garbage),
            # the connection cannot carry a request any more
            self.drop()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail("sent an invalid HTTP response")
            self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.headers_done and not self.delimited:
            self.on_message_complete()  # a body that ends when the connection does
        else:
            self.fail("closed the connection")

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

    # -- sending ---------------------------------------------------------------------------
    def usable(self) -> bool:
        """Whether this idle connection can carry a request: not closed, and nothing came
        in while it was idle — neither seen by the event loop nor waiting unread in the
        socket (a FIN or RST the loop has not got to yet: one ``poll`` that does not wait).
        """
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        if self.fd < 0:
            return True
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not poller.poll(0)

    def send(self, request: bytes) -> bool:
        """Write the request. False if the write found the connection dead: a transport
        closes during ``write`` only when its first send fails, so then no byte of the
        request left. (Bytes it could not send at once are queued; if they fail later the
        upstream may have read some, and the answer's wait fails instead.)"""
        transport = self.transport
        assert transport is not None
        self.idle = False
        transport.write(request)
        if transport.is_closing():
            self.closed = True
            return False
        return True

    # -- waiting ---------------------------------------------------------------------------
    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = UpstreamFailure(reason)
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
    """One answer. Its status and headers are taken when they arrive: once the body is
    read the connection serves other requests, and their answers' headers."""

    def __init__(self, client: UpstreamClient, connection: _Connection, origin: str) -> None:
        self._client = client
        self._connection = connection
        self._done = False
        self._size = 0  # decoded bytes so far
        self.status = connection.status
        #: host:port of the upstream, for the log only
        self.origin = origin
        self.content_type = b"application/json"
        self._headers: Headers = []
        encoding = b""
        for name, value in connection.headers:
            if name in PASSED_HEADERS:
                if len(value) <= PASSED_VALUE_BYTES:
                    self._headers.append((name, value))
            elif name == b"content-type":
                self.content_type = value
            elif name == b"content-encoding":
                encoding = value.strip().lower()
        self._decoder: Any = None
        self._compressed = False  # compressed bytes arrived (an empty body is no gzip)
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, by their header
        #: an encoding not read here (brotli, zstd, gzip twice): sending no Accept-Encoding
        #: allows any, and its bytes passed on as JSON would be garbage, charged unread
        self._foreign = encoding not in (b"", b"identity") and self._decoder is None

    def headers(self) -> Headers:
        """The upstream's headers a client gets (:data:`PASSED_HEADERS`; a new list)."""
        return list(self._headers)

    def _decode(self, data: bytes) -> bytes:
        """The body's next bytes as sent to the client: decompressed, and never more in
        all than the client's limit (a 200 KB gzip body can inflate to gigabytes)."""
        if self._decoder is None:
            if self._foreign and data:
                raise UpstreamFailure("sent an answer in an encoding the gateway cannot read")
            self._count(len(data))
            return data
        self._compressed = self._compressed or bool(data)
        parts = []
        try:
            while True:
                # at most one byte past the limit: enough to know it was passed
                limit = self._client.max_body_bytes
                part = self._decoder.decompress(data, limit - self._size + 1)
                self._count(len(part))
                parts.append(part)
                data = self._decoder.unused_data
                if not data:
                    break
                # a gzip body may be several members (RFC 1952): the next one begins
                self._decoder = zlib.decompressobj(wbits=47)
        except zlib.error:
            raise UpstreamFailure("sent a body that does not decompress") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _count(self, size: int) -> None:
        self._size += size
        limit = self._client.max_body_bytes
        if self._size > limit:
            raise UpstreamFailure(
                "sent an answer larger than the gateway accepts",
                f"more than max_upstream_body_bytes={limit} bytes",
            )

    def _ended(self) -> None:
        """The body is complete: a compressed one must have ended too (else it was cut)."""
        decoder = self._decoder
        if decoder is not None and not decoder.eof and self._compressed:
            raise UpstreamFailure("sent a body that does not decompress", "cut short")

    async def read(self) -> bytes:
        """The whole body (taken as it arrives, so a large one never stalls the reading)."""
        connection = self._connection
        timeout = self._client.read_timeout
        parts: list[bytes] = []
        try:
            while True:
                if connection.body:
                    parts.append(self._decode(connection.take()))
                if connection.complete:
                    self._ended()
                    break
                await connection.wait(timeout)
        except UpstreamFailure:
            self.close()
            raise
        self._finish()
        return parts[0] if len(parts) == 1 else b"".join(parts)

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
                    self._ended()
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
    def __init__(
        self,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        max_body_bytes: int = MAX_BODY,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_body_bytes = max_body_bytes
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamFailure(
                    "has an unusable URL",
                    f"unsupported upstream URL scheme {parts.scheme!r}",
                    reached=False,
                )
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

    def _pooled(self, target: _Target) -> _Connection | None:
        """An idle connection to `target` that can carry a request, if there is one."""
        idle = self._idle.get(target.pool)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since < IDLE_SECONDS and connection.usable():
                return connection
            connection.drop()
        return None

    async def _open(self, target: _Target) -> _Connection:
        """A new connection (never a pooled one)."""
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
            raise UpstreamFailure(
                "timed out", f"connecting to {target.origin}", reached=False
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UpstreamFailure(
                "could not be reached",
                f"cannot connect to {target.origin}: {reason}",
                reached=False,
            ) from None
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or not connection.keep_alive or connection.body:
            connection.drop()
            return
        connection.begin()
        connection.idle = True
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
        connection = self._pooled(target) or await self._open(target)
        if not connection.send(request):
            # provably unsent (see send): once more, on a connection of its own
            connection = await self._open(target)
            if not connection.send(request):
                raise UpstreamFailure(
                    "closed the connection", f"{target.origin}, twice", reached=False
                )
        try:
            while not connection.headers_done:
                await connection.wait(self.read_timeout)
        except UpstreamFailure:
            # the upstream may have read the request: never sent again (the caller decides)
            connection.drop()
            raise
        return UpstreamResponse(self, connection, target.origin)

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.drop()
        self._idle.clear()
