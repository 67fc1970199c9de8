"""Group commit: the writes that an event loop's tasks submit in one turn share one
transaction, and no wait for the store ever blocks the loop.

A transaction's fixed cost (taking the write lock, writing and closing the WAL frames)
is most of what an admit or a settle costs on SQLite. A gateway has many requests in
flight, so their writes usually arrive together: instead of one transaction each, the
first write of a turn schedules a hand-over for the end of that turn, and every write
submitted before it runs goes into the same batch. Batches handed over while the writer
is still busy with an earlier one are applied together, in order, in its next transaction.

No transaction waits on the event loop. A batch whose transaction can begin at once
(`inline`: the write lock is free, checked without waiting) is applied right there, as
cheaply as before: a thread hop each way would cost a lone caller about a quarter of its
speed. Any other batch goes to a writer thread, which owns a connection of its own: when
another process holds SQLite's write lock, that thread waits, and the event loop goes on
serving health checks, open streams and everything else that needs no write; it learns
each outcome through ``call_soon_threadsafe``. While a batch is with the writer, the
batches after it follow it there, so the writes of one loop are applied in order.

Each write still gets its own outcome: the `apply` function returns one result or
exception per write, in order. Nothing is applied for a caller that was cancelled before
its batch ran.

A caller waits at most `timeout` seconds, then gets :class:`StoreUnavailable`. What
becomes of its write depends on its kind. A write that `withdraw` names (a reservation:
its caller has been refused) is dropped if it was not applied yet, and if it was applied
all the same (the timeout struck while its transaction ran), `undo` gives the write that
takes it back (the release), which is queued at once. Every other write (a settle, a
release) stays queued and is applied once the lock frees, exactly as if its caller had
waited, so nothing it records is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Generic, TypeVar

from quotagate.core.errors import StoreUnavailable

log = logging.getLogger(__name__)

Write = TypeVar("Write")
#: applies writes in one transaction; one result or exception per write, in order
Apply = Callable[[Sequence[Write]], list[object]]


class Busy(StoreUnavailable):
    """What `apply` raises when the write lock stayed taken for one round of waiting
    (`inline`: when it was taken at all): nothing was applied, and the writer tries again,
    with the writes queued since."""


_UNAPPLIED = object()  # the outcome of a write the writer left out


@dataclass(slots=True, eq=False)
class _Pending(Generic[Write]):
    write: Write
    future: asyncio.Future[object]
    #: the caller stopped waiting (timeout); its future holds StoreUnavailable
    given_up: bool = False
    outcome: object = _UNAPPLIED


@dataclass(slots=True, eq=False)
class _Turn(Generic[Write]):
    """The writes one event loop submitted in one turn."""

    loop: asyncio.AbstractEventLoop
    items: list[_Pending[Write]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


def _never(_write: object) -> bool:
    return False


def _nothing(_write: object, _outcome: object) -> None:
    return None


class GroupCommit(Generic[Write]):
    def __init__(
        self,
        apply: Apply[Write],
        *,
        timeout: float,
        withdraw: Callable[[Write], bool] = _never,
        undo: Callable[[Write, object], Write | None] = _nothing,
        inline: Apply[Write] | None = None,
        name: str = "quotagate-writer",
    ) -> None:
        """`apply` runs on the writer thread and may wait for the lock a while (Busy when
        it gave up a round of waiting); `inline` runs on the event loop and must never
        wait: Busy at once if the lock is taken."""
        self._apply = apply
        self._inline = inline
        self.timeout = timeout
        self._withdraw = withdraw
        self._undo = undo
        self._open: dict[asyncio.AbstractEventLoop, _Turn[Write]] = {}
        self._guard = threading.Lock()  # event loops in other threads may submit too
        self._queue: SimpleQueue[_Turn[Write] | None] = SimpleQueue()
        self._with_writer = 0  # turns handed to the writer and not yet applied
        self._inline_busy = threading.Lock()  # held while a loop applies a turn itself
        self._closed = False
        self._deadline = float("inf")  # once closed: when the writer stops waiting for the lock
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, write: Write) -> object:
        """Apply `write` with the others of this turn; its result, or raise its error."""
        return await self._add(asyncio.get_running_loop(), write)

    def _add(self, loop: asyncio.AbstractEventLoop, write: Write) -> asyncio.Future[object]:
        future: asyncio.Future[object] = loop.create_future()
        with self._guard:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            turn = self._open.get(loop)
            if turn is None:
                turn = self._open[loop] = _Turn(loop)
                loop.call_soon(self._hand_over, loop)
            turn.items.append(_Pending(write, future))
        return future

    def flush(self) -> None:
        """Hand the writes of this loop's turn to the writer now (before the store closes)."""
        self._hand_over(asyncio.get_running_loop())

    async def close(self) -> None:
        """Apply everything handed over, waiting at most `timeout` more for the write lock,
        then stop the writer. Writes still not applied then fail with StoreUnavailable."""
        self.flush()
        with self._guard:
            if not self._closed:
                self._closed = True
                self._deadline = time.monotonic() + self.timeout
                self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- on the event loop ---------------------------------------------------------------
    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._guard:
            turn = self._open.pop(loop, None)
            closed = self._closed
            inline = self._inline is not None and not self._with_writer
        if turn is None:
            return
        if closed:  # submitted by another loop just before the store closed
            for pending in turn.items:
                if not pending.future.done():
                    pending.future.set_exception(StoreUnavailable("the store is closed"))
            return
        if inline and self._apply_inline(turn):
            return
        with self._guard:
            self._with_writer += 1
        turn.timer = loop.call_later(self.timeout, self._expire, turn)
        self._queue.put(turn)

    def _apply_inline(self, turn: _Turn[Write]) -> bool:
        """Apply the turn here if its transaction can begin at once; False if the lock
        is taken, or another loop is applying a turn of its own (nothing was applied)."""
        assert self._inline is not None
        live = [p for p in turn.items if not p.future.cancelled()]
        if not live:
            return True
        if not self._inline_busy.acquire(blocking=False):
            return False
        try:
            outcomes = self._inline([p.write for p in live])
        except Busy:
            return False
        except Exception as exc:  # apply reports errors per write; this is a last resort
            outcomes = [exc] * len(live)
        finally:
            self._inline_busy.release()
        for pending, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        return True

    def _expire(self, turn: _Turn[Write]) -> None:
        """The turn's callers have waited `timeout`: they get StoreUnavailable now."""
        error = f"the store did not answer within {self.timeout:g} s"
        for pending in turn.items:
            if not pending.future.done():
                pending.given_up = True
                pending.future.set_exception(StoreUnavailable(error))

    def _resolve(self, turns: list[_Turn[Write]]) -> None:
        for turn in turns:
            if turn.timer is not None:
                turn.timer.cancel()
            for pending in turn.items:
                outcome = pending.outcome
                if outcome is _UNAPPLIED:
                    continue  # left out: its caller was cancelled or refused already
                if not pending.future.done():
                    if isinstance(outcome, BaseException):
                        pending.future.set_exception(outcome)
                    else:
                        pending.future.set_result(outcome)
                elif pending.given_up:
                    self._late(turn.loop, pending.write, outcome)

    def _late(self, loop: asyncio.AbstractEventLoop, write: Write, outcome: object) -> None:
        """A write applied (or failed) after its caller stopped waiting."""
        if isinstance(outcome, BaseException):
            log.warning("a write whose caller gave up failed as well: %s", outcome)
            return
        undo = self._undo(write, outcome)
        kind = type(write).__name__
        if undo is None:
            log.info("a %s was applied after its caller gave up waiting", kind)
            return
        log.info("a %s was applied after its caller gave up waiting; undoing it", kind)
        try:
            self._add(loop, undo).add_done_callback(_report_undo)
        except StoreUnavailable as exc:
            log.warning("could not undo %r: %s", write, exc)

    # -- on the writer thread ------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            first = self._queue.get()
            turns: list[_Turn[Write]] = []
            if first is None:
                self._stop = True
            else:
                turns.append(first)
            self._take_queued(turns)
            if turns:
                self._write(turns)

    def _take_queued(self, turns: list[_Turn[Write]]) -> None:
        while not self._queue.empty():
            turn = self._queue.get_nowait()
            if turn is None:
                self._stop = True
            else:
                turns.append(turn)

    def _wanted(self, pending: _Pending[Write]) -> bool:
        if pending.future.cancelled():
            return False
        return not (pending.given_up and self._withdraw(pending.write))

    def _write(self, turns: list[_Turn[Write]]) -> None:
        while True:
            live = [p for turn in turns for p in turn.items if self._wanted(p)]
            if not live:
                break
            try:
                outcomes = self._apply([p.write for p in live])
            except Busy as exc:
                if self._closed and time.monotonic() >= self._deadline:
                    log.warning(
                        "the store closed with %d writes it could not apply (%s); their "
                        "tickets stay pending and are swept when their lease ends",
                        len(live),
                        exc,
                    )
                    outcomes = [exc] * len(live)
                else:
                    self._take_queued(turns)  # what came meanwhile goes in the same try
                    continue
            except Exception as exc:  # apply reports errors per write; this is a last resort
                outcomes = [exc] * len(live)
            for pending, outcome in zip(live, outcomes, strict=True):
                pending.outcome = outcome
            break
        with self._guard:
            self._with_writer -= len(turns)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Turn[Write]]] = {}
        for turn in turns:
            by_loop.setdefault(turn.loop, []).append(turn)
        for loop, mine in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._resolve, mine)
            except RuntimeError:  # that loop has closed: nobody waits for these outcomes
                log.debug("outcomes for a closed event loop dropped")


def _report_undo(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not undo a write applied late: %s", future.exception())
