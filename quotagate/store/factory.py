"""Open a store, its catalog and an engine from a URL, like `limits` picks a storage.

memory://               everything in this process (tests, library use)
sqlite:///path/to.db    one SQLite file in WAL mode: counters, ledger and catalog
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from quotagate.config import DEFAULT_STORE_TIMEOUT, Settings
from quotagate.core.errors import ConfigError
from quotagate.core.text import masked
from quotagate.store.base import CounterStore
from quotagate.store.catalog import Catalog
from quotagate.store.memory import MemoryStore
from quotagate.store.migrate import upgrade
from quotagate.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from quotagate.engine import Engine


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///`` URL (relative paths are relative to the cwd)."""
    parsed = sa.make_url(url)
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(
            f"{masked(url)!r} names no SQLite file; use memory:// for an in-memory store"
        )
    return parsed.database


def open_store(
    url: str, *, create: bool = True, timeout: float = DEFAULT_STORE_TIMEOUT
) -> tuple[CounterStore, Catalog, sa.Engine]:
    """The counter store, catalog and SQL engine for `url`, migrated to the newest schema.

    With ``create=False`` a missing SQLite file is an error instead of a new database,
    which is what every command except ``init`` wants. `timeout`: how long a call waits
    for the store before it fails with StoreUnavailable (``store_timeout``).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        engine = sa.create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        upgrade(engine)
        return MemoryStore(url), Catalog(engine), engine
    if scheme in ("sqlite", "sqlite+pysqlite"):
        path = sqlite_path(url)
        if not create and not Path(path).is_file():
            raise ConfigError(
                f"no QuotaGate database at {Path(path).resolve()}: run `quotagate init` first "
                "(or set QUOTAGATE_DATABASE_URL)"
            )
        if create:
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        upgrade(engine)
        return SQLiteStore(path, url, timeout=timeout), Catalog(engine), engine
    raise ConfigError(
        f"unsupported database URL {masked(url)!r}: use memory:// or sqlite:///path/to/quotagate.db"
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_engine(url: str | None = None, *, create: bool = True, **overrides: Any) -> Engine:
    from quotagate.engine import Engine

    settings = Settings(**overrides) if url is None else Settings(database_url=url, **overrides)
    store, catalog, _ = open_store(
        settings.database_url, create=create, timeout=settings.store_timeout
    )
    catalog.timezone = settings.timezone
    return Engine(store, catalog, settings)
