"""Several OS processes admit and settle on one SQLite file against a tight daily limit:
the limit holds across processes, some requests are refused, and the counters equal the
ledger afterwards. Each process runs several tasks at once, as a gateway worker does, so
its writes go to the file in group-committed batches that compete with the others'.

Processes are started with `spawn`, so each one has its own interpreter, its own engine,
its own SQLite connections: nothing is shared but the file."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quotagate.core.errors import QuotaExceeded
from quotagate.core.pricing import Usage
from quotagate.engine import AdmitContext
from quotagate.store.base import EventQuery
from quotagate.store.factory import open_engine
from quotagate.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(120)

PROCESSES = 4
PAIRS = 250
TASKS = 8  # concurrent tasks per process, sharing its PAIRS
DAILY_LIMIT = 60_000
NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
NEWCOMERS = [f"newcomer-{n}" for n in range(5)]
SETTINGS: dict[str, Any] = dict(
    mode="strict",
    timezone="UTC",
    lease_seconds=600.0,
    default_max_tokens=200,
    unknown_models="default_price",
    catalog_refresh_seconds=1.0,
)


def hammer(url: str, seed: int, start: Any, results: Any) -> None:
    """One process: PAIRS admit+settle pairs; puts (seed, admitted, refused, clamped,
    write transactions), or (seed, traceback) if anything but a refusal went wrong."""
    try:
        _hammer(url, seed, start, results)
    except BaseException:
        results.put((seed, traceback.format_exc()))


def _hammer(url: str, seed: int, start: Any, results: Any) -> None:
    for name in [n for n in os.environ if n.startswith("QUOTAGATE_")]:
        del os.environ[name]
    os.environ["QUOTAGATE_CONFIG"] = "/nonexistent/quotagate.toml"
    rng = random.Random(seed)

    async def run() -> tuple[int, int, int, int]:
        engine = open_engine(url, create=False, **SETTINGS)
        admitted = refused = clamped = 0
        assert isinstance(engine.store, SQLiteStore)
        begun: list[str] = []
        engine.store._conn.set_trace_callback(
            lambda sql: begun.append(sql) if sql.startswith("BEGIN IMMEDIATE") else None
        )
        start.wait(60)  # everyone starts hammering at once
        try:
            # users first seen by several processes at the same moment
            for newcomer in NEWCOMERS:
                context = AdmitContext(
                    user=newcomer, model="gpt-4o", prompt_tokens=1, max_tokens=1, groups=["lab"]
                )
                await engine.settle(await engine.admit(context, now=NOW), Usage(1, 1), now=NOW)

            async def client(pairs: int) -> None:
                nonlocal admitted, refused, clamped
                for _ in range(pairs):
                    context = AdmitContext(
                        user="alice",
                        model="gpt-4o",
                        prompt_tokens=rng.randint(10, 80),
                        max_tokens=rng.randint(20, 200),
                    )
                    try:
                        ticket = await engine.admit(context, now=NOW)
                    except QuotaExceeded:
                        refused += 1
                        continue
                    admitted += 1
                    clamped += ticket.clamped
                    usage = Usage(ticket.prompt_tokens, rng.randint(0, ticket.max_tokens))
                    await engine.settle(ticket, usage, now=NOW)

            shares = [PAIRS // TASKS + (n < PAIRS % TASKS) for n in range(TASKS)]
            await asyncio.gather(*(client(share) for share in shares))
        finally:
            await engine.close()
        return admitted, refused, clamped, len(begun)

    results.put((seed, *asyncio.run(run())))


async def test_processes_sharing_one_sqlite_file_never_overspend(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    setup = open_engine(url, **SETTINGS)
    setup.catalog.set_limit("role", "user", "tokens", "day", DAILY_LIMIT)
    setup.catalog.set_limit("role", "user", "requests", "day", 10_000)
    setup.catalog.ensure_user("alice", "user")
    await setup.close()

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    queue = context.Queue()
    workers = [
        context.Process(target=hammer, args=(url, seed, start, queue), daemon=True)
        for seed in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=100) for _ in workers]
    for worker in workers:
        worker.join(10)
    failures = [r[1] for r in results if len(r) == 2]
    assert not failures, "\n".join(failures)
    assert [w.exitcode for w in workers] == [0] * PROCESSES

    admitted = sum(r[1] for r in results)
    refused = sum(r[2] for r in results)
    assert admitted + refused == PROCESSES * PAIRS
    assert refused > 0, "the limit never bound: make it tighter"
    # Interleaving really happened (which process wins more is up to the scheduler).
    assert sum(1 for r in results if r[1] > 0) >= 2, "only one process got requests through"
    print("admitted, refused, clamped, transactions per process:", sorted(results))
    # Group commit: the tasks of a process share transactions (a write each otherwise).
    writes = 2 * admitted + refused
    transactions = sum(r[4] for r in results)
    assert transactions < writes / 2, f"{transactions} transactions for {writes} writes"

    engine = open_engine(url, create=False, **SETTINGS)
    try:
        events = await engine.store.events(EventQuery(user_id="alice"))
        assert len(events) == admitted
        assert len({e.ticket_id for e in events}) == admitted
        total = sum(e.total_tokens for e in events)
        assert total <= DAILY_LIMIT
        assert all(e.excess == 0 for e in events)
        statuses = {s.metric.value: s for s in await engine.status("alice", now=NOW)}
        assert (statuses["tokens"].used, statuses["tokens"].reserved) == (total, 0)
        assert (statuses["requests"].used, statuses["requests"].reserved) == (admitted, 0)
        assert await engine.reconcile(repair=False) == []
        for newcomer in NEWCOMERS:
            user = engine.catalog.user(newcomer)
            assert user is not None and user.groups == ("lab",)
            assert len(await engine.store.events(EventQuery(user_id=newcomer))) == PROCESSES
    finally:
        await engine.close()
