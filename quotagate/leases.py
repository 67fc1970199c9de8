"""Keeping the leases of running requests alive.

A ticket's lease is there for requests whose process died: the sweeper settles (or
releases) what nobody will ever settle. A request that is still running must never be
swept, however long it streams, or its reservation would be freed under it (others
admitted against room it is still using) and its real usage dropped as a late settle.

So a process renews the tickets it holds. One background task per engine renews every
held ticket at once, every third of the lease, in one store write; holding a ticket is a
dict insert, and settling or cancelling it through the engine lets go of it. A ticket
whose request task ended without either (a bug, a cancellation) is let go of at the next
round, so it expires as the lease intends instead of being renewed for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quotagate.engine import Engine

log = logging.getLogger("quotagate.leases")

#: renewals per lease: a renewal that is late (a busy store) still lands in time
RENEWALS_PER_LEASE = 3


def utc_now() -> datetime:
    return datetime.now(UTC)


class LeaseKeeper:
    """The tickets this process holds for running requests, renewed in the background.

    `clock` is the time leases are counted in (the gateway's, which tests move).
    """

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        #: ticket id → the task of the request holding it (None: held until let go of)
        self._held: dict[str, asyncio.Task[object] | None] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        return self.engine.settings.lease_seconds / RENEWALS_PER_LEASE

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, ticket_id: object) -> bool:
        return ticket_id in self._held

    def holds(self, ticket_id: str) -> bool:
        """Whether a running request of this process holds `ticket_id`: this process never
        sweeps it, however late its renewal (a busy store, a clock moved forward)."""
        if ticket_id not in self._held:
            return False
        task = self._held[ticket_id]
        return task is None or not task.done()

    def hold(self, ticket_id: str) -> None:
        """Keep `ticket_id` renewed while the current task runs, until it is settled or
        cancelled through the engine. Starts the renewals on first use."""
        self._held[ticket_id] = asyncio.current_task()
        if self._task is None:
            self.start()

    def drop(self, ticket_id: str) -> None:
        """Stop renewing `ticket_id` (settled, cancelled, or handed to someone else)."""
        self._held.pop(ticket_id, None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop renewing; held tickets keep the lease they have (then expire)."""
        task, self._task = self._task, None
        if task is None:
            return
        if task.get_loop() is not asyncio.get_running_loop():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing runs
                task.get_loop().call_soon_threadsafe(task.cancel)
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.renew()
            except Exception:
                log.exception("renewing %d leases failed; retrying", len(self._held))

    async def renew(self) -> int:
        """Renew every held ticket now, in one store write; how many were still pending.

        Tickets the store no longer has pending (settled or cancelled by someone else, or
        swept while the store could not be reached) are let go of."""
        ids = []
        for ticket_id, task in list(self._held.items()):
            if task is not None and task.done():
                del self._held[ticket_id]
                log.warning(
                    "the request holding ticket %s ended without settling it: "
                    "its lease is no longer renewed",
                    ticket_id,
                )
            else:
                ids.append(ticket_id)
        if not ids:
            return 0
        pending = await self.engine.renew(ids, now=self.clock())
        for ticket_id in ids:
            if ticket_id not in pending:
                self._held.pop(ticket_id, None)
        return len(pending)
