"""Group commit on SQLite: concurrent requests share transactions, each still gets its
own outcome, the limits hold, and a caller that leaves never strands a reservation."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from quotagate.core.errors import QuotaExceeded, StoreUnavailable
from quotagate.core.pricing import Usage
from quotagate.engine import AdmitContext, Engine
from quotagate.store.factory import open_engine
from quotagate.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)


@pytest.fixture
async def engine(tmp_path: Path, isolated_environment: None) -> AsyncIterator[Engine]:
    opened = open_engine(
        f"sqlite:///{tmp_path / 'qg.db'}",
        catalog_refresh_seconds=0,
        timezone="UTC",
        store_timeout=0.5,
    )
    opened.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    opened.catalog.set_limit("role", "user", "requests", "day", 1_000)
    opened.catalog.ensure_user("alice", "user")
    yield opened
    await opened.close()


def transactions(store: SQLiteStore) -> list[int]:
    """A list that grows by one at every write transaction the store begins (on the event
    loop's connection or the writer thread's)."""
    begun: list[int] = []
    for conn in (store._inline_conn, store._conn):
        conn.set_trace_callback(
            lambda sql: begun.append(1) if sql.startswith("BEGIN IMMEDIATE") else None
        )
    return begun


async def test_concurrent_requests_share_transactions_and_never_overspend(engine: Engine) -> None:
    store = engine.store
    assert isinstance(store, SQLiteStore)
    begun = transactions(store)

    async def request(n: int) -> int:
        context = AdmitContext(user=f"u{n % 5}", model="gpt-4o", prompt_tokens=100, max_tokens=900)
        try:
            ticket = await engine.admit(context, now=NOW)
        except QuotaExceeded:
            return 0
        await engine.settle(ticket, Usage(100, ticket.max_tokens), now=NOW)
        return 1

    admitted = sum(await asyncio.gather(*(request(n) for n in range(100))))
    # five users with 10,000 tokens a day each and 20 requests each of 100 + 900 tokens:
    # the first 10 of each fit exactly, then not even a prompt fits
    assert admitted == 50
    for user in (f"u{n}" for n in range(5)):
        tokens = next(s for s in await engine.status(user, now=NOW) if s.metric.value == "tokens")
        assert (tokens.used, tokens.reserved) == (10_000, 0)
    assert await engine.reconcile(repair=False) == []
    writes = 2 * admitted + (100 - admitted)  # admit+settle, or a refused admit
    assert len(begun) * 4 <= writes, f"{len(begun)} transactions for {writes} writes"


def pending_tickets(path: Path) -> int:
    """The tickets in the file, read without yielding to the event loop (so nothing the
    writer thread finished can be delivered meanwhile)."""
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM tickets").fetchone()[0])


async def cancel_admit(engine: Engine, path: Path, *, applied: bool) -> int:
    """Start an admit, cancel it before (`applied=False`) or after its batch was applied
    but before the caller saw the outcome, let whatever the cancellation set off finish;
    the tickets pending just before the cancellation."""
    store = engine.store
    assert isinstance(store, SQLiteStore)
    context = AdmitContext(user="alice", model="gpt-4o", prompt_tokens=10, max_tokens=100)
    task = asyncio.create_task(engine.admit(context, now=NOW))
    while not store._writes._open:  # the admit's reservation waits for its hand-over
        await asyncio.sleep(0)
    if applied:
        await asyncio.sleep(0)  # the hand-over runs: the writer thread takes the batch
        deadline = time.monotonic() + 10
        while not pending_tickets(path) and time.monotonic() < deadline:
            time.sleep(0.001)  # block the loop: the outcome cannot reach the caller
    pending = pending_tickets(path)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)  # the release the cancellation set off goes through the writer
    return pending


async def nothing_held_or_used(engine: Engine) -> None:
    assert await engine.store.expired(float("inf")) == []
    statuses = await engine.status("alice", now=NOW)
    assert statuses and all((s.used, s.reserved) == (0, 0) for s in statuses)
    assert await engine.reconcile(repair=False) == []


async def test_a_caller_cancelled_after_its_reservation_gets_it_released(
    engine: Engine, tmp_path: Path
) -> None:
    """The batch reserved, then the caller was cancelled before it could take the ticket:
    nobody holds that ticket, so the engine releases it instead of leaving it to the
    lease (which would charge the user for a request never made)."""
    pending = await cancel_admit(engine, tmp_path / "qg.db", applied=True)
    assert pending == 1, "the reservation was not made before the cancellation"
    await nothing_held_or_used(engine)


async def test_a_caller_cancelled_before_its_batch_ran_reserves_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    pending = await cancel_admit(engine, tmp_path / "qg.db", applied=False)
    assert pending == 0
    await nothing_held_or_used(engine)


async def test_a_locked_database_fails_every_write_of_the_batch_cleanly(
    engine: Engine, tmp_path: Path
) -> None:
    """Another process holds the write lock past store_timeout: each caller gets a
    StoreUnavailable, nothing is half-written, and the store works once the lock goes."""
    blocker = sqlite3.connect(tmp_path / "qg.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    contexts = [
        AdmitContext(user="alice", model="gpt-4o", prompt_tokens=10, max_tokens=10)
        for _ in range(3)
    ]
    outcomes = await asyncio.gather(
        *(engine.admit(c, now=NOW) for c in contexts), return_exceptions=True
    )
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    blocker.execute("ROLLBACK")
    blocker.close()
    ticket = await engine.admit(contexts[0], now=NOW)
    await engine.settle(ticket, Usage(10, 10), now=NOW)
    assert await engine.reconcile(repair=False) == []
    tokens = next(s for s in await engine.status("alice", now=NOW) if s.metric.value == "tokens")
    assert (tokens.used, tokens.reserved) == (20, 0)


async def test_writes_waiting_for_their_turn_are_applied_before_the_store_closes(
    tmp_path: Path, isolated_environment: None
) -> None:
    url = f"sqlite:///{tmp_path / 'closing.db'}"
    engine = open_engine(url, catalog_refresh_seconds=0)
    context = AdmitContext(user="alice", model="gpt-4o", prompt_tokens=10, max_tokens=10)
    ticket = await engine.admit(context, now=NOW)
    settling = asyncio.create_task(engine.settle(ticket, Usage(10, 5), now=NOW))
    await asyncio.sleep(0)  # the settle waits for its batch
    await engine.close()
    event = await settling
    assert event.total_tokens == 15
    reopened = open_engine(url, catalog_refresh_seconds=0)
    try:
        stored = await reopened.store.event(ticket.id)
        assert stored is not None and stored.total_tokens == 15
        assert await reopened.reconcile(repair=False) == []
    finally:
        await reopened.close()
