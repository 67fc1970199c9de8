"""Counters and ledger in one SQLite file (WAL), shared safely by several processes.

The hot path uses the standard library's sqlite3 directly: an admit or a settle is one
``BEGIN IMMEDIATE`` transaction of a few statements, which takes SQLite's write lock, so
the check and the reservation are atomic across processes. Its cost depends on the
number of counters a request touches, never on the size of the ledger.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import orjson

from quotagate.core.decisions import Decision, Hold, decide
from quotagate.core.errors import StoreUnavailable
from quotagate.store.base import (
    CounterDiff,
    EventQuery,
    StoredTicket,
    UsageEvent,
    diff_counters,
    expected_counters,
)

log = logging.getLogger(__name__)

_EVENT_COLUMNS = (
    "id, ticket_id, user_id, key_id, model, channel, pool, source, status, estimated, "
    "started_at, settled_at, prompt_tokens, completion_tokens, cached_tokens, credits, "
    "excess, charges"
)
_UPSERT = (
    "INSERT INTO counters (key, used, reserved, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET used = used + excluded.used, "
    "reserved = reserved + excluded.reserved"
)
_INSERT_EVENT = (
    f"INSERT INTO usage_events ({_EVENT_COLUMNS.removeprefix('id, ')}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
CHECKPOINT_SECONDS = 1.0
INLINE_CHECKPOINT_PAGES = 10_000  # SQLite's default: 1,000 pages (4 MB of WAL)


def connect(path: str, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection tuned for QuotaGate: WAL, NORMAL sync, waits for the write lock."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SQLiteStore:
    def __init__(self, path: str, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self._conn = connect(path)
        self._lock = threading.Lock()
        # In WAL mode with synchronous=NORMAL a commit does not fsync; a checkpoint does,
        # and SQLite runs it inside the commit that crosses wal_autocheckpoint pages. A
        # background thread checkpoints instead, so requests rarely wait for an fsync; the
        # raised limit keeps an inline checkpoint as the backstop (WAL ≤ ~40 MB).
        self._conn.execute(f"PRAGMA wal_autocheckpoint={INLINE_CHECKPOINT_PAGES}")
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="quotagate-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Every CHECKPOINT_SECONDS, copy the WAL into the database on a connection of its
        own. PASSIVE never takes the write lock, so writes go on while it syncs."""
        conn = connect(self.path)
        try:
            while not self._closing.wait(CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the next round, or the inline backstop, retries
                    log.debug("background checkpoint of %s failed: %s", self.path, exc)
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's lock from its first statement."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite store {self.path} is not writable: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                # Also when COMMIT itself fails (disk full, I/O error): never leave the
                # connection inside a transaction that every later write would join.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreUnavailable(f"SQLite store {self.path} failed: {exc}") from exc
                raise

    def _states(self, conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, used, reserved in conn.execute(
                f"SELECT key, used, reserved FROM counters WHERE key IN ({marks})", chunk
            ):
                found[key] = (used, reserved)
        return found

    async def reserve(
        self,
        ticket_id: str,
        holds: Sequence[Hold],
        want_output: int,
        *,
        strict: bool,
        min_output: int,
        expires_at: float,
        payload: str,
    ) -> Decision:
        with self._write() as conn:
            found = self._states(conn, [k for hold in holds for k in hold.read_keys])
            states = [_sum(found, hold.read_keys) for hold in holds]
            decision = decide(holds, states, want_output, strict=strict, min_output=min_output)
            if decision.admitted:
                conn.executemany(
                    _UPSERT,
                    [(h.key, 0, a, h.expires_at) for h, a in zip(holds, decision.amounts)],
                )
                held = [[h.key, a] for h, a in zip(holds, decision.amounts)]
                conn.execute(
                    "INSERT INTO tickets (id, expires_at, held, max_output, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (ticket_id, expires_at, _dumps(held), decision.max_output, payload),
                )
        return decision

    async def commit(self, ticket_id: str, event: UsageEvent) -> UsageEvent | None:
        with self._write() as conn:
            held = _take_ticket(conn, ticket_id)
            if held is None:
                return self._event(conn, ticket_id)
            deltas: dict[str, list[int]] = {}
            for key, amount in orjson.loads(held):
                deltas.setdefault(key, [0, 0])[1] -= amount
            for key, amount in event.charges:
                deltas.setdefault(key, [0, 0])[0] += amount
            conn.executemany(_UPSERT, [(k, u, r, None) for k, (u, r) in deltas.items()])
            cursor = conn.execute(
                _INSERT_EVENT,
                (
                    event.ticket_id,
                    event.user_id,
                    event.key_id,
                    event.model,
                    event.channel,
                    event.pool,
                    event.source,
                    event.status,
                    event.estimated,
                    event.started_at,
                    event.settled_at,
                    event.prompt_tokens,
                    event.completion_tokens,
                    event.cached_tokens,
                    event.credits,
                    event.excess,
                    _dumps(event.charges),
                ),
            )
            event.id = cursor.lastrowid
        return event

    async def release(self, ticket_id: str) -> bool:
        with self._write() as conn:
            held = _take_ticket(conn, ticket_id)
            if held is None:
                return False
            conn.executemany(
                _UPSERT, [(key, 0, -amount, None) for key, amount in orjson.loads(held)]
            )
        return True

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads: shared with writes, so taken under the same lock."""
        with self._lock:
            yield self._conn

    async def ticket(self, ticket_id: str) -> StoredTicket | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT id, expires_at, held, max_output, payload FROM tickets WHERE id = ?",
                (ticket_id,),
            ).fetchone()
        return _ticket(row) if row else None

    async def expired(self, now: float, limit: int = 500) -> list[StoredTicket]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, expires_at, held, max_output, payload FROM tickets "
                "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_ticket(row) for row in rows]

    async def counters(self, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        with self._read() as conn:
            return self._states(conn, keys)

    async def event(self, ticket_id: str) -> UsageEvent | None:
        with self._read() as conn:
            return self._event(conn, ticket_id)

    def _event(self, conn: sqlite3.Connection, ticket_id: str) -> UsageEvent | None:
        row = conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM usage_events WHERE ticket_id = ?", (ticket_id,)
        ).fetchone()
        return _usage_event(row) if row else None

    async def events(self, query: EventQuery) -> list[UsageEvent]:
        clauses, params = _where(query)
        sql = f"SELECT {_EVENT_COLUMNS} FROM usage_events{clauses} ORDER BY id"
        if query.limit:
            sql += f" LIMIT {int(query.limit)}"
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_usage_event(row) for row in rows]

    async def reconcile(self, repair: bool) -> list[CounterDiff]:
        with self._write() as conn:
            actual = {
                key: (used, reserved)
                for key, used, reserved in conn.execute(
                    "SELECT key, used, reserved FROM counters WHERE used != 0 OR reserved != 0"
                )
            }
            events = [
                _usage_event(row)
                for row in conn.execute(f"SELECT {_EVENT_COLUMNS} FROM usage_events")
            ]
            tickets = [
                _ticket(row)
                for row in conn.execute(
                    "SELECT id, expires_at, held, max_output, payload FROM tickets"
                )
            ]
            diffs = diff_counters(actual, expected_counters(events, tickets))
            if repair:
                conn.executemany(
                    "INSERT INTO counters (key, used, reserved) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET used = excluded.used, "
                    "reserved = excluded.reserved",
                    [(d.key, d.expected_used, d.expected_reserved) for d in diffs],
                )
        return diffs

    async def close(self) -> None:
        self._closing.set()
        self._checkpointer.join()
        with self._lock:
            self._conn.close()


def _take_ticket(conn: sqlite3.Connection, ticket_id: str) -> str | None:
    """Deletes a ticket and returns what it held (its JSON), or None if it is gone. One
    statement where SQLite has RETURNING (3.35+): a settle is on every request's path."""
    if _HAS_RETURNING:
        rows = conn.execute("DELETE FROM tickets WHERE id = ? RETURNING held", (ticket_id,))
        row = rows.fetchone()
        rows.fetchall()  # step the statement to its end, so it is finished before COMMIT
    else:
        row = conn.execute("SELECT held FROM tickets WHERE id = ?", (ticket_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM tickets WHERE id = ?", (ticket_id,))
    return None if row is None else str(row[0])


def _dumps(value: object) -> str:
    """JSON text of the [[key, amount], ...] lists kept in the ledger and tickets."""
    return orjson.dumps(value).decode()


def _sum(found: dict[str, tuple[int, int]], keys: Sequence[str]) -> tuple[int, int]:
    """(used, reserved) summed over `keys`; keys never written count as zero."""
    used = reserved = 0
    for key in keys:
        state = found.get(key)
        if state is not None:
            used += state[0]
            reserved += state[1]
    return used, reserved


def _where(query: EventQuery) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    for column, op, value in (
        ("user_id", "=", query.user_id),
        ("model", "=", query.model),
        ("started_at", ">=", query.since),
        ("started_at", "<", query.until),
    ):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _ticket(row: tuple) -> StoredTicket:
    held = tuple((key, amount) for key, amount in orjson.loads(row[2]))
    return StoredTicket(row[0], row[1], held, row[3], row[4])


def _usage_event(row: tuple) -> UsageEvent:
    return UsageEvent(
        id=row[0],
        ticket_id=row[1],
        user_id=row[2],
        key_id=row[3],
        model=row[4],
        channel=row[5],
        pool=row[6],
        source=row[7],
        status=row[8],
        estimated=bool(row[9]),
        started_at=row[10],
        settled_at=row[11],
        prompt_tokens=row[12],
        completion_tokens=row[13],
        cached_tokens=row[14],
        credits=row[15],
        excess=row[16],
        charges=[(key, amount) for key, amount in orjson.loads(row[17])],
    )
