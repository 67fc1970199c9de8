"""What the SQLite store does beyond the store contract: settle and cancel take the ticket
out with `DELETE … RETURNING` where SQLite has it (3.35+) and with SELECT then DELETE on
older SQLite, with the same result; and checkpoints run in the background."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from quotagate.core.decisions import Hold
from quotagate.store import sqlite as sqlite_store
from quotagate.store.base import EventQuery, UsageEvent
from quotagate.store.factory import open_store


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "select-delete"])
async def test_settle_and_cancel_take_the_ticket_once(
    returning: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if returning and not sqlite_store._HAS_RETURNING:
        pytest.skip("this SQLite has no RETURNING")
    monkeypatch.setattr(sqlite_store, "_HAS_RETURNING", returning)
    store, _catalog, engine = open_store(f"sqlite:///{tmp_path / 'quotagate.db'}")
    try:
        for ticket_id in ("settled", "cancelled"):
            decision = await store.reserve(
                ticket_id,
                [Hold("k", ("k",), 1000, 100, 1, None)],
                200,
                strict=True,
                min_output=1,
                expires_at=1_000.0,
                payload="{}",
            )
            assert decision.admitted
        assert await store.counters(["k"]) == {"k": (0, 600)}

        charged = UsageEvent("settled", "u", "m", 1.0, 2.0, charges=[("k", 130)])
        written = await store.commit("settled", charged)
        assert written is not None and written.id is not None
        again = await store.commit("settled", UsageEvent("settled", "u", "m", 1.0, 2.0))
        assert again is not None and (again.id, again.charges) == (written.id, [("k", 130)])

        assert await store.release("cancelled")
        assert not await store.release("cancelled")
        assert not await store.release("settled")

        assert await store.counters(["k"]) == {"k": (130, 0)}
        assert await store.ticket("settled") is None
        assert await store.ticket("cancelled") is None
        assert len(await store.events(EventQuery())) == 1
    finally:
        await store.close()
        engine.dispose()


async def test_writes_reach_the_database_file_without_more_traffic(tmp_path: Path) -> None:
    """The background checkpoint copies the WAL into the database file about once a
    second, so an idle store does not leave its last writes only in the WAL."""
    path = tmp_path / "quotagate.db"
    store, _catalog, engine = open_store(f"sqlite:///{path}")
    try:
        await store.reserve(
            "t1",
            [Hold("k", ("k",), 1000, 100, 1, None)],
            200,
            strict=True,
            min_output=1,
            expires_at=1_000.0,
            payload="{}",
        )
        deadline = time.monotonic() + 10 * sqlite_store.CHECKPOINT_SECONDS
        found: list[tuple[str]] = []
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            # immutable=1 reads the database file alone, ignoring the WAL
            with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as main_file:
                try:
                    found = main_file.execute("SELECT id FROM tickets").fetchall()
                except sqlite3.OperationalError:  # not even the tables are in it yet
                    found = []
        assert found == [("t1",)]
    finally:
        await store.close()
        engine.dispose()
