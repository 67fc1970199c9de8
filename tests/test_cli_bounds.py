"""The CLI against input it must refuse: every refusal is one ``error:`` line on stderr and a
non-zero exit status, never a traceback, never a password, and the database is unchanged.

Commands run through Typer's CliRunner on copies of a database made by `quotagate init`
(the fixtures of tests/test_cli.py); the sweep runs on tickets written by the real engine.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from quotagate.engine import AdmitContext
from tests import test_cli as base
from tests.test_bounds import ABSURD_PRICE, poison
from tests.test_cli import app, as_json, cli, engine_on, ok, runner

# the fixtures of tests/test_cli.py: a database made by `quotagate init`, a clean environment
_template = base._template
db = base.db
clean_environment = base.clean_environment

PRICE = {"id": "m", "input_cost_credits": 1, "output_cost_credits": 2}


def refused(result: Result, status: int, *needles: str) -> str:
    """The one error line of a refused command, after checking its shape."""
    assert result.exit_code == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(db: Path) -> tuple[Any, ...]:
    return (
        as_json(db, "limits", "list", "--format", "json"),
        as_json(db, "prices", "list", "--all", "--format", "json"),
        as_json(db, "users", "list", "--format", "json"),
    )


BAD_PRICES = [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps([{**PRICE, "per_input_tokens": 1e30}]), "per_input_tokens is absurdly large"),
    (json.dumps([{**PRICE, "input_cost_credits": 1e300}]), "input_cost_credits is absurdly large"),
    (json.dumps([{**PRICE, "id": "m" * 300}]), "at most 255 characters, got 300"),
    (json.dumps([{**PRICE, "id": "m\x1b[2J"}]), "control characters"),
    (json.dumps([{**PRICE, "output_cost_credits": "0." + "1" * 40}]), "too many digits"),
    (json.dumps([{**PRICE, "provider": "p" * 100}]), "provider"),
]


@pytest.mark.parametrize(("content", "message"), BAD_PRICES)
def test_prices_import_refuses_what_cannot_be_stored(
    db: Path, tmp_path: Path, content: str, message: str
) -> None:
    before = snapshot(db)
    path = tmp_path / "prices.json"
    path.write_text(content)
    refused(cli(db, "prices", "import", str(path)), 2, message, str(path))
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("m" * 300, "--input", "1", "--output", "1"), "at most 255 characters"),
        (("m", "--input", "1e300", "--output", "1"), "absurdly large"),
        (("m", "--input", "1", "--output", "1", "--per", str(10**16)), "absurdly large"),
    ],
)
def test_prices_set_refuses_the_same(db: Path, args: tuple[str, ...], message: str) -> None:
    before = snapshot(db)
    refused(cli(db, "prices", "set", *args), 2, message)
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--key", "0123456789ab", "no API key with id '0123456789ab'"),
        ("--channel", "nochan", "no channel 'nochan'"),
        ("--pool", "nopool", "no pool 'nopool'"),
    ],
)
def test_a_cap_on_a_subject_that_does_not_exist_is_refused(
    db: Path, option: str, name: str, message: str
) -> None:
    before = snapshot(db)
    refused(cli(db, "limits", "set", option, name, "1000"), 2, message)
    assert snapshot(db) == before


def test_a_cap_on_a_subject_that_exists_is_set(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = ok(db, "keys", "create", "--user", "alice").stdout.strip().splitlines()[-1]
    key_id = secret.removeprefix("qg-").split("-")[0]
    ok(db, "pools", "set", "research", "--model", "gpt-4o")
    ok(db, "channels", "add", "cli-chan", "--base-url", "http://127.0.0.1:9/v1", "-m", "x")
    config = tmp_path / "quotagate.toml"
    config.write_text(
        '[[channels]]\nname = "file-chan"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["x"]\n'
    )
    monkeypatch.setenv("QUOTAGATE_CONFIG", str(config))
    # a secret is not an id: the message says which part to use
    line = refused(cli(db, "limits", "set", "--key", secret, "10"), 2, f"use '{key_id}'")
    assert secret not in line
    for option, name in (
        ("--key", key_id),
        ("--pool", "research"),
        ("--channel", "cli-chan"),
        ("--channel", "file-chan"),
    ):
        ok(db, "limits", "set", option, name, "1000")
    targets = {(x["scope"], x["target"]) for x in as_json(db, "limits", "list", "-f", "json")}
    assert {("key", key_id), ("pool", "research"), ("channel", "file-chan")} <= targets


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bob:s3cr3t-pw@127.0.0.1:5432/quotagate",
        "postgresql+psycopg://bob:s3cr3t-pw@db.internal/quotagate?sslmode=require",
        "mysql://bob:s3cr3t-pw@db/q",
    ],
)
def test_a_refused_database_url_never_shows_its_password(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = refused(runner.invoke(app, ["--database", url, "limits", "list"]), 1, "bob:***@")
    assert "s3cr3t" not in line
    monkeypatch.setenv("QUOTAGATE_DATABASE_URL", url)
    result = runner.invoke(app, ["limits", "list"])
    assert "s3cr3t" not in result.output and result.exit_code == 1


@pytest.mark.parametrize("user", ["a\nb", "evil\x1b[2J", "tab\tid"])
def test_user_ids_with_control_characters_are_refused(db: Path, user: str) -> None:
    before = snapshot(db)
    refused(cli(db, "users", "set-role", user, "admin"), 2, "control characters")
    refused(cli(db, "limits", "set", "--user", user, "10"), 2, "control characters")
    refused(cli(db, "wallet", "top-up", user, "10"), 2, "control characters")
    refused(cli(db, "users", "set-role", "alice", user), 2, "control characters")  # a role
    assert snapshot(db) == before


def test_sweep_goes_past_a_poisoned_ticket_without_a_traceback(db: Path) -> None:
    at = datetime.now(UTC) - timedelta(hours=1)

    async def leave_tickets() -> list[str]:
        engine = engine_on(db, lease_seconds=60)
        try:
            await poison(engine, ABSURD_PRICE, at)
            await poison(engine, "garbage", at)
            tickets = [
                await engine.admit(
                    AdmitContext(user=u, model="gpt-4o", prompt_tokens=40, max_tokens=60),
                    now=at + timedelta(seconds=1),
                )
                for u in ("dave", "erin")
            ]
        finally:
            await engine.close()
        return [t.id for t in tickets]

    normal = asyncio.run(leave_tickets())
    result = ok(db, "sweep")
    assert "Traceback" not in result.output
    assert "settled 3 expired tickets" in result.stdout  # the poisoned one on its holds
    for user in ("dave", "erin"):
        usage = as_json(db, "usage", "--user", user, "-f", "json")
        assert [(r["total_tokens"], r["estimated"]) for r in usage] == [(100, 1)]
    assert normal
    assert "no expired tickets" in ok(db, "sweep").stdout
    ok(db, "reconcile", "--check")


def test_a_group_multiplier_is_bounded_like_a_price(db: Path) -> None:
    before = snapshot(db), as_json(db, "groups", "list", "--format", "json")
    refused(cli(db, "groups", "multiplier", "research", "1e9"), 2, "at most 1,000,000")
    assert (snapshot(db), as_json(db, "groups", "list", "--format", "json")) == before
    ok(db, "groups", "multiplier", "research", "0.5")


def test_a_key_name_longer_than_its_column_is_refused(db: Path) -> None:
    refused(cli(db, "keys", "create", "--user", "alice", "--name", "k" * 300), 2, "key name")
    assert as_json(db, "keys", "list", "--format", "json") == []


def test_an_absurd_default_price_is_a_configuration_error(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The price of unpriced models is bounded like any price: refused when the settings are
    read, not on every request."""
    monkeypatch.setenv("QUOTAGATE_DEFAULT_OUTPUT_CREDITS", "1e300")
    refused(cli(db, "status", "alice"), 1, "QUOTAGATE_DEFAULT_OUTPUT_CREDITS")
