"""uvicorn's httptools protocol, bounded against slow and greedy clients.

uvicorn times out a kept-alive connection between requests, but nothing else: a client
that connects and says nothing, sends its headers a byte a second, or its body a byte a
minute holds a connection (and a descriptor) for ever, and httptools buffers a header of
any size. :class:`GatewayProtocol` adds what a server facing the internet needs:

- **header timeout**: a request's line and headers must arrive within
  ``header_timeout`` seconds of the connection opening (or, on a kept-alive connection,
  of the request's first byte); a silent new connection is then closed, a slow one gets
  408;
- **body timeout**: its body must arrive within ``body_timeout`` seconds of its headers
  (408);
- **header limits**: more than ``max_header_bytes`` of request line and headers, or more
  than ``max_headers`` header fields, get 431 and the connection is closed, so a client
  can make the gateway hold at most that much of its headers;
- **connection limit**: beyond ``max_connections`` open connections (per process), the
  connection that has waited longest without a request in progress is closed to make
  room; when every connection is busy with a request, the new one gets 503.

Deadlines cost a timer per connection, not per request: one timer is armed when none is
pending and re-arms itself for whatever deadline the connection has reached when it fires;
parsing a request only writes the deadline. Deadlines stand still while uvicorn has paused
reading (a pipelined request waiting for the one before it, or a body the app has not read
yet): then the client is not the slow one.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from quotagate.config import Settings
from quotagate.gateway.asgi import Receive, Scope, Send
from quotagate.gateway.errors import error_body

log = logging.getLogger("quotagate.gateway")

# what the connection waits for
_NOTHING = 0  # a request is being answered, or the connection is kept alive between two
_FIRST = 1  # the first byte of the first request on a new connection
_HEADERS = 2  # the rest of a request's line and headers
_BODY = 3  # a request's body

#: descriptors kept back from client connections: the database, logs, the listening socket
_SPARE_DESCRIPTORS = 64


@dataclass(frozen=True)
class ConnectionLimits:
    """What one gateway process allows its clients (from the settings; picklable, so
    ``serve --workers N`` hands it to every worker)."""

    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_headers: int
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_connections=connection_cap(settings.max_connections),
        )


def connection_cap(wanted: int, descriptors: int | None = None) -> int:
    """`wanted`, lowered so that connections cannot exhaust the process's descriptors.

    A busy connection takes two (the client's and the upstream's), and a process out of
    descriptors cannot even accept the connection it would close an idle one for: every
    client would be locked out, which is what the limit is there to prevent.
    """
    if descriptors is None:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if descriptors == resource.RLIM_INFINITY:
            return wanted
    cap = max(1, (descriptors - _SPARE_DESCRIPTORS) // 2)
    if cap < wanted:
        log.warning(
            "max_connections lowered from %d to %d: the process may open %d files "
            "(raise it with `ulimit -n`)",
            wanted,
            cap,
            descriptors,
        )
        return cap
    return wanted


def protocol_factory(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """What to give uvicorn as ``http=``: the protocol class with `limits` bound (uvicorn
    calls it as it would the class)."""
    return cast(type[asyncio.Protocol], partial(GatewayProtocol, limits=limits))


def _refusal(
    status: int, message: str, code: str, *extra: tuple[bytes, bytes]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of a refusal that closes the connection (an OpenAI-style error)."""
    body = error_body(message, "server_error" if status >= 500 else "invalid_request_error", code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        *extra,
        (b"connection", b"close"),
    ]
    return headers, body


def _raw(status: int, refusal: tuple[list[tuple[bytes, bytes]], bytes]) -> bytes:
    """A refusal as bytes, for a connection that has no request in the app to answer it."""
    headers, body = refusal
    lines = [STATUS_LINE[status], *(b"%s: %s\r\n" % pair for pair in headers), b"\r\n", body]
    return b"".join(lines)


