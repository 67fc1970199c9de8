"""Catalog calls that may wait for the database, run off the event loop.

A catalog write (a user seen for the first time, Open WebUI's role and group sync) waits
for SQLite's write lock like the store's writes do; run on the event loop it would stop
every request, stream and health check while another process holds the lock. Such calls
run here, on a thread, and their caller waits at most `timeout` seconds. Catalog reads
need not come here: in WAL mode a reader never waits for a writer.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError

from quotagate.core.errors import StoreUnavailable

T = TypeVar("T")


class CatalogCalls:
    def __init__(self, timeout: float, threads: int = 2) -> None:
        self.timeout = timeout
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="quotagate-catalog")

    async def __call__(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`work(*args, **kwargs)` on a thread; StoreUnavailable if it takes longer than
        `timeout` or the database is locked. A call that timed out still runs to its end:
        the catalog's writes are idempotent (create the user if unknown, set these groups)."""
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._threads, functools.partial(work, *args, **kwargs))
        try:
            return await asyncio.wait_for(call, self.timeout)
        except TimeoutError:
            raise StoreUnavailable(
                f"the catalog did not answer within {self.timeout:g} s"
            ) from None
        except OperationalError as exc:
            raise StoreUnavailable(f"the catalog failed: {exc.orig}") from None

    def close(self) -> None:
        """Not waited for: a call stuck on a lock held elsewhere ends by its busy timeout."""
        self._threads.shutdown(wait=False, cancel_futures=True)
