"""A misbehaving upstream for the gateway's HTTP client: raw asyncio, exact bytes.

Why raw: the cases under test are the ones a real server framework smooths over — a
connection dropped after the request was read, after the status line, mid-body; an idle
keep-alive connection closed just as the client reuses it. The server runs its own event
loop in a background thread, so it keeps working (and closing) while the client's loop is
busy or blocked.

Each request says what to do with it in its last message's content, ``"<action> <tag>"``:

- ``ok``: a JSON answer (Content-Length, keep-alive) with ``x-request-id: <tag>`` and the
  headers a provider adds that must not reach a client (:data:`PRIVATE_HEADERS`);
- ``stream``: the same as server-sent events (chunked), with a usage event;
- ``before-read``: close the connection without generating anything (to the client this is
  a server that went away before reading the request);
- ``after-read``: read the request (a generation), close without answering;
- ``after-status``: read it, send the status line only, close;
- ``mid-body``: read it, send the headers and part of the promised body, close;
- ``mid-stream``: read it, send the stream's headers and two events, close;
- ``echo-401`` / ``echo-400``: an error that quotes the request's ``Authorization`` header
  (``echo-400`` with a long message, a code and a param);
- ``limit-429`` / ``quota-429``: the provider's rate limit (naming its account, with
  ``retry-after: 2``), and its "insufficient_quota" (the account has run out);
- ``gzip <tag> <bytes>``: a gzip answer that inflates to ``<bytes>`` bytes of JSON;
- ``big <tag> <bytes>``: a plain JSON answer of ``<bytes>`` bytes;
- ``garbage-when-idle``: answer ok, then send an unsolicited 408 on the idle connection.

After each complete answer the connection stays open for ``idle_timeout`` seconds (None:
for ever) waiting for the next request, then is closed — the idle close a client's pool
races. :attr:`RawUpstream.generations` lists the tag of every request the upstream
generated for, :attr:`RawUpstream.connections` counts the connections it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

#: what a provider's answer carries that names its account, hosts or own limits
PRIVATE_HEADERS = (
    b"openai-organization: org-hidden-account\r\n"
    b"openai-project: proj_hidden\r\n"
    b"server: gpu-box-17.internal\r\n"
    b"via: 1.1 edge-proxy.internal\r\n"
    b"set-cookie: session=abc; Path=/\r\n"
    b"x-ratelimit-remaining-tokens: 12345\r\n"
    b"openai-processing-ms: 7\r\n"
)
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
#: what a request whose action generated something delivers to the client
DELIVERING = frozenset({"ok", "stream", "mid-stream", "gzip", "big", "garbage-when-idle"})


def body_for(action: str, tag: str, **extra: Any) -> bytes:
    """A chat request asking this upstream to do `action` (what the UpstreamClient sends)."""
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": f"{action} {tag}"}],
        **extra,
    }
    return orjson.dumps(request)


@dataclass
class RawUpstream:
    idle_timeout: float | None = None
    #: a random part added to each idle timeout (so closes race the client's reuse)
    idle_jitter: float = 0.0
    base_url: str = ""
    generations: list[str] = field(default_factory=list)
    connections: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    open: set[_Connection] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def close_idle(self) -> None:
        """Close every connection that waits for a request, from the server's side, and
        return once their sockets are closed."""
        assert self.loop is not None
        closing = [c for c in list(self.open) if not c.buffer]
        for connection in closing:
            self.loop.call_soon_threadsafe(connection.transport.close)
        deadline = time.monotonic() + 5
        while any(c in self.open for c in closing) and time.monotonic() < deadline:
            time.sleep(0.005)


class _Connection(asyncio.Protocol):
    def __init__(self, upstream: RawUpstream) -> None:
        self.up = upstream
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.connections += 1
        self.up.open.add(self)

    def eof_received(self) -> bool:
        return True  # a client's half-close leaves this side open (HTTP allows it)

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.open.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buffer += data
        while not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self.answer(head, orjson.loads(body))
        return

    def idle(self) -> None:
        """A complete answer was sent: wait for the next request, for a while."""
        timeout = self.up.idle_timeout
        if timeout is not None and not self.buffer:
            timeout += random.uniform(0, self.up.idle_jitter)
            self.timer = asyncio.get_running_loop().call_later(timeout, self.transport.close)

    def answer(self, head: bytes, request: dict[str, Any]) -> None:
        words: list[str] = str(request["messages"][-1]["content"]).split()
        action, tag, args = words[0], (words[1:] or [""])[0], words[2:]
        write, close = self.transport.write, self.transport.close
        if action == "before-read":
            close()
            return
        self.up.generations.append(tag)
        if action == "after-read":
            close()
        elif action == "after-status":
            write(b"HTTP/1.1 200 OK\r\n")
            close()
        elif action == "mid-body":
            write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            write(b"Content-Length: 400\r\n\r\n" + completion(tag)[:20])
            close()
        elif action in ("stream", "mid-stream"):
            write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nx-request-id: " + tag.encode() + b"\r\n"
                + PRIVATE_HEADERS + b"\r\n"
            )  # fmt: skip
            events = [_event(tag, "hel"), _event(tag, "lo")]
            if action == "mid-stream":
                write(b"".join(_chunk(e) for e in events))
                close()
                return
            events += [_event(tag, None), b"data: [DONE]\n\n"]
            write(b"".join(_chunk(e) for e in events) + b"0\r\n\r\n")
            self.idle()
        elif action in ("limit-429", "quota-429"):
            code = "rate_limit_exceeded" if action == "limit-429" else "insufficient_quota"
            message = "Rate limit reached in organization org-hidden-account; try in 2s."
            data = orjson.dumps({"error": {"message": message, "type": code, "code": code}})
            write(
                b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                b"retry-after: 2\r\n" + PRIVATE_HEADERS
                + b"Content-Length: %d\r\n\r\n" % len(data) + data
            )  # fmt: skip
            self.idle()
        elif action in ("echo-401", "echo-400"):
            sent = next(
                (line for line in head.split(b"\r\n") if line.startswith(b"authorization:")),
                b"",
            ).decode()
            if action == "echo-401":
                status = b"401 Unauthorized"
                error = {"message": f"Invalid key in {sent}", "type": "invalid_request_error"}
            else:
                status = b"400 Bad Request"
                error = {
                    "message": f"You sent {sent}. " + "This context is far too long. " * 200,
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                    "param": "messages",
                }
            data = orjson.dumps({"error": error})
            write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                b"x-request-id: " + tag.encode() + b"\r\n" + PRIVATE_HEADERS
                + b"Content-Length: %d\r\n\r\n" % len(data) + data
            )  # fmt: skip
            self.idle()
        elif action == "gzip":
            data = _inflating(int(args[0]))
            write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(data) + data
            )
            self.idle()
        else:  # ok, big, garbage-when-idle
            data = completion(tag)
            if action == "big":
                size = int(args[0])
                data = data[:-1] + b',"pad":"' + b"x" * (size - len(data) - 9) + b'"}'
            write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: "
                + tag.encode() + b"\r\n" + PRIVATE_HEADERS
                + b"Content-Length: %d\r\n\r\n" % len(data) + data
            )  # fmt: skip
            if action == "garbage-when-idle":
                asyncio.get_running_loop().call_later(
                    0.05, write, b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
                )
            self.idle()


def completion(tag: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{tag}",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello"},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    )


def _event(tag: str, text: str | None) -> bytes:
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{tag}",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
    }
    if text is None:
        chunk["choices"] = []
        chunk["usage"] = USAGE
    else:
        chunk["choices"] = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


_INFLATING: dict[int, bytes] = {}


def _inflating(size: int) -> bytes:
    """gzip of a JSON answer `size` bytes long (mostly spaces: it compresses ~1000:1)."""
    if size not in _INFLATING:
        body = completion("gz")
        _INFLATING[size] = gzip.compress(body[:-1] + b" " * (size - len(body)) + b"}", 6)
    return _INFLATING[size]


@contextlib.contextmanager
def running_raw_upstream(
    idle_timeout: float | None = None, idle_jitter: float = 0.0
) -> Iterator[RawUpstream]:
    """Serve a :class:`RawUpstream` on 127.0.0.1 (a port the OS picks) while in the with."""
    upstream = RawUpstream(idle_timeout, idle_jitter)
    started = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def serve() -> None:
        nonlocal stop
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(upstream), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream.base_url = f"http://127.0.0.1:{port}/v1"
        upstream.loop = loop
        stop = loop.create_future()
        started.set()
        await stop
        server.close()
        for connection in list(upstream.open):
            connection.transport.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise TimeoutError("the raw upstream did not start")
    try:
        yield upstream
    finally:
        assert upstream.loop is not None and stop is not None
        upstream.loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(5)
