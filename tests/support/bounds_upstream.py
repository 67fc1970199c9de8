"""An OpenAI-compatible upstream that reports absurd usage, for the bounds tests.

A raw asyncio server on loopback (byte-level control, no framework that might tidy the
numbers up): every chat completion is a short answer whose ``usage`` says whatever the
test set in :attr:`AbsurdUpstream.usage` — 10^15 - 1 tokens, negative counts, text — as a
JSON object, or in the last event of a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class AbsurdUpstream:
    base_url: str = ""
    usage: dict[str, Any] = field(
        default_factory=lambda: {"prompt_tokens": 10**15 - 1, "completion_tokens": 10**15 - 1}
    )
    requests: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, request: dict[str, Any]) -> tuple[bytes, bytes]:
        """(content type, body) of the answer to one parsed request."""
        self.requests.append(request)
        chunk = {"id": "c1", "object": "chat.completion", "created": 0, "model": request["model"]}
        if not request.get("stream"):
            body = {
                **chunk,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": self.usage,
            }
            return b"application/json", orjson.dumps(body)
        delta = {"index": 0, "delta": {"role": "assistant", "content": "ok"}}
        events = [
            {**chunk, "object": "chat.completion.chunk", "choices": [delta]},
            {**chunk, "object": "chat.completion.chunk", "choices": [], "usage": self.usage},
        ]
        text = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
        return b"text/event-stream", text + b"data: [DONE]\n\n"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                request = orjson.loads(await reader.readexactly(length)) if length else {}
                kind, body = self.answer(request)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def absurd_upstream() -> Iterator[AbsurdUpstream]:
    """The upstream, listening on 127.0.0.1 in a thread of its own until the block ends."""
    upstream = AbsurdUpstream()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: asyncio.Server | None = None

    async def start() -> None:
        nonlocal server
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream.base_url = f"http://127.0.0.1:{port}/v1"
        started.set()

    thread = threading.Thread(target=loop.run_forever, name="absurd-upstream", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    started.wait(10)
    try:
        yield upstream
    finally:
        assert server is not None
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
