"""Waiting for SQLite never stops the event loop, and a call that gives up loses nothing.

Another process holds the database's write lock (tests.support.store_loop_locker): the
engine's callers get StoreUnavailable after `store_timeout` while the loop keeps turning;
a reservation whose caller gave up is never left behind, and a settle whose caller gave
up is written once the lock frees, exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from quotagate.core.errors import StoreUnavailable
from quotagate.core.pricing import Usage
from quotagate.engine import AdmitContext, Engine
from quotagate.store.base import EventQuery
from quotagate.store.factory import open_engine
from quotagate.store.sqlite import SQLiteStore
from tests.support.store_loop_locker import write_lock_held

pytestmark = pytest.mark.timeout(90)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
TIMEOUT = 0.5
T = TypeVar("T")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "qg.db"


@pytest.fixture
async def engine(path: Path, isolated_environment: None) -> AsyncIterator[Engine]:
    opened = open_engine(
        f"sqlite:///{path}", catalog_refresh_seconds=0, timezone="UTC", store_timeout=TIMEOUT
    )
    opened.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    opened.catalog.ensure_user("alice", "user")
    yield opened
    await opened.close()


def alice(max_tokens: int = 100) -> AdmitContext:
    return AdmitContext(user="alice", model="gpt-4o", prompt_tokens=10, max_tokens=max_tokens)


class LoopWatch:
    """The longest the event loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def timed(call: Awaitable[T]) -> tuple[float, T | BaseException]:
    started = time.monotonic()
    try:
        result: T | BaseException = await call
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return list(conn.execute(sql))


async def test_a_held_write_lock_never_stops_the_event_loop(engine: Engine, path: Path) -> None:
    """A reservation, a new user's catalog write and reads, all while another process
    holds the lock: each write gives up after store_timeout, reads answer at once, and
    the loop never stalls."""
    held = await engine.admit(alice(), now=NOW)
    with LoopWatch() as watch, write_lock_held(path):
        spent, refused = await timed(engine.admit(alice(), now=NOW))
        assert isinstance(refused, StoreUnavailable), refused
        assert TIMEOUT * 0.8 <= spent < TIMEOUT + 1.0
        new_user = AdmitContext(user="bob", model="gpt-4o", prompt_tokens=10, max_tokens=10)
        spent, refused = await timed(engine.admit(new_user, now=NOW))
        assert isinstance(refused, StoreUnavailable), refused  # creating bob waits for the lock
        assert TIMEOUT * 0.8 <= spent < TIMEOUT + 1.0
        spent, statuses = await timed(engine.status("alice", now=NOW))
        assert spent < 0.2 and not isinstance(statuses, BaseException)
        assert {(s.used, s.reserved) for s in statuses} == {(0, 110)}
    assert watch.longest < 0.2, f"the event loop stalled for {watch.longest:.2f} s"
    await engine.settle(held, Usage(10, 20), now=NOW)
    assert rows(path, "SELECT count(*) FROM tickets") == [(0,)]
    assert await engine.reconcile(repair=False) == []


async def test_a_settle_that_gave_up_is_written_once_the_lock_frees(
    engine: Engine, path: Path
) -> None:
    ticket = await engine.admit(alice(), now=NOW)
    with write_lock_held(path):
        spent, refused = await timed(engine.settle(ticket, Usage(10, 30), now=NOW))
        assert isinstance(refused, StoreUnavailable), refused
        assert spent < TIMEOUT + 1.0
        assert rows(path, "SELECT count(*) FROM usage_events") == [(0,)]
    deadline = time.monotonic() + 10
    while rows(path, "SELECT count(*) FROM tickets") != [(0,)] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    events = await engine.store.events(EventQuery())
    assert [(e.ticket_id, e.total_tokens, e.status) for e in events] == [(ticket.id, 40, "settled")]
    again = await engine.settle(ticket, Usage(10, 30), now=NOW)  # the caller's retry
    assert again.id == events[0].id
    assert len(await engine.store.events(EventQuery())) == 1
    assert await engine.sweep(datetime(2025, 6, 3, tzinfo=UTC)) == []
    assert await engine.reconcile(repair=False) == []


async def test_a_reservation_applied_after_its_caller_gave_up_is_released(
    engine: Engine, path: Path
) -> None:
    """The timeout strikes while the reservation's transaction commits (a slow disk):
    the caller was refused, so the reservation made for nobody is released at once."""
    store = engine.store
    assert isinstance(store, SQLiteStore)
    slowed: list[str] = []

    def slow_first_commit(sql: str) -> None:
        if sql == "COMMIT" and not slowed:
            slowed.append(sql)
            time.sleep(TIMEOUT * 2)  # on the writer thread, inside the transaction

    store._conn.set_trace_callback(slow_first_commit)  # the writer thread's connection
    admitting = asyncio.create_task(timed(engine.admit(alice(), now=NOW)))
    with write_lock_held(path):
        await asyncio.sleep(0.1)  # the lock is taken: the admit waits on the writer thread
    spent, refused = await admitting
    assert isinstance(refused, StoreUnavailable), refused
    assert spent < TIMEOUT * 1.5
    counters = "SELECT count(*), sum(reserved), sum(used) FROM counters"
    deadline = time.monotonic() + 10
    while rows(path, counters) != [(1, 0, 0)] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # committed (the counter row is there), then released
    assert slowed, "the reservation was never committed"
    assert rows(path, counters) == [(1, 0, 0)]
    assert rows(path, "SELECT count(*) FROM tickets") == [(0,)]
    assert await engine.reconcile(repair=False) == []
