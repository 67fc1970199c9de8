"""Counters and ledger in one SQLite file (WAL), shared safely by several processes.

The hot path uses the standard library's sqlite3 directly. Writes (reserve, commit,
release, renew) go through :mod:`~quotagate.store.group_commit`: those submitted in the same turn
of the event loop are applied in order in one ``BEGIN IMMEDIATE`` transaction, which takes
SQLite's write lock, so every check and its reservation are atomic across processes. A
write's cost depends on the number of counters it touches, never on the size of the
ledger, and concurrent requests share the transaction's fixed cost.

No SQLite call waits on the event loop. A batch of writes runs there only if its
transaction can begin at once (a connection with no busy timeout); otherwise, and after
it, on the group commit's writer thread, whose connection waits for the lock. Reads,
pruning and reconciling run on a small pool of threads with connections of their own
(in WAL mode a reader never waits for a writer). While another process holds the write
lock the loop carries on, and a caller that cannot reach the store within `timeout`
seconds gets :class:`StoreUnavailable`: a reservation is then withdrawn (released if it
was made after all), while a settle or a release stays queued and is applied once the
lock frees.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson

from quotagate.config import DEFAULT_STORE_TIMEOUT
from quotagate.core.decisions import Decision, Hold, decide
from quotagate.core.errors import StoreUnavailable
from quotagate.store.base import (
    SLOT_SECONDS,
    CounterDiff,
    EventQuery,
    StoredTicket,
    UsageEvent,
    UsageSum,
    check_usage_group,
    diff_counters,
    expected_counters,
    summed,
)
from quotagate.store.group_commit import Busy, GroupCommit

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVENT_COLUMNS = (
    "id, ticket_id, user_id, key_id, model, channel, pool, source, status, estimated, "
    "started_at, settled_at, prompt_tokens, completion_tokens, cached_tokens, credits, "
    "excess, charges"
)
_TICKET_COLUMNS = "id, expires_at, held, max_output, payload"
_UPSERT = (
    "INSERT INTO counters (key, used, reserved, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET used = used + excluded.used, "
    "reserved = reserved + excluded.reserved"
)
_INSERT_EVENT = (
    f"INSERT INTO usage_events ({_EVENT_COLUMNS.removeprefix('id, ')}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_TICKET = (
    "INSERT INTO tickets (id, expires_at, held, max_output, payload) VALUES (?, ?, ?, ?, ?)"
)
_USAGE_GROUP_SQL = {
    "user": "user_id",
    "model": "model",
    "slot": f"CAST(started_at / {SLOT_SECONDS} AS INTEGER)",
}
_PRUNED_BEFORE = "counters_pruned_before"  # meta row: the latest prune's horizon
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
CHECKPOINT_SECONDS = 1.0
INLINE_CHECKPOINT_PAGES = 10_000  # SQLite's default: 1,000 pages (4 MB of WAL)
#: how long the writer waits for the write lock before it looks at its queue again (drops
#: the reservations whose callers gave up, takes in the writes that came meanwhile)
LOCK_ROUND_SECONDS = 0.1
#: threads (each with its own connection) for reads, pruning and reconciling
JOB_THREADS = 2


def connect(path: str, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection tuned for QuotaGate: WAL, NORMAL sync, waits for the write lock."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    # In WAL mode with synchronous=NORMAL a commit does not fsync; a checkpoint does, and
    # SQLite runs it inside the commit that crosses wal_autocheckpoint pages. A background
    # thread checkpoints instead, so requests rarely wait for an fsync; the raised limit
    # keeps an inline checkpoint as the backstop (WAL ≤ ~40 MB).
    conn.execute(f"PRAGMA wal_autocheckpoint={INLINE_CHECKPOINT_PAGES}")
    return conn


def _waiting(conn: sqlite3.Connection, seconds: float) -> sqlite3.Connection:
    """`conn`, waiting at most `seconds` for a lock from now on (once it is set up)."""
    conn.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")
    return conn


class SQLiteStore:
    def __init__(
        self, path: str, url: str | None = None, *, timeout: float = DEFAULT_STORE_TIMEOUT
    ) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        #: how long a caller waits for the store before it gets StoreUnavailable
        self.timeout = timeout
        #: the writer thread's connection: waits for the lock a round at a time
        self._conn = _waiting(connect(path), min(timeout, LOCK_ROUND_SECONDS))
        #: the event loop's: never waits (Busy at once), so a batch it cannot apply goes
        #: to the writer thread
        self._inline_conn = _waiting(connect(path), 0)
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="quotagate-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self._jobs = ThreadPoolExecutor(JOB_THREADS, thread_name_prefix="quotagate-sqlite")
        self._local = threading.local()
        self._job_conns: list[sqlite3.Connection] = []
        self._job_conns_lock = threading.Lock()
        self._writes: GroupCommit[_Write] = GroupCommit(
            self._apply,
            timeout=timeout,
            withdraw=_withdrawn,
            undo=_undo,
            inline=self._apply_inline,
            name="quotagate-sqlite-writer",
        )

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
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's lock from its first statement; Busy if
        the lock stayed taken for the connection's busy timeout."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                raise Busy(f"SQLite store {self.path} is locked by another writer") from exc
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

    # -- jobs: reads, pruning, reconciling, on threads with connections of their own ------
    async def _job(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._jobs, self._run_job, work)

    def _run_job(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                # waits for a lock at most as long as a caller waits for the store
                conn = self._local.conn = connect(self.path, self.timeout)
                with self._job_conns_lock:
                    self._job_conns.append(conn)
            return work(conn)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite store {self.path} failed: {exc}") from exc

    # -- writes ----------------------------------------------------------------------------
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
        write = _Reserve(ticket_id, holds, want_output, strict, min_output, expires_at, payload)
        return cast(Decision, await self._writes.submit(write))

    async def commit(self, ticket_id: str, event: UsageEvent) -> UsageEvent | None:
        return cast(UsageEvent | None, await self._writes.submit(_Commit(ticket_id, event)))

    async def release(self, ticket_id: str) -> bool:
        return cast(bool, await self._writes.submit(_Release(ticket_id)))

    async def renew(self, ticket_ids: Sequence[str], expires_at: float) -> set[str]:
        if not ticket_ids:
            return set()
        return cast(set[str], await self._writes.submit(_Renew(ticket_ids, expires_at)))

    def _apply(self, writes: Sequence[_Write]) -> list[object]:
        """Apply a batch of writes in one transaction, each seeing the ones before it.

        If the transaction fails for a reason that is not the store's (one write breaks a
        constraint, say), the writes are applied one by one, so each gets its own outcome.
        On the writer thread, whose connection waits for the lock a round at a time: Busy,
        with nothing applied, if it stayed taken that long.
        """
        return self._apply_on(self._conn, writes)

    def _apply_inline(self, writes: Sequence[_Write]) -> list[object]:
        """:meth:`_apply` on the event loop, whose connection never waits: Busy at once if
        the lock is taken."""
        return self._apply_on(self._inline_conn, writes)

    def _apply_on(self, conn: sqlite3.Connection, writes: Sequence[_Write]) -> list[object]:
        try:
            with self._transaction(conn):
                return _Batch(conn).apply(writes)
        except Busy:
            raise
        except StoreUnavailable as exc:
            return [exc] * len(writes)
        except Exception as exc:
            if len(writes) == 1:
                return [exc]
        return [self._apply_alone(conn, write) for write in writes]

    def _apply_alone(self, conn: sqlite3.Connection, write: _Write) -> object:
        try:
            return self._apply_on(conn, [write])[0]
        except Busy as exc:  # another process took the lock between two of them
            return exc

    # -- reads -----------------------------------------------------------------------------
    async def ticket(self, ticket_id: str) -> StoredTicket | None:
        row = await self._job(
            lambda conn: conn.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE id = ?", (ticket_id,)
            ).fetchone()
        )
        return _ticket(row) if row else None

    async def expired(self, now: float, limit: int = 500) -> list[StoredTicket]:
        rows = await self._job(
            lambda conn: conn.execute(
                f"SELECT {_TICKET_COLUMNS} FROM tickets "
                "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [_ticket(row) for row in rows]

    async def counters(self, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        return await self._job(lambda conn: _states(conn, keys))

    async def event(self, ticket_id: str) -> UsageEvent | None:
        return await self._job(lambda conn: _event(conn, ticket_id))

    async def events(self, query: EventQuery) -> list[UsageEvent]:
        clauses, params = _where(query)
        sql = f"SELECT {_EVENT_COLUMNS} FROM usage_events{clauses} ORDER BY id"
        if query.limit:
            sql += f" LIMIT {int(query.limit)}"
        rows = await self._job(lambda conn: conn.execute(sql, params).fetchall())
        return [_usage_event(row) for row in rows]

    async def usage(self, query: EventQuery, by: str) -> list[UsageSum]:
        check_usage_group(by)
        clauses, params = _where(query)
        sql = (
            f"SELECT {_USAGE_GROUP_SQL[by]}, count(*), sum(prompt_tokens), sum(completion_tokens), "
            f"sum(cached_tokens), sum(credits), sum(estimated), sum(excess) "
            f"FROM usage_events{clauses} GROUP BY 1"
        )
        return await self._job(lambda conn: [UsageSum(*row) for row in conn.execute(sql, params)])

    # -- maintenance -------------------------------------------------------------------------
    async def reconcile(self, repair: bool) -> list[CounterDiff]:
        return await self._job(lambda conn: self._reconcile(conn, repair))

    def _reconcile(self, conn: sqlite3.Connection, repair: bool) -> list[CounterDiff]:
        with self._transaction(conn):
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
                _ticket(row) for row in conn.execute(f"SELECT {_TICKET_COLUMNS} FROM tickets")
            ]
            diffs = diff_counters(actual, expected_counters(events, tickets), _pruned_before(conn))
            if repair:
                conn.executemany(
                    "INSERT INTO counters (key, used, reserved) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET used = excluded.used, "
                    "reserved = excluded.reserved",
                    [(d.key, d.expected_used, d.expected_reserved) for d in diffs],
                )
        return diffs

    async def prune(self, before: float, limit: int = 10_000) -> int:
        return await self._job(lambda conn: self._prune(conn, before, limit))

    def _prune(self, conn: sqlite3.Connection, before: float, limit: int) -> int:
        with self._transaction(conn):
            deleted: int = conn.execute(
                "DELETE FROM counters WHERE key IN (SELECT key FROM counters "
                "WHERE expires_at < ? AND reserved = 0 LIMIT ?)",
                (before, limit),
            ).rowcount
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                "SET value = max(CAST(value AS REAL), CAST(excluded.value AS REAL))",
                (_PRUNED_BEFORE, repr(float(before))),
            )
        return deleted

    async def close(self) -> None:
        await self._writes.close()
        self._closing.set()
        await asyncio.to_thread(self._checkpointer.join)
        await asyncio.to_thread(self._jobs.shutdown)
        with self._job_conns_lock:
            for conn in self._job_conns:
                conn.close()
            self._job_conns.clear()
        self._conn.close()
        self._inline_conn.close()


@dataclass(slots=True)
class _Reserve:
    ticket_id: str
    holds: Sequence[Hold]
    want_output: int
    strict: bool
    min_output: int
    expires_at: float
    payload: str


@dataclass(slots=True)
class _Commit:
    ticket_id: str
    event: UsageEvent


@dataclass(slots=True)
class _Release:
    ticket_id: str


@dataclass(slots=True)
class _Renew:
    ticket_ids: Sequence[str]
    expires_at: float


_Write = _Reserve | _Commit | _Release | _Renew


def _withdrawn(write: _Write) -> bool:
    """Whether a write is dropped when its caller gives up waiting: only a reservation,
    since its caller has been refused. Every other write is applied when the lock frees."""
    return isinstance(write, _Reserve)


def _undo(write: _Write, outcome: object) -> _Write | None:
    """The write that takes back one applied after its caller gave up: a reservation
    made for nobody is released (as the engine does for a cancelled caller)."""
    if isinstance(write, _Reserve) and isinstance(outcome, Decision) and outcome.admitted:
        return _Release(write.ticket_id)
    return None


class _Batch:
    """The writes of one transaction, applied in order against the counters as the
    earlier writes of the batch left them; counter changes are summed per key and
    written once at the end, so requests that share a counter share its upsert."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        #: (used, reserved) of every counter a reservation of this batch reads
        self.counters: dict[str, list[int]] = {}
        #: key → [used change, reserved change, expires_at]
        self.changes: dict[str, list[Any]] = {}

    def apply(self, writes: Sequence[_Write]) -> list[object]:
        read = [k for w in writes if isinstance(w, _Reserve) for h in w.holds for k in h.read_keys]
        self.counters = {key: [0, 0] for key in read}
        for key, (used, reserved) in _states(self.conn, read).items():
            self.counters[key] = [used, reserved]
        outcomes = [self._one(write) for write in writes]
        if self.changes:
            self.conn.executemany(
                _UPSERT, [(key, u, r, exp) for key, (u, r, exp) in self.changes.items()]
            )
        return outcomes

    def _one(self, write: _Write) -> object:
        if isinstance(write, _Reserve):
            return self._reserve(write)
        if isinstance(write, _Renew):
            return _renew(self.conn, write.ticket_ids, write.expires_at)
        held = self._take(write.ticket_id)
        if isinstance(write, _Release):
            if held is None:
                return False
            for key, amount in held:
                self._change(key, 0, -amount)
            return True
        if held is None:
            return _event(self.conn, write.ticket_id)
        for key, amount in held:
            self._change(key, 0, -amount)
        for key, amount in write.event.charges:
            self._change(key, amount, 0)
        return _insert_event(self.conn, write.event)

    def _reserve(self, write: _Reserve) -> Decision:
        states = [summed(self.counters, hold.read_keys) for hold in write.holds]
        decision = decide(
            write.holds,
            states,
            write.want_output,
            strict=write.strict,
            min_output=write.min_output,
        )
        if decision.admitted:
            held = [[h.key, a] for h, a in zip(write.holds, decision.amounts)]
            for hold, amount in zip(write.holds, decision.amounts):
                self._change(hold.key, 0, amount, hold.expires_at)
            self.conn.execute(
                _INSERT_TICKET,
                (
                    write.ticket_id,
                    write.expires_at,
                    _dumps(held),
                    decision.max_output,
                    write.payload,
                ),
            )
        return decision

    def _change(self, key: str, used: int, reserved: int, expires_at: float | None = None) -> None:
        change = self.changes.get(key)
        if change is None:
            self.changes[key] = [used, reserved, expires_at]
        else:
            change[0] += used
            change[1] += reserved
            if change[2] is None:
                change[2] = expires_at
        state = self.counters.get(key)
        if state is not None:
            state[0] += used
            state[1] += reserved

    def _take(self, ticket_id: str) -> list[tuple[str, int]] | None:
        """Take a pending ticket out; what it held, or None if it is not pending."""
        held = _take_ticket(self.conn, ticket_id)
        return None if held is None else [(key, amount) for key, amount in orjson.loads(held)]


