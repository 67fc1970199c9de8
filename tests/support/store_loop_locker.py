"""Another process that holds SQLite's write lock on a QuotaGate database, for tests.

A second gateway worker, a `quotagate reconcile` on a large ledger or a backup tool can
hold the write lock for seconds; this one takes it with ``BEGIN IMMEDIATE`` in a real
child process (so it is a lock between processes, as in production) and keeps it until
the ``with`` block ends::

    with write_lock_held(path):
        ...  # every writer of `path` now waits
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def write_lock_held(path: Path | str) -> Iterator[subprocess.Popen[str]]:
    """SQLite's write lock on `path`, held by a child process for the ``with`` block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        if line.strip() != "locked":
            raise RuntimeError(f"the lock holder did not get the lock: {line!r}")
        yield holder
        holder.stdin.close()
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
