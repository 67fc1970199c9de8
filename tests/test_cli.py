"""The `quotagate` command line, run for real against temporary SQLite files.

Commands run through Typer's CliRunner (same process, real database files); one test runs
the installed console script in a subprocess. Ledger rows are produced by the real
engine on the same file, as the gateway would.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner, Result

from quotagate.admin import common
from quotagate.admin.cli import app
from quotagate.admin.pricebook import genai_prices
from quotagate.core.errors import QuotaExceeded
from quotagate.core.limits import MICRO
from quotagate.core.windows import parse_window
from quotagate.engine import AdmitContext, Engine
from quotagate.store.base import EventQuery, UsageEvent
from quotagate.store.factory import open_engine

runner = CliRunner()
_TEMPLATE: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No QUOTAGATE_* variable or quotagate.toml of the caller may change what is tested."""
    for name in list(os.environ):
        if name.startswith("QUOTAGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QUOTAGATE_CONFIG", str(tmp_path / "no-such-config.toml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.out, "width", 200)  # tables unwrapped, as on a wide terminal


def cli(db: Path, *args: str) -> Result:
    return runner.invoke(app, ["--database", str(db), *args])


def ok(db: Path, *args: str) -> Result:
    result = cli(db, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def as_json(db: Path, *args: str) -> Any:
    return json.loads(ok(db, *args).stdout)


@pytest.fixture(scope="session")
def _template() -> Iterator[Path]:
    """One database made by `quotagate init` (loading ~2,000 prices takes a second or two),
    copied for every test that needs an initialised database."""
    directory = Path(tempfile.mkdtemp(prefix="quotagate-cli-template-"))
    path = directory / "template.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_CONFIG"] = str(directory / "no-such-config.toml")
    result = runner.invoke(app, ["--database", str(path), "init"], env=env)
    assert result.exit_code == 0, result.stderr
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def db(tmp_path: Path, _template: Path) -> Path:
    path = tmp_path / "quotagate.db"
    shutil.copyfile(_template, path)
    return path


def engine_on(db: Path, **settings: Any) -> Engine:
    settings.setdefault("catalog_refresh_seconds", 0)
    return open_engine(f"sqlite:///{db}", create=False, **settings)


async def traffic(db: Path, requests: list[tuple[str, str, int, int]]) -> list[UsageEvent]:
    """Admit and settle (user, model, prompt, completion) requests through the engine."""
    engine = engine_on(db)
    events = []
    try:
        for user, model, prompt, completion in requests:
            ticket = await engine.admit(
                AdmitContext(user=user, model=model, prompt_tokens=prompt, max_tokens=completion)
            )
            events.append(
                await engine.settle(
                    ticket, {"prompt_tokens": prompt, "completion_tokens": completion}
                )
            )
    finally:
        await engine.close()
    return events


# -- init ----------------------------------------------------------------------------------


def snapshot(db: Path) -> tuple[Any, Any, Any]:
    return (
        as_json(db, "limits", "list", "--format", "json"),
        as_json(db, "prices", "list", "--all", "--format", "json"),
        as_json(db, "users", "list", "--format", "json"),
    )


def test_init_creates_database_with_prices_and_default_allowance(tmp_path: Path) -> None:
    db = tmp_path / "fresh" / "q.db"
    result = ok(db, "init")
    assert "created database" in result.stdout
    assert db.is_file()
    limits = as_json(db, "limits", "list", "--format", "json")
    assert [(x["scope"], x["metric"], x["window"], x["amount"]) for x in limits] == [
        ("everyone", "tokens", "day", 100_000)
    ]
    # genai-prices: gpt-4o costs $2.50 / $10 / $1.25 cached per 1M tokens; 1,000 credits = $1
    gpt4o = [p for p in as_json(db, "prices", "list", "--format", "json") if p["id"] == "gpt-4o"]
    assert len(gpt4o) == 1
    assert gpt4o[0]["input_cost_credits"] == 2500
    assert gpt4o[0]["output_cost_credits"] == 10000
    assert gpt4o[0]["cached_cost_credits"] == 1250
    assert gpt4o[0]["per_input_tokens"] == gpt4o[0]["per_output_tokens"] == 1_000_000
    assert gpt4o[0]["provider"] == "openai"


def test_init_twice_changes_nothing(db: Path) -> None:
    before = snapshot(db)
    result = ok(db, "init")
    assert "up to date" in result.stdout
    assert snapshot(db) == before


def test_init_again_keeps_what_an_admin_changed(db: Path) -> None:
    ok(db, "limits", "set", "--everyone", "--metric", "tokens", "--window", "day", "5000")
    ok(db, "prices", "set", "gpt-4o", "--input", "1", "--output", "2")
    before = snapshot(db)
    ok(db, "init")
    assert snapshot(db) == before
    limits = as_json(db, "limits", "list", "--format", "json")
    assert [x["amount"] for x in limits if x["scope"] == "everyone"] == [5000]
    # the admin removes the default allowance: init must not bring it back
    ok(db, "limits", "remove", str(limits[0]["id"]))
    ok(db, "init")
    assert as_json(db, "limits", "list", "--format", "json") == []
    gpt4o = [p for p in as_json(db, "prices", "list", "--format", "json") if p["id"] == "gpt-4o"]
    assert (gpt4o[0]["input_cost_credits"], gpt4o[0]["output_cost_credits"]) == (1, 2)


def test_default_prices_follow_the_configured_credit_rate() -> None:
    prices = {p.model: p for p in genai_prices(Decimal(2000)).prices}
    assert prices["gpt-4o"].input_credits == Decimal(5000)
    assert prices["gpt-4o"].output_credits == Decimal(20000)
    assert prices["gpt-4o-mini"].input_credits == Decimal(300)
    assert len(prices) > 500
    assert all(p.input_credits >= 0 and p.output_credits >= 0 for p in prices.values())


# -- missing database, bad input -----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("limits", "list"),
        ("limits", "set", "--role", "user", "100"),
        ("usage",),
        ("status", "alice"),
        ("reconcile",),
        ("sweep",),
        ("prices", "export"),
        ("wallet", "show", "alice"),
    ],
)
def test_missing_database_exits_1_and_creates_nothing(tmp_path: Path, args: tuple[str]) -> None:
    db = tmp_path / "nowhere.db"
    result = cli(db, *args)
    assert result.exit_code == 1
    assert f"error: no QuotaGate database at {db}: run `quotagate init` first" in result.stderr
    assert "Traceback" not in result.output
    assert not db.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--window", "fortnight", "100"), "unknown window 'fortnight'"),
        (("--window", "rolling:0m", "100"), "rolling window must be between"),
        (("--metric", "joules", "100"), "unknown metric 'joules'"),
        (("--reset-hour", "24", "100"), "reset hour must be 0..23"),
        (("--timezone", "Mars/Olympus", "100"), "unknown timezone 'Mars/Olympus'"),
        (("12.5",), "amount of tokens must be a whole number"),
        (("-w", "day", "lots"), "No such option"),
        (("--metric", "credits", "0.0000001"), "more than 6 decimals"),
    ],
)
def test_bad_limit_exits_2_and_changes_nothing(
    db: Path, args: tuple[str, ...], message: str
) -> None:
    before = as_json(db, "limits", "list", "--format", "json")
    result = cli(db, "limits", "set", "--role", "user", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert as_json(db, "limits", "list", "--format", "json") == before


def test_limit_needs_exactly_one_subject(db: Path) -> None:
    result = cli(db, "limits", "set", "--metric", "tokens", "100")
    assert result.exit_code == 2
    assert "exactly one of --everyone, --role" in result.stderr
    result = cli(db, "limits", "set", "--role", "user", "--group", "A", "100")
    assert result.exit_code == 2
    result = cli(db, "limits", "set", "--role", "user", "--per-user", "100")
    assert result.exit_code == 2
    assert "--per-user applies to --model and --pool" in result.stderr


# -- limits, users, groups, pools, wallets -------------------------------------------------


def test_limits_set_list_remove(db: Path) -> None:
    ok(db, "limits", "set", "--role", "user", "--metric", "tokens", "--window", "day", "10000")
    ok(db, "limits", "set", "--role", "user", "--window", "hour", "1,000")
    ok(db, "limits", "set", "--role", "admin", "unlimited")
    ok(db, "limits", "set", "--group", "A", "--metric", "credits", "--window", "month", "12.5")
    ok(db, "limits", "set", "--user", "alice", "--window", "rolling:24h", "5000")
    ok(db, "limits", "set", "--model", "gpt-4o", "--per-user", "20000")
    # caps on a key, a pool and a channel need them to exist (a typo would bind nothing)
    secret = ok(db, "keys", "create", "--user", "alice").stdout.strip().splitlines()[-1]
    k1 = secret.removeprefix("qg-").split("-")[0]
    ok(db, "pools", "set", "lab")
    ok(db, "channels", "add", "azure", "--base-url", "http://127.0.0.1:9/v1", "-m", "gpt-4o")
    ok(db, "limits", "set", "--key", k1, "--metric", "requests", "--window", "minute", "60")
    ok(db, "limits", "set", "--pool", "lab", "--window", "lifetime", "1000000")
    ok(db, "limits", "set", "--pool", "lab", "--per-user", "5000")
    ok(db, "limits", "set", "--channel", "azure", "--window", "rolling:60m", "90000")
    ok(
        db,
        *("limits", "set", "--everyone", "--window", "day", "--reset-hour", "4"),
        *("--timezone", "Europe/Berlin", "777"),
    )
    # the same subject, metric and window again changes the limit in place
    ok(db, "limits", "set", "--role", "user", "--window", "day", "12000")
    limits = as_json(db, "limits", "list", "--format", "json")
    found = {
        (x["scope"], x["target"], x["per_user"], x["metric"], x["window"]): x["amount"]
        for x in limits
    }
    assert found == {
        # same subject, metric and window as init's default: changed in place
        ("everyone", "*", True, "tokens", "day"): 777,
        ("role", "user", True, "tokens", "day"): 12_000,
        ("role", "user", True, "tokens", "hour"): 1_000,
        ("role", "admin", True, "tokens", "day"): None,
        ("group", "A", True, "credits", "month"): 12.5,
        ("user", "alice", True, "tokens", "rolling:1d"): 5000,
        ("model", "gpt-4o", True, "tokens", "day"): 20_000,
        ("key", k1, False, "requests", "minute"): 60,
        ("pool", "lab", False, "tokens", "lifetime"): 1_000_000,
        ("pool", "lab", True, "tokens", "day"): 5000,
        ("channel", "azure", False, "tokens", "rolling:1h"): 90_000,
    }
    berlin = next(x for x in limits if x["scope"] == "everyone")
    assert (berlin["reset_hour"], berlin["timezone"]) == (4, "Europe/Berlin")
    assert next(x for x in limits if x["target"] == "user")["timezone"] == "UTC"
    table = ok(db, "limits", "list").stdout
    assert "role admin" in table and "unlimited" in table

    target = next(x["id"] for x in limits if x["scope"] == "key")
    ok(db, "limits", "remove", str(target))
    assert target not in {x["id"] for x in as_json(db, "limits", "list", "--format", "json")}
    result = cli(db, "limits", "remove", str(target))
    assert result.exit_code == 2
    assert f"no limit with id {target}" in result.stderr


def test_users_groups_pools_and_wallet(db: Path) -> None:
    ok(db, "users", "set-role", "bob", "premium")
    ok(db, "users", "add-group", "alice", "A")
    ok(db, "users", "add-group", "alice", "B")
    ok(db, "users", "remove-group", "alice", "B")
    users = {u["id"]: u for u in as_json(db, "users", "list", "--format", "json")}
    assert (users["bob"]["role"], users["alice"]["groups"]) == ("premium", ["A"])
    result = cli(db, "users", "remove-group", "alice", "B")
    assert result.exit_code == 2 and "is not in group 'B'" in result.stderr

    ok(db, "groups", "multiplier", "A", "0.5")
    groups = {g["group"]: g for g in as_json(db, "groups", "list", "--format", "json")}
    assert groups["A"] == {"group": "A", "multiplier": "0.5", "members": 1}
    assert cli(db, "groups", "multiplier", "A", "cheap").exit_code == 2

    ok(db, "pools", "set", "lab", "--model", "llama-lab", "--group", "A")
    assert "llama-lab" in ok(db, "pools", "list").stdout

    ok(db, "wallet", "top-up", "alice", "12.5")
    ok(db, "wallet", "top-up", "alice", "--", "-2.5")
    assert as_json(db, "wallet", "show", "alice", "--format", "json") == {
        "user": "alice",
        "funded": 10,
        "spent": 0,
        "reserved": 0,
        "left": 10,
    }
    result = cli(db, "wallet", "top-up", "alice", "0")
    assert result.exit_code == 2 and "must not be zero" in result.stderr


# -- prices --------------------------------------------------------------------------------

PRICE_LIST: list[dict[str, Any]] = [
    {
        "provider": "openai",
        "id": "gpt-4o-2024-08-06",
        "name": "GPT-4o (Cloud, Paid) 2024-08-06",
        "input_cost_credits": 3750,
        "per_input_tokens": 1000000,
        "output_cost_credits": 15000,
        "per_output_tokens": 1000000,
    },
    {
        "provider": "anthropic",
        "id": "claude-3-5-haiku-20241022",
        "name": "Claude 3.5 Haiku (Cloud, Paid) 2024-10-22",
        "input_cost_credits": 1000,
        "per_input_tokens": 1000000,
        "output_cost_credits": 5000,
        "per_output_tokens": 1000000,
    },
    {
        "provider": "local",
        "id": "house-model",
        "name": "House model",
        "input_cost_credits": 0.25,
        "per_input_tokens": 1000,
        "output_cost_credits": 1.5,
        "per_output_tokens": 1000,
        "cached_cost_credits": 0.125,
        "per_cached_tokens": 1000,
    },
]


def exported(db: Path, *models: str) -> list[dict[str, Any]]:
    records = as_json(db, "prices", "export")
    return sorted((r for r in records if r["id"] in models), key=lambda r: r["id"])


def test_prices_set_list_and_effective_time(db: Path) -> None:
    ok(db, "prices", "set", "house", "--input", "2.5", "--output", "10", "--cached", "1.25")
    ok(
        db,
        *("prices", "set", "house", "--input", "3", "--output", "12"),
        *("--per", "1000", "--effective", "2099-12-01T00:00:00Z"),
    )
    current = [p for p in as_json(db, "prices", "list", "-f", "json") if p["id"] == "house"]
    assert [(p["input_cost_credits"], p["output_cost_credits"]) for p in current] == [(2.5, 10)]
    assert current[0]["cached_cost_credits"] == 1.25
    everything = as_json(db, "prices", "list", "--all", "--search", "house", "-f", "json")
    assert [(p["input_cost_credits"], p["state"]) for p in everything] == [
        (2.5, "current"),
        (3, "scheduled"),
    ]
    assert everything[1]["effective_from"] == "2099-12-01T00:00:00+00:00"
    result = cli(db, "prices", "set", "house", "--input", "-1", "--output", "2")
    assert result.exit_code == 2 and "--input must not be negative" in result.stderr


def test_price_import_export_round_trip(db: Path, tmp_path: Path) -> None:
    source = tmp_path / "prices.json"
    source.write_text(json.dumps(PRICE_LIST))
    result = ok(db, "prices", "import", str(source))
    assert "imported 3 prices" in result.stdout
    models = [r["id"] for r in PRICE_LIST]
    assert exported(db, *models) == sorted(PRICE_LIST, key=lambda r: r["id"])

    target = tmp_path / "out" / "export.json"
    target.parent.mkdir()
    ok(db, "prices", "export", str(target))
    written = json.loads(target.read_text())
    assert sorted((r for r in written if r["id"] in models), key=lambda r: r["id"]) == sorted(
        PRICE_LIST, key=lambda r: r["id"]
    )
    # the export imports into a fresh database and exports the same again
    other = tmp_path / "other.db"
    ok(other, "init")
    ok(other, "prices", "import", str(target))
    assert as_json(other, "prices", "export") == written


BAD_PRICE_FILES = [
    ("{not json", "is not valid JSON"),
    (json.dumps({"models": PRICE_LIST}), "must be a JSON list of price objects"),
    ("[]", "contains no prices"),
    (json.dumps([PRICE_LIST[0], "gpt-4o"]), "entry 2: price entry must be an object"),
    (
        json.dumps([PRICE_LIST[0], {**PRICE_LIST[1], "output_cost_credits": -5}]),
        "entry 2: output_cost_credits of 'claude-3-5-haiku-20241022' must not be negative",
    ),
    (
        json.dumps([PRICE_LIST[0], {**PRICE_LIST[1], "input_cost_credits": "cheap"}]),
        "entry 2",
    ),
    (json.dumps([{"id": "x", "input_cost_credits": 1}]), "lacks output_cost_credits"),
    (
        json.dumps([PRICE_LIST[0], {**PRICE_LIST[2], "per_input_tokens": 0}]),
        "entry 2: per_input_tokens",
    ),
    (json.dumps([PRICE_LIST[0], PRICE_LIST[0]]), "is also entry 1"),
]


@pytest.mark.parametrize(("content", "message"), BAD_PRICE_FILES)
def test_malformed_price_file_imports_nothing(
    db: Path, tmp_path: Path, content: str, message: str
) -> None:
    before = as_json(db, "prices", "list", "--all", "--format", "json")
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = cli(db, "prices", "import", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.output
    assert as_json(db, "prices", "list", "--all", "--format", "json") == before


def test_missing_price_file(db: Path, tmp_path: Path) -> None:
    result = cli(db, "prices", "import", str(tmp_path / "nope.json"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


# -- usage and status ----------------------------------------------------------------------

REQUESTS = [
    ("alice", "gpt-4o", 100, 50),
    ("alice", "gpt-4o-mini", 1000, 200),
    ("bob", "gpt-4o", 30, 70),
    ("alice", "gpt-4o", 10, 5),
]


def expected_usage(events: list[UsageEvent], key: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for e in events:
        name = getattr(e, key)
        row = rows.setdefault(name, {"requests": 0, "prompt": 0, "completion": 0, "credits": 0})
        row["requests"] += 1
        row["prompt"] += e.prompt_tokens
        row["completion"] += e.completion_tokens
        row["credits"] += e.credits
    return rows


def test_usage_json_and_csv_equal_what_was_settled(db: Path) -> None:
    events = asyncio.run(traffic(db, REQUESTS))
    assert all(e.credits > 0 for e in events)

    by_user = as_json(db, "usage", "--by", "user", "--format", "json")
    want = expected_usage(events, "user_id")
    assert {r["user"] for r in by_user} == {"alice", "bob"}
    for row in by_user:
        w = want[row["user"]]
        assert row["requests"] == w["requests"]
        assert row["prompt_tokens"] == w["prompt"]
        assert row["completion_tokens"] == w["completion"]
        assert row["total_tokens"] == w["prompt"] + w["completion"]
        assert Decimal(str(row["credits"])) == Decimal(w["credits"]) / MICRO

    text = ok(db, "usage", "--by", "model", "--format", "csv").stdout
    reader = list(csv.DictReader(io.StringIO(text)))
    assert list(reader[0]) == [
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "total_tokens",
        "credits",
        "estimated",
        "excess",
    ]
    want = expected_usage(events, "model")
    assert {r["model"] for r in reader} == set(want)
    for row in reader:
        w = want[row["model"]]
        assert int(row["requests"]) == w["requests"]
        assert int(row["total_tokens"]) == w["prompt"] + w["completion"]
        assert Decimal(row["credits"]) == Decimal(w["credits"]) / MICRO  # exact in CSV

    today = datetime.now(UTC).date().isoformat()
    by_day = as_json(db, "usage", "--by", "day", "--format", "json")
    assert sum(r["requests"] for r in by_day) == 4
    assert by_day[-1]["day"] == today or len(by_day) == 2  # two days only across midnight
    only_bob = as_json(db, "usage", "--user", "bob", "--format", "json")
    assert [(r["user"], r["total_tokens"]) for r in only_bob] == [("bob", 100)]
    assert as_json(db, "usage", "--since", "2099-01-01", "--format", "json") == []
    assert len(as_json(db, "usage", "--until", "2099-01-01", "-f", "json")) == 2
    table = ok(db, "usage", "--by", "model").stdout
    assert "gpt-4o-mini" in table and "total" in table

    bad = cli(db, "usage", "--since", "yesterday")
    assert bad.exit_code == 2 and "not a date or time: 'yesterday'" in bad.stderr
    bad = cli(db, "usage", "--by", "colour")
    assert bad.exit_code == 2


def test_status_shows_used_reserved_left_and_reset(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTAGATE_TIMEZONE", "Europe/Berlin")
    ok(db, "limits", "set", "--role", "user", "--window", "day", "--reset-hour", "4", "1000")
    ok(db, "limits", "set", "--role", "user", "--metric", "requests", "--window", "lifetime", "9")

    async def use() -> None:
        await traffic(db, [("alice", "gpt-4o", 200, 100)])
        engine = engine_on(db)
        try:  # an open ticket: reserved until settled
            await engine.admit(
                AdmitContext(user="alice", model="gpt-4o", prompt_tokens=50, max_tokens=150)
            )
        finally:
            await engine.close()

    before = datetime.now(UTC)
    asyncio.run(use())
    report = as_json(db, "status", "alice", "--format", "json")
    after = datetime.now(UTC)
    assert report["user"] == "alice" and report["known"] is True
    limits = {(x["metric"], x["window"]): x for x in report["limits"]}
    tokens = limits[("tokens", "day")]
    assert (tokens["amount"], tokens["used"], tokens["reserved"], tokens["left"]) == (
        1000,
        300,
        200,
        500,
    )
    window = parse_window("day", "Europe/Berlin", 4)
    berlin = ZoneInfo("Europe/Berlin")
    assert tokens["resets_at"] in {
        window.period(moment)[1].astimezone(berlin).isoformat() for moment in (before, after)
    }
    assert "T04:00:00+0" in tokens["resets_at"]  # 04:00 Berlin time, told with its offset
    requests = limits[("requests", "lifetime")]
    assert (requests["used"], requests["reserved"], requests["left"]) == (1, 1, 7)
    assert requests["resets_at"] is None

    table = ok(db, "status", "alice").stdout
    assert "role user" in table and "never" in table

    stranger = cli(db, "status", "nobody")
    assert stranger.exit_code == 0
    assert "has not been seen yet" in stranger.stderr


def test_refusal_matches_status(db: Path) -> None:
    """What `status` says is left is exactly what the engine still admits."""
    ok(db, "limits", "set", "--everyone", "--window", "day", "500")
    asyncio.run(traffic(db, [("carol", "gpt-4o", 100, 300)]))
    left = as_json(db, "status", "carol", "-f", "json")["limits"][0]["left"]
    assert left == 100

    async def too_much() -> QuotaExceeded:
        engine = engine_on(db)
        try:
            await engine.admit(
                AdmitContext(user="carol", model="gpt-4o", prompt_tokens=101, max_tokens=1)
            )
        except QuotaExceeded as exc:
            return exc
        finally:
            await engine.close()
        raise AssertionError("admitted beyond the limit")

    refusal = asyncio.run(too_much())
    assert refusal.remaining == left


# -- reconcile and sweep -------------------------------------------------------------------


def test_reconcile_detects_and_repairs_a_corrupted_counter(db: Path) -> None:
    asyncio.run(traffic(db, [("alice", "gpt-4o", 100, 50), ("bob", "gpt-4o", 10, 20)]))
    assert ok(db, "reconcile", "--check").exit_code == 0

    with sqlite3.connect(db) as conn:
        key = conn.execute(
            "SELECT key FROM counters WHERE key LIKE 'a|tokens|alice|%' AND used > 0"
        ).fetchone()[0]
        conn.execute("UPDATE counters SET used = used + 777 WHERE key = ?", (key,))
    conn.close()

    check = cli(db, "reconcile", "--check")
    assert check.exit_code == 1
    assert key[:30] in check.stdout and "927" in check.stdout and "150" in check.stdout
    with sqlite3.connect(db) as conn:  # --check repairs nothing
        assert conn.execute("SELECT used FROM counters WHERE key = ?", (key,)).fetchone() == (927,)
    conn.close()

    repair = ok(db, "reconcile")
    assert "repaired 1 counters" in repair.stdout
    assert ok(db, "reconcile", "--check").exit_code == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT used FROM counters WHERE key = ?", (key,)).fetchone() == (150,)
    conn.close()


def test_sweep_settles_expired_tickets(db: Path) -> None:
    async def abandon() -> None:
        engine = engine_on(db, lease_seconds=0.01)
        try:
            await engine.admit(
                AdmitContext(user="dave", model="gpt-4o", prompt_tokens=40, max_tokens=60)
            )
        finally:
            await engine.close()

    asyncio.run(abandon())
    import time

    time.sleep(0.05)
    result = ok(db, "sweep")
    assert "settled 1 expired tickets" in result.stdout
    assert "expired" in result.stdout
    usage = as_json(db, "usage", "--user", "dave", "-f", "json")
    assert [(r["total_tokens"], r["estimated"]) for r in usage] == [(100, 1)]
    assert "no expired tickets" in ok(db, "sweep").stdout


def test_sweep_prunes_counters_of_ended_windows(db: Path) -> None:
    async def last_week() -> None:
        engine = engine_on(db)
        moment = datetime.now(UTC) - timedelta(days=7)
        try:
            context = AdmitContext(user="erin", model="gpt-4o", prompt_tokens=40, max_tokens=60)
            ticket = await engine.admit(context, now=moment)
            await engine.settle(ticket, {"prompt_tokens": 40, "completion_tokens": 60}, now=moment)
        finally:
            await engine.close()

    asyncio.run(last_week())
    result = ok(db, "sweep")
    assert "pruned 1 counters of ended windows" in result.stdout  # erin's daily allowance
    assert "pruned" not in ok(db, "sweep").stdout
    ok(db, "reconcile", "--check")
    usage = as_json(db, "usage", "--user", "erin", "-f", "json")
    assert [r["total_tokens"] for r in usage] == [100]


# -- demo, help, the console script --------------------------------------------------------


def test_demo_runs_the_guided_tour(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"
    result = runner.invoke(app, ["demo", str(path)])
    assert result.exit_code == 0, result.output
    assert "Quota exceeded" in result.stdout
    assert "0 counters differ from the ledger" in result.stdout
    assert path.is_file()
    engine = engine_on(path)
    try:
        events = asyncio.run(engine.store.events(EventQuery()))
    finally:
        asyncio.run(engine.close())
    assert len(events) == 4
    again = runner.invoke(app, ["demo", str(path)])
    assert again.exit_code == 2 and "exists already" in again.stderr


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "demo", "limits", "users", "groups", "pools", "wallet", "prices"):
        assert command in result.stdout
    for command in ("usage", "status", "reconcile", "sweep"):
        assert command in result.stdout


def test_console_script_in_a_subprocess(tmp_path: Path) -> None:
    script = shutil.which("quotagate", path=str(Path(sys.executable).parent))
    assert script is not None, "the quotagate console script is not installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'sub.db'}"
    env["QUOTAGATE_CONFIG"] = str(tmp_path / "none.toml")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    missing = run("limits", "list")
    assert missing.returncode == 1
    assert "error: no QuotaGate database at" in missing.stderr
    assert run("init").returncode == 0
    assert (tmp_path / "sub.db").is_file()
    bad = run("limits", "set", "--role", "user", "--window", "fortnight", "10")
    assert bad.returncode == 2
    assert "error: unknown window 'fortnight'" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = run("limits", "set", "--role", "user", "--window", "week", "70000")
    assert good.returncode == 0, good.stderr
    assert "role user: 70,000 tokens per week" in good.stdout
    listed = json.loads(run("limits", "list", "--format", "json").stdout)
    assert {(x["scope"], x["window"], x["amount"]) for x in listed} == {
        ("everyone", "day", 100_000),
        ("role", "week", 70_000),
    }
    env["QUOTAGATE_MODE"] = "reckless"
    config = run("limits", "list")
    assert config.returncode == 1
    assert "error: invalid configuration: QUOTAGATE_MODE" in config.stderr


def test_broken_configuration_file_is_an_error_not_a_traceback(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("timezone = \n")
    monkeypatch.setenv("QUOTAGATE_CONFIG", str(config))
    result = cli(db, "limits", "list")
    assert result.exit_code == 1
    assert "error: invalid configuration file" in result.stderr
    config.write_text('timezone = "Mars/Olympus"\n')
    result = cli(db, "status", "alice")
    assert result.exit_code == 2
    assert "unknown timezone 'Mars/Olympus'" in result.stderr


@pytest.mark.parametrize("width", [40, 80, 160])
def test_usage_tables_never_shorten_a_figure(
    db: Path, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a narrow terminal the table wraps; it never replaces digits with an ellipsis."""
    ok(db, "limits", "set", "--everyone", "unlimited")
    events = asyncio.run(traffic(db, [("alice", "gpt-4o-mini", 123_456_789, 987_654)]))
    monkeypatch.setattr(common.out, "width", width)
    text = ok(db, "usage", "--by", "model").stdout
    assert "…" not in text
    if width >= 80:  # room for every figure on one line
        assert f"{events[0].prompt_tokens:,}" in text
        assert f"{events[0].total_tokens:,}" in text


def test_a_counter_url_is_refused_while_counters_in_redis_are_not_built(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator who points counter_url at Redis must not get counters silently kept in
    the SQLite file instead: one `error:` line, a non-zero exit, and nothing written."""
    before = snapshot(db)
    monkeypatch.setenv("QUOTAGATE_COUNTER_URL", "redis://127.0.0.1:6379/0")
    result = cli(db, "limits", "set", "--user", "alice", "--window", "day", "10")
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ")
    assert "counter_url" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    monkeypatch.delenv("QUOTAGATE_COUNTER_URL")
    assert snapshot(db) == before
