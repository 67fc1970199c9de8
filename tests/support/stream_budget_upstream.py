"""An OpenAI-compatible upstream that misbehaves on the accounting: it ignores max_tokens
and streams forever, reports no usage, reports more than it generated, or drops the
connection half way through a stream.

It is a raw asyncio server rather than an ASGI app so that what goes over the wire — the
chunked framing, when the socket closes, whether the peer closed it — is the test's to
control and to observe. It runs on its own event loop in a background thread, on a
loopback port the OS picked. Knobs are plain attributes, changed between requests.

Its counting rule: every streamed content event (and every word of a non-streamed
answer) is one token, ``WORD`` followed by a space. The word is long on purpose (18
bytes), so that QuotaGate's offline estimate (bytes / 3) counts each one as 6 tokens:
the estimate errs high, as it does for real text, only more.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

WORD = "tokenization-word "  # one token, 18 bytes


@dataclass
class Served:
    """One request as the upstream saw it."""

    body: dict[str, Any]
    events: int = 0  # content events (tokens) sent
    closed_at: float | None = None  # monotonic time the peer closed the connection
    finished: bool = False  # the answer went out to its end


@dataclass
class Knobs:
    #: streams go on until the peer goes away; plain answers have `tokens` words
    ignore_max_tokens: bool = False
    tokens: int = 30  # answer length when max_tokens does not cut it shorter
    usage: str = "honest"  # honest | none | over
    over_prompt: int = 0  # added to the reported prompt tokens (usage="over")
    over_completion: int = 0  # added to the reported completion tokens (usage="over")
    drop_after: int | None = None  # streams: close the socket after this many events
    delay: float = 0.0  # seconds between streamed events


@dataclass
class HostileUpstream:
    port: int = 0
    knobs: Knobs = field(default_factory=Knobs)
    served: list[Served] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = orjson.loads(await reader.readexactly(length)) if length else {}
                served = Served(body)
                self.served.append(served)
                if body.get("stream"):
                    await self._stream(served, reader, writer)
                    return  # streams are answered with connection: close
                else:
                    await self._reply(served, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping: end quietly (asyncio logs a cancelled handler)
        finally:
            writer.close()

    def _length(self, body: dict[str, Any]) -> int:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if self.knobs.ignore_max_tokens or not isinstance(limit, int):
            return self.knobs.tokens
        return min(limit, self.knobs.tokens)

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", "")).split()) + 1 for m in body.get("messages", []))
        if self.knobs.usage == "over":
            prompt += self.knobs.over_prompt
            completion += self.knobs.over_completion
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _reply(self, served: Served, writer: asyncio.StreamWriter) -> None:
        tokens = self._length(served.body)
        answer: dict[str, Any] = {
            "id": "chatcmpl-hostile",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served.body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": WORD * tokens},
                    "finish_reason": "stop",
                }
            ],
        }
        if self.knobs.usage != "none":
            answer["usage"] = self._usage(served.body, tokens)
        data = orjson.dumps(answer)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data)
        )
        await writer.drain()
        served.events = tokens
        served.finished = True

    async def _stream(
        self, served: Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        body = served.body
        watcher = asyncio.ensure_future(reader.read(1))  # b"" once the peer has closed

        def closed(read: asyncio.Future[bytes]) -> None:
            if not read.cancelled():
                read.exception()  # EOF or a reset: closed either way
                served.closed_at = time.monotonic()

        watcher.add_done_callback(closed)
        chunk = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "model": "x"}
        chunk["created"] = int(time.time())
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )

        def send(payload: dict[str, Any] | str) -> None:
            data = b"data: " + (
                payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
            )
            data += b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            delta = {"role": "assistant", "content": ""}
            send({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            tokens = self._length(body)
            while self.knobs.ignore_max_tokens or served.events < tokens:
                if self.knobs.drop_after is not None and served.events >= self.knobs.drop_after:
                    await writer.drain()
                    transport = writer.transport
                    assert isinstance(transport, asyncio.Transport)
                    transport.abort()  # no end of the chunked body: a dropped connection
                    return
                delta = {"content": WORD}
                send({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                served.events += 1
                await writer.drain()
                if watcher.done():
                    return
                await asyncio.sleep(self.knobs.delay)
            send({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            options = body.get("stream_options") or {}
            if self.knobs.usage != "none" and options.get("include_usage"):
                send({**chunk, "choices": [], "usage": self._usage(body, served.events)})
            send("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            served.finished = True
        finally:
            if not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


@contextlib.contextmanager
def running_hostile_upstream(knobs: Knobs | None = None) -> Iterator[HostileUpstream]:
    upstream = HostileUpstream(knobs=knobs or Knobs())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    upstream.port = int(sock.getsockname()[1])
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def serve() -> None:
        nonlocal stop
        server = await asyncio.start_server(upstream.handle, sock=sock)
        stop = loop.create_future()
        ready.set()
        async with server:
            await stop
        # answers still running (a stalled stream, say) end with the server
        running = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(lambda: stop is not None and stop.set_result(None))
        thread.join(10)
        loop.close()