class GatewayProtocol(HttpToolsProtocol):
    """One client connection (see the module's docstring for what it bounds)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._waiting = _FIRST
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._header_bytes = 0  # read since the last request ended, outside of bodies
        self._since = 0.0  # when it last began waiting for a request (orders evictions)

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = time.monotonic()
        self._wait(_FIRST, self.limits.header_timeout)
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting != _BODY:
            self._header_bytes += len(data)
        super().data_received(data)
        # a read that ends inside a request's headers held nothing but them (a request that
        # ended within it reset the count), so the count is exact when it matters
        if (
            self._waiting <= _HEADERS
            and self._header_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            limits = self.limits
            log.info("closed a connection: request headers over %d bytes", limits.max_header_bytes)
            self._close(_raw(431, _too_large(limits)))

    def _make_room(self) -> None:
        """Close the connection that has waited longest for a request, else refuse this one."""
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, GatewayProtocol) and c._idle()
        ]
        if idle:
            min(idle, key=lambda c: c._since)._close()
            return
        log.warning("refused a connection: all %d are busy", self.limits.max_connections)
        refusal = _refusal(
            503,
            f"The gateway is serving as many connections as it may "
            f"({self.limits.max_connections}); retry shortly.",
            "too_many_connections",
            (b"retry-after", b"1"),
        )
        self._close(_raw(503, refusal))

    def _idle(self) -> bool:
        """No request of this connection is in the app: closing it loses nothing."""
        if self._waiting == _BODY or self.transport.is_closing():
            return False
        return self.cycle is None or self.cycle.response_complete

    # -- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._waiting == _FIRST:
            self._waiting = _HEADERS  # a new connection's deadline runs from connecting
        else:
            self._wait(_HEADERS, self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        limits = self.limits
        if len(self.headers) > limits.max_headers or (
            self._header_bytes > limits.max_header_bytes  # the read may hold body bytes too
            and len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            > limits.max_header_bytes
        ):
            # answered through uvicorn's own request cycle (as its 503 is), so the rest of
            # the request is read and dropped in order
            app, self.app = self.app, partial(_refuse, _too_large(limits))
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._wait(_BODY, limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._waiting = _NOTHING
        self._header_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._since = time.monotonic()

    # -- deadlines -----------------------------------------------------------------------
    def _wait(self, what: int, seconds: float) -> None:
        """Wait for `what` until `seconds` from now. The pending timer is kept when it fires
        first (it re-arms itself then), so parsing a request seldom touches a timer."""
        self._waiting = what
        self._deadline = deadline = self.loop.time() + seconds
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._expired)

    def _expired(self) -> None:
        self._timer = None
        waiting = self._waiting
        if waiting == _NOTHING or self.transport.is_closing():
            return
        limits = self.limits
        now = self.loop.time()
        if self.flow.read_paused:  # uvicorn is not reading: the client cannot be late
            self._deadline = now + (
                limits.body_timeout if waiting == _BODY else limits.header_timeout
            )
        if self._deadline > now:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._expired)
            return
        if waiting == _FIRST:
            self._close()  # never said a word: nothing to answer
            return
        if waiting == _BODY:
            seconds, part = limits.body_timeout, "body"
        else:
            seconds, part = limits.header_timeout, "headers"
        log.info("closed a connection: request %s not received within %gs", part, seconds)
        if waiting == _BODY and self.cycle.response_started:
            self._close()  # answered already, without waiting for the body (401, 413)
            return
        refusal = _refusal(
            408, f"The request {part} did not arrive within {seconds:g} seconds.", "request_timeout"
        )
        self._close(_raw(408, refusal))

    def _close(self, response: bytes = b"") -> None:
        """Write `response` and close. A request still in the app sees a disconnect, and
        when its answer has begun (the app did not wait for the body), nothing is written
        into it."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                response = b""
            cycle.disconnected = True
            cycle.message_event.set()
        if response:
            self.transport.write(response)
        self.transport.close()


def _too_large(limits: ConnectionLimits) -> tuple[list[tuple[bytes, bytes]], bytes]:
    return _refusal(
        431,
        f"The request headers are larger than the gateway accepts "
        f"({limits.max_header_bytes:,} bytes, {limits.max_headers} fields).",
        "request_header_fields_too_large",
    )


async def _refuse(
    refusal: tuple[list[tuple[bytes, bytes]], bytes], scope: Scope, receive: Receive, send: Send
) -> None:
    """An ASGI app that answers `refusal` (431) to a request whose headers were read whole."""
    headers, body = refusal
    await send({"type": "http.response.start", "status": 431, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
