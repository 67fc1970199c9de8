"""Run the demo upstream (quotagate.gateway.demo) in a real uvicorn server for tests.

Why a real server: the gateway's job is HTTP — streaming, dropped connections, status codes —
so the tests need an upstream reached over TCP, not an in-process transport. The server runs
in a background thread with its own event loop, on 127.0.0.1 and a port the OS picks (the
socket is bound before the server starts, so there is no race for the port).

Use it as a context manager::

    with running_upstream() as up:
        client = openai.OpenAI(base_url=up.base_url, api_key="x")
        up.knobs.fail_status = 503
        ...
        assert up.requests[-1]["max_tokens"] == 7

or unpack it: ``base_url, knobs, requests = up``. The ``upstream`` pytest fixture below yields
one per test (import it into a test module or a conftest to use it by name).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from quotagate.gateway.demo import DemoSettings, DemoUpstream, RecordedRequest

__all__ = ["RunningUpstream", "free_port", "running_upstream", "upstream"]


@dataclass
class RunningUpstream:
    """A live demo upstream: where it is, its knobs, and what it received."""

    base_url: str
    """``http://127.0.0.1:PORT/v1`` — what an OpenAI client or a gateway channel points at."""
    root_url: str
    """``http://127.0.0.1:PORT`` without the ``/v1``."""
    port: int
    app: DemoUpstream

    @property
    def knobs(self) -> DemoSettings:
        return self.app.settings

    @property
    def requests(self) -> list[Any]:
        """Parsed JSON bodies of every POST received, in order."""
        return self.app.requests

    @property
    def log(self) -> list[RecordedRequest]:
        """Method, path, headers and body of every request received."""
        return self.app.log

    def __iter__(self) -> Iterator[Any]:
        return iter((self.base_url, self.knobs, self.requests))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that bind themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_upstream(
    settings: DemoSettings | None = None, *, startup_timeout: float = 10.0
) -> Iterator[RunningUpstream]:
    """Serve a fresh :class:`DemoUpstream` on loopback for the duration of the ``with``."""
    app = DemoUpstream(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        log_level="critical",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        # Keep-alive long enough that pooled client connections are not closed under the test.
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"demo-upstream-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("demo upstream server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("demo upstream did not start in time")
            time.sleep(0.005)
        root = f"http://127.0.0.1:{port}"
        yield RunningUpstream(base_url=f"{root}/v1", root_url=root, port=port, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
        sock.close()


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    """A demo upstream per test, default knobs, empty record."""
    with running_upstream() as up:
        yield up
