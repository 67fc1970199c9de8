"""Calling an upstream channel over HTTP.

aiohttp rather than httpx: measured against the same local upstream, aiohttp made about
six times as many requests per second at concurrency 1 and over ten times at 64 (see
docs/benchmarks.md), and a gateway pays that on every request. One pooled session is
shared by every request of the process, so connections to an upstream are reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

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
        b"date",
        b"server",
        b"set-cookie",
        b"alt-svc",
        b"proxy-authenticate",
        b"trailer",
        b"upgrade",
    }
)


class UpstreamFailure(Exception):
    """The upstream could not be reached, timed out or dropped the connection."""


class UpstreamResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    @property
    def content_type(self) -> bytes:
        return self._response.headers.get("content-type", "application/json").encode("latin-1")

    def headers(self) -> Headers:
        """The upstream's headers worth passing on (lower-case names)."""
        out = []
        for name, value in self._response.raw_headers:
            lowered = name.lower()
            if lowered in _DROP or lowered.startswith(b"x-ratelimit") or lowered == b"content-type":
                continue
            out.append((lowered, value))
        return out

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamFailure(_describe(exc)) from None
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        try:
            async for data in self._response.content.iter_any():
                yield data
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamFailure(_describe(exc)) from None

    def close(self) -> None:
        """Stop reading: the connection is dropped unless the body was read to its end."""
        self._response.close()


class UpstreamClient:
    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 600.0) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                timeout=self._timeout,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def post(self, url: str, body: bytes, api_key: str | None) -> UpstreamResponse:
        headers = {"content-type": "application/json", "user-agent": "quotagate"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        try:
            response = await self._open().post(url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailure(_describe(exc)) from None
        return UpstreamResponse(response)

    async def get(self, url: str, api_key: str | None, timeout: float = 5.0) -> int:
        """Status of a GET (readiness probes); raises UpstreamFailure when unreachable."""
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with self._open().get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await response.read()
                return response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailure(_describe(exc)) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: BaseException) -> str:
    """What went wrong, without the URL's query or any header (keys stay out of logs)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or 'refused'})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the upstream ended the response early"
    return type(exc).__name__
