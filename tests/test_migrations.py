"""The schema is built by migrations: on a fresh SQLite file, again on a current one (a
no-op), and the same migrations on a real PostgreSQL server.

PostgreSQL must be reachable at 127.0.0.1:5432 (user postgres, trust auth): the shared
store of the next issue depends on these migrations, so its absence fails this test
rather than skipping it."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from quotagate.store import schema
from quotagate.store.catalog import Catalog
from quotagate.store.migrate import alembic_config, current_revision, upgrade

pytestmark = pytest.mark.timeout(60)

PG_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
TABLES = set(schema.metadata.tables)


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert revision is not None
    return revision


def schema_drift(engine: sa.Engine) -> list:
    """What differs between the migrated database and the tables the code declares."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), schema.metadata)


def test_upgrade_creates_every_table_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert set(sa.inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        assert current_revision(engine) == head()
        assert schema_drift(engine) == []
    finally:
        engine.dispose()


def test_upgrade_again_is_a_no_op_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "current.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
        catalog = Catalog(engine)
        catalog.ensure_user("alice", "premium")
        catalog.set_limit("role", "premium", "tokens", "day", 50_000)
        with sqlite3.connect(path) as raw:
            before = raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        raw.close()

        upgrade(engine)
        upgrade(engine)

        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before
            assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [(head(),)]
        raw.close()
        assert Catalog(engine).user("alice") is not None
        assert [lim.amount for lim in Catalog(engine).limits()] == [50_000]
    finally:
        engine.dispose()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A uniquely named, empty PostgreSQL database, dropped afterwards. Used in the test
    body (not as a fixture) so that an unreachable server is a test failure."""
    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            "PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres; the migrations "
            f"must be proven on a real server (start it, or fix access): {exc}",
            pytrace=False,
        )
    name = f"quotagate_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_same_migrations_apply_on_postgresql() -> None:
    with postgres_database() as url:
        migrate_postgresql(url)


def migrate_postgresql(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        upgrade(engine)
        assert set(sa.inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        assert current_revision(engine) == head()
        assert schema_drift(engine) == []
        upgrade(engine)  # a no-op on a current database
        assert current_revision(engine) == head()

        # the catalog works on it: server defaults, booleans, the version counter
        catalog = Catalog(engine)
        catalog.ensure_user("alice", "user", groups=["A"])
        limit = catalog.set_limit("group", "A", "tokens", "day", 5_000)
        assert limit.per_user
        key, secret = catalog.create_key("alice", "laptop")
        assert catalog.authenticate(secret) == key
        assert catalog.version() >= 3
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT per_user FROM limits")).scalar() is True
    finally:
        engine.dispose()


def test_postgresql_downgrade_and_upgrade_round_trip() -> None:
    with postgres_database() as url:
        round_trip(url)


def round_trip(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        upgrade(engine)
        config = alembic_config(url)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade(engine)
        assert set(sa.inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    finally:
        engine.dispose()


def test_0004_keeps_existing_memberships_as_an_admins_on_sqlite_and_postgresql(
    tmp_path: Path,
) -> None:
    """Upgrading a database of revision 0003: every membership it had counts as an admin's
    (a sync never removes it), no role is pinned, and the catalog reads both columns."""
    with postgres_database() as pg_url:
        for url in (f"sqlite:///{tmp_path / 'old.db'}", pg_url):
            engine = sa.create_engine(url)
            try:
                config = alembic_config(url)
                with engine.begin() as conn:
                    config.attributes["connection"] = conn
                    command.upgrade(config, "0003")
                with engine.begin() as conn:
                    conn.execute(
                        sa.text("INSERT INTO users (id, role, created_at) VALUES ('bob', 'vip', 0)")
                    )
                    conn.execute(sa.text("INSERT INTO groups (name) VALUES ('research')"))
                    conn.execute(
                        sa.text(
                            "INSERT INTO memberships (user_id, group_name) "
                            "VALUES ('bob', 'research')"
                        )
                    )
                upgrade(engine)
                assert schema_drift(engine) == []
                catalog = Catalog(engine)
                user, _ = catalog.sync_user("bob", "user", follow_role=True, groups=["Staff"])
                assert (user.role, user.groups, user.synced_groups) == (
                    "user",
                    ("Staff", "research"),
                    ("Staff",),
                )
                assert catalog.set_role("bob", "vip").role_pinned
                user, changed = catalog.sync_user("bob", "user", follow_role=True, groups=[])
                assert (user.role, user.groups, changed) == ("vip", ("research",), True)
            finally:
                engine.dispose()
