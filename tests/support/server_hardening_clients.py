"""Hostile HTTP clients for the tests of the gateway's connection limits, on raw sockets.

A real HTTP client cannot be slow on purpose, stop half-way through its headers, or send
64 MiB of them, so these speak bytes: each is an asyncio stream connection the test
drives byte by byte, and reads back what the server answered and when it hung up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass


@dataclass
class Answer:
    """What the server sent before it closed the connection."""

    raw: bytes
    closed_at: float  # time.monotonic() when the server closed the connection

    @property
    def status(self) -> int | None:
        """The status code, or None when the server closed without a word."""
        if not self.raw.startswith(b"HTTP/1.1 "):
            return None
        return int(self.raw[9:12])

    @property
    def headers(self) -> dict[str, str]:
        head = self.raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.raw else b""


class RawClient:
    """One TCP connection to `port` on loopback."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent = 0
        self._read = b""  # what is_open() read ahead

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """Send `data`; False once the server has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        self.sent += len(data)
        return True

    async def dribble(self, data: bytes, every: float) -> bool:
        """Send `data` a byte every `every` seconds, until done or the server hangs up."""
        for i in range(len(data)):
            if self.reader.at_eof() or not await self.send(data[i : i + 1]):
                return False
            await asyncio.sleep(every)
        return True

    async def answer(self, timeout: float) -> Answer:
        """Everything the server sends until it closes (fails if it has not within
        `timeout` seconds: the connection is being held open)."""
        chunks = [self._read]
        self._read = b""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return Answer(b"".join(chunks), time.monotonic())

    async def is_open(self, wait: float = 0.05) -> bool:
        """True if the server has neither answered nor closed within `wait` seconds."""
        if self.reader.at_eof():
            return False
        try:
            self._read += await asyncio.wait_for(self.reader.read(1), wait)
        except TimeoutError:
            return True
        except ConnectionError:
            return False
        return False  # the server spoke, or closed

    async def response(self, timeout: float = 10) -> Answer:
        """One response (with a Content-Length) on a connection that stays open."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = int(Answer(head, 0.0).headers["content-length"])
            body = await self.reader.readexactly(length)
        return Answer(head + body, time.monotonic())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def request_head(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> bytes:
    """A request line and headers (ending the head) for `path`."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
