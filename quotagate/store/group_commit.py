"""Group commit: the writes that an event loop's tasks submit in one turn share one
transaction.

A transaction's fixed cost (taking the write lock, writing and closing the WAL frames)
is most of what an admit or a settle costs on SQLite. A gateway has many requests in
flight, so their writes usually arrive together: instead of one transaction each, the
first write of a turn schedules a flush for the end of that turn, and every write
submitted before it runs goes into the same batch. A lone caller pays one extra turn of
the loop, nothing more.

Each write still gets its own outcome: the `apply` function returns one result or
exception per write, in order. Nothing is applied for a caller that was cancelled before
its batch ran.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Write = TypeVar("Write")
#: applies writes in one transaction; one result or exception per write, in order
Apply = Callable[[Sequence[Write]], list[object]]


class GroupCommit(Generic[Write]):
    def __init__(self, apply: Apply[Write]) -> None:
        self._apply = apply
        self._waiting: list[tuple[Write, asyncio.Future[object]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard = threading.Lock()  # event loops in other threads may submit too

    async def submit(self, write: Write) -> object:
        """Apply `write` with the others of this turn; its result, or raise its error."""
        loop = asyncio.get_running_loop()
        with self._guard:
            other = self._loop if self._waiting and self._loop is not loop else None
            if other is not None and other.is_closed():
                self._waiting, other = [], None  # left by a loop that closed before its turn
            if other is None:
                future: asyncio.Future[object] = loop.create_future()
                if not self._waiting:
                    self._loop = loop
                    loop.call_soon(self._flush)
                self._waiting.append((write, future))
        if other is not None:  # another thread's loop has a batch open: don't join it
            return _outcome(self._apply([write])[0])
        return await future

    def flush(self) -> None:
        """Apply the writes waiting for this loop's turn now (before the store closes)."""
        with self._guard:
            mine = self._waiting and self._loop is _running_loop()
        if mine:
            self._flush()

    def _flush(self) -> None:
        with self._guard:
            batch, self._waiting = self._waiting, []
        live = [(write, future) for write, future in batch if not future.cancelled()]
        if not live:
            return
        try:
            outcomes = self._apply([write for write, _ in live])
        except Exception as exc:  # apply reports errors per write; this is a last resort
            outcomes = [exc] * len(live)
        for (_, future), outcome in zip(live, outcomes, strict=True):
            if future.cancelled():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _outcome(outcome: object) -> object:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