def _insert_event(conn: sqlite3.Connection, event: UsageEvent) -> UsageEvent:
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


def _event(conn: sqlite3.Connection, ticket_id: str) -> UsageEvent | None:
    row = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM usage_events WHERE ticket_id = ?", (ticket_id,)
    ).fetchone()
    return _usage_event(row) if row else None


def _states(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(used, reserved) of each key that has a row."""
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


def _renew(conn: sqlite3.Connection, ticket_ids: Sequence[str], expires_at: float) -> set[str]:
    """Extends the leases of the pending tickets among `ticket_ids`; their ids. One
    statement per 500 tickets (RETURNING where SQLite has it, 3.35+)."""
    pending: set[str] = set()
    unique = list(dict.fromkeys(ticket_ids))
    for start in range(0, len(unique), 500):
        chunk = unique[start : start + 500]
        marks = ",".join("?" * len(chunk))
        update = f"UPDATE tickets SET expires_at = max(expires_at, ?) WHERE id IN ({marks})"
        if _HAS_RETURNING:
            pending.update(
                row[0] for row in conn.execute(update + " RETURNING id", [expires_at, *chunk])
            )
        else:
            found = conn.execute(f"SELECT id FROM tickets WHERE id IN ({marks})", chunk)
            pending.update(row[0] for row in found)
            conn.execute(update, [expires_at, *chunk])
    return pending


def _pruned_before(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_PRUNED_BEFORE,)).fetchone()
    return None if row is None else float(row[0])


def _dumps(value: object) -> str:
    """JSON text of the [[key, amount], ...] lists kept in the ledger and tickets."""
    return orjson.dumps(value).decode()


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
