"""Run the real gateway on loopback for tests: uvicorn with the options `serve` runs it with
(uvloop, httptools bounded by quotagate/gateway/protocol.py) in a background thread, on a port
the OS picked, over a SQLite file of its own.

The test talks to it over HTTP (the `openai` SDK, httpx) and reads the ledger through a
second SQLite connection, as another process would. Time is a :class:`MovableClock` the
test can push forward (to the next day) instead of sleeping.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import sqlalchemy as sa
import uvicorn

from quotagate.config import ChannelConfig, Settings
from quotagate.engine import Engine
from quotagate.gateway import Gateway
from quotagate.gateway.server import uvicorn_options
from quotagate.store.base import EventQuery, UsageEvent
from quotagate.store.catalog import Catalog
from quotagate.store.factory import _sqlite_pragmas
from quotagate.store.migrate import upgrade
from quotagate.store.sqlite import SQLiteStore
from tests.support.upstream import RunningUpstream

_TEMPLATE: dict[str, Path] = {}


def migrated_sqlite(directory: Path) -> str:
    """A migrated SQLite file in `directory`, copied from a template migrated once."""
    if "db" not in _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="quotagate-gw-template-")) / "template.db"
        engine = sa.create_engine(f"sqlite:///{template}")
        upgrade(engine)
        engine.dispose()
        _TEMPLATE["db"] = template
    path = directory / "quotagate.db"
    shutil.copyfile(_TEMPLATE["db"], path)
    return f"sqlite:///{path}"


def drop_template() -> None:
    if "db" in _TEMPLATE:
        shutil.rmtree(_TEMPLATE.pop("db").parent, ignore_errors=True)


class MovableClock:
    """Now, plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)

    def next_day(self, tz: str = "UTC") -> None:
        """Move to 00:00:05 of the next day (so a daily window has reset)."""
        now = self()
        tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=5, microsecond=0)
        self.offset += tomorrow - now


def channel(
    name: str, up: RunningUpstream | str, models: Sequence[str] | dict[str, str], **extra: Any
) -> ChannelConfig:
    base = up if isinstance(up, str) else up.base_url
    return ChannelConfig(
        name=name,
        base_url=base,
        models=list(models) if not isinstance(models, dict) else models,
        **extra,
    )


@dataclass
class RunningGateway:
    base_url: str  # http://127.0.0.1:PORT/v1
    root_url: str  # http://127.0.0.1:PORT
    gateway: Gateway
    engine: Engine
    clock: MovableClock
    reader: SQLiteStore
    server: uvicorn.Server
    http: httpx.Client  # keeps its connections, like a real client would

    def key(self, user: str = "alice", models: Sequence[str] | None = None, **extra: Any) -> str:
        _, secret = self.engine.catalog.create_key(user, "test", models, **extra)
        return secret

    def client(self, key: str, **extra: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=key, max_retries=0, timeout=20, **extra
        )

    def async_client(self, key: str, **extra: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=key, max_retries=0, timeout=30, **extra
        )

    def limit(self, *args: Any, **kwargs: Any) -> None:
        self.engine.catalog.set_limit(*args, **kwargs)

    async def events(self, user: str | None = None) -> list[UsageEvent]:
        return await self.reader.events(EventQuery(user_id=user))

    async def counters(self) -> dict[str, tuple[int, int]]:
        rows = self.reader._conn.execute("SELECT key, used, reserved FROM counters").fetchall()
        return {k: (u, r) for k, u, r in rows}

    async def pending(self) -> int:
        return int(self.reader._conn.execute("SELECT COUNT(*) FROM tickets").fetchone()[0])

    async def settled(
        self, count: int, user: str | None = None, timeout: float = 5.0
    ) -> list[UsageEvent]:
        """The ledger once it holds `count` events (settling may trail the client by a hair
        when the client left first)."""
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(user)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.02)


@contextlib.contextmanager
def running_gateway(
    directory: Path,
    channels: Sequence[ChannelConfig] = (),
    *,
    graceful: float = 2.0,
    **settings: Any,
) -> Iterator[RunningGateway]:
    url = migrated_sqlite(directory)
    settings.setdefault("catalog_refresh_seconds", 0)
    settings.setdefault("access_log", True)
    config = Settings(
        database_url=url, channels=list(channels), graceful_shutdown_seconds=graceful, **settings
    )
    # the file is migrated already: open it without asking Alembic again
    db = sa.create_engine(url, connect_args={"timeout": 30})
    sa.event.listen(db, "connect", _sqlite_pragmas)
    catalog = Catalog(db, config.timezone)
    store = SQLiteStore(url.removeprefix("sqlite:///"), timeout=config.store_timeout)
    engine = Engine(store, catalog, config)
    clock = MovableClock()
    gateway = Gateway(engine, config, clock=clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    options = uvicorn_options(config) | {
        "log_level": "critical",
        "timeout_graceful_shutdown": max(1, int(graceful)),
    }
    server = uvicorn.Server(uvicorn.Config(gateway, **options))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"gateway-{port}", daemon=True
    )
    thread.start()
    reader = SQLiteStore(url.removeprefix("sqlite:///"))
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("gateway server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not start in time")
            time.sleep(0.005)
        root = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=20) as http:
            yield RunningGateway(f"{root}/v1", root, gateway, engine, clock, reader, server, http)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        reader._conn.close()
        engine.catalog.db.dispose()
        with contextlib.suppress(Exception):
            engine.store._conn.close()  # type: ignore[attr-defined]
