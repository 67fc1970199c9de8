"""An upstream that answers every request with the exact bytes a test gives it.

For the answers no well-behaved server sends but HTTP allows or a broken proxy produces
(a gzip body of several members, a gzip body cut short inside valid framing). Raw
asyncio in a background thread, like tests/support/upstream_client_upstream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson


def gzip_answer(body: bytes) -> bytes:
    """A 200 JSON answer whose (already compressed) body is `body`, gzip-encoded."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


@dataclass
class CannedUpstream:
    answer: Callable[[dict[str, object]], bytes]
    base_url: str = ""
    requests: list[dict[str, object]] = field(default_factory=list)


class _Connection(asyncio.Protocol):
    def __init__(self, upstream: CannedUpstream) -> None:
        self.up = upstream
        self.buffer = bytearray()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in bytes(self.buffer[:end]).lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(self.buffer) < end + 4 + length:
            return
        request = orjson.loads(bytes(self.buffer[end + 4 : end + 4 + length]))
        del self.buffer[: end + 4 + length]
        self.up.requests.append(request)
        self.transport.write(self.up.answer(request))


@contextlib.contextmanager
def running_canned_upstream(
    answer: Callable[[dict[str, object]], bytes],
) -> Iterator[CannedUpstream]:
    """Serve `answer(request)` for each request on 127.0.0.1 while in the with."""
    upstream = CannedUpstream(answer)
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = loop.create_future()

    async def serve() -> None:
        server = await loop.create_server(lambda: _Connection(upstream), "127.0.0.1", 0)
        upstream.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        started.set()
        await stop
        server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise TimeoutError("the canned upstream did not start")
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(5)
        loop.close()
