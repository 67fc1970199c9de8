"""Naming a person nobody in QuotaGate is yet (typically an Open WebUI user, known by a
UUID, who has not chatted, named by their email): `limits set --user` said so, but
`users set-role` and `users add-group` silently created a user whose id is the email, so
the admin believed the person had their role or group while the person's own (UUID)
account never got it. Every command that takes a user says so the same way, on stderr,
and still does what it was asked (a user created before they first chat is allowed).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests import test_cli as base
from tests.test_cli import as_json, engine_on, ok

_template = base._template
db = base.db
clean_environment = base.clean_environment

EMAIL = "alice@example.org"


@pytest.mark.parametrize(
    "args",
    [
        ("users", "set-role", EMAIL, "premium"),
        ("users", "add-group", EMAIL, "research"),
        ("limits", "set", "--user", EMAIL, "--window", "day", "500"),
    ],
)
def test_a_command_naming_nobody_yet_says_so(db: Path, args: tuple[str, ...]) -> None:
    result = ok(db, *args)
    assert "note:" in result.stderr
    assert f"no user has the id or email {EMAIL!r} yet" in " ".join(result.stderr.split())


def test_a_command_naming_someone_known_by_email_says_nothing(db: Path) -> None:
    # the person as Open WebUI's first chat leaves them: a UUID id, with their email
    engine = engine_on(db)
    try:
        engine.catalog.sync_user("3f1e-uuid", "user", email=EMAIL)
    finally:
        asyncio.run(engine.close())  # the CLI runs its own loop: not inside one
    for args in (("users", "set-role", EMAIL, "premium"), ("users", "add-group", EMAIL, "g")):
        result = ok(db, *args)
        assert "note:" not in result.stderr, result.stderr
        assert "3f1e-uuid" in result.stdout
    users = as_json(db, "users", "list", "--format", "json")
    assert [u["id"] for u in users] == ["3f1e-uuid"]
