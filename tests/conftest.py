"""Shared fixtures: the store backends every conformance and engine test runs on.

A backend is a URL factory plus a way to corrupt one counter behind the store's back (for
the reconcile tests). Adding a store (Redis, PostgreSQL, ...) to every parametrized test
is one more line in :data:`BACKENDS`.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from quotagate.engine import Engine
from quotagate.store.base import CounterStore
from quotagate.store.factory import open_engine, open_store
from quotagate.store.memory import MemoryStore
from quotagate.store.migrate import upgrade
from quotagate.store.sqlite import SQLiteStore


def _corrupt_memory(store: CounterStore, key: str, used: int, reserved: int) -> None:
    assert isinstance(store, MemoryStore)
    store._counters[key] = [used, reserved]


def _corrupt_sqlite(store: CounterStore, key: str, used: int, reserved: int) -> None:
    """Write the counter row with a connection of its own, as a stray process would."""
    assert isinstance(store, SQLiteStore)
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "INSERT INTO counters (key, used, reserved) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET used = excluded.used, reserved = excluded.reserved",
            (key, used, reserved),
        )
    conn.close()


@dataclass(frozen=True)
class Backend:
    name: str
    #: the store URL for a test, given a fresh temporary directory
    url: Callable[[Path], str]
    #: set one counter to (used, reserved) without going through the store's API
    corrupt: Callable[[CounterStore, str, int, int], None]


_TEMPLATE: dict[str, Path] = {}


def sqlite_url(directory: Path) -> str:
    """A migrated SQLite file in `directory`, copied from a template migrated once per run
    (running the migrations for every test would cost more than the tests)."""
    if "db" not in _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="quotagate-template-")) / "template.db"
        engine = sa.create_engine(f"sqlite:///{template}")
        upgrade(engine)
        engine.dispose()
        _TEMPLATE["db"] = template
    path = directory / "quotagate.db"
    if not path.exists():
        shutil.copyfile(_TEMPLATE["db"], path)
    return f"sqlite:///{path}"


BACKENDS = [
    Backend("memory", lambda _directory: "memory://", _corrupt_memory),
    Backend("sqlite", sqlite_url, _corrupt_sqlite),
]


@pytest.fixture(scope="session", autouse=True)
def _drop_sqlite_template() -> Iterator[None]:
    yield
    if "db" in _TEMPLATE:
        shutil.rmtree(_TEMPLATE["db"].parent, ignore_errors=True)


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.param
    return backend


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[CounterStore]:
    opened, _catalog, engine = open_store(backend.url(tmp_path))
    yield opened
    await opened.close()
    engine.dispose()


EngineFactory = Callable[..., Engine]


@pytest.fixture
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Immune to the caller's environment (QUOTAGATE_* variables, a quotagate.toml in the
    working directory)."""
    for name in list(os.environ):
        if name.startswith("QUOTAGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QUOTAGATE_CONFIG", str(tmp_path / "no-such-config.toml"))


@pytest.fixture(scope="session", autouse=True)
def _drop_gateway_template() -> Iterator[None]:
    """Remove the migrated database template the gateway harness copies, once at the end."""
    yield
    from tests.gateway.harness import drop_template

    drop_template()


@pytest.fixture
async def make_engine(
    backend: Backend, tmp_path: Path, isolated_environment: None
) -> AsyncIterator[EngineFactory]:
    """Engines on the test's backend with explicit settings, immune to the caller's
    environment (QUOTAGATE_* variables, a quotagate.toml in the working directory).

    Every engine of one test shares the SQLite file; each memory engine is separate.
    The catalog snapshot is re-read on every call so catalog changes apply at once.
    """
    engines: list[Engine] = []

    def make(**settings: Any) -> Engine:
        settings.setdefault("catalog_refresh_seconds", 0)
        engine = open_engine(backend.url(tmp_path), **settings)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


@pytest.fixture
def engine(make_engine: EngineFactory) -> Engine:
    return make_engine()
