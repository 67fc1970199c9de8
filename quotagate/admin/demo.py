"""`quotagate demo`: a short guided tour against a fresh SQLite file.

It does what an operator and a client would do — init, allowances, requests admitted and
settled through the engine, a clamped request, a refusal with its reset time, the usage
report — and prints the CLI command behind every step, so the tour doubles as a lesson.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from quotagate.admin.common import local_time, table
from quotagate.admin.reports import (
    STATUS_COLUMNS,
    STORE_GROUPS,
    GroupBy,
    status_cells,
    usage_rows,
)
from quotagate.admin.setup import initialise
from quotagate.core.errors import InvalidInput, QuotaExceeded
from quotagate.core.limits import Metric, Scope, format_amount
from quotagate.engine import AdmitContext, Engine
from quotagate.store.base import EventQuery
from quotagate.store.factory import open_engine

MODEL = "gpt-4o-mini"


@contextmanager
def demo_database(path: Path | None) -> Iterator[Path]:
    """`path` if given (it must not exist yet), else a file in a temporary directory."""
    if path is not None:
        if path.exists():
            raise InvalidInput(f"{path} exists already; the demo needs a fresh file")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="quotagate-demo-") as directory:
        yield Path(directory) / "quotagate-demo.db"


async def run_demo(path: Path, console: Console) -> None:
    engine = open_engine(f"sqlite:///{path}", create=True)
    try:
        await _tour(engine, console)
    finally:
        await engine.close()


def _step(console: Console, title: str, *commands: str) -> None:
    console.print()
    console.rule(f"[bold]{escape(title)}")
    for command in commands:
        console.print(f"[dim]$[/dim] [cyan]{escape(command)}[/cyan]", soft_wrap=True)


async def _tour(engine: Engine, console: Console) -> None:
    tz = engine.settings.timezone
    catalog = engine.catalog
    console.print(
        Panel.fit(
            "QuotaGate guided demo: a fresh database, a few allowances, and simulated\n"
            f"requests by two users to {MODEL} through the engine.",
            title="quotagate demo",
        )
    )

    _step(
        console, "1. Create the database, load prices, set the default allowance", "quotagate init"
    )
    report = initialise(engine)
    console.print(
        f"database {escape(report.database)}\n"
        f"{report.prices_added:,} model prices loaded from {report.price_source} "
        f"(at {engine.settings.credits_per_usd:,} credits per USD)\n"
        f"default allowance: {escape(report.allowance_note)}"
    )

    _step(
        console,
        "2. Allowances: role 'user' gets 2,000 tokens a day, group 'research' adds 1,000",
        "quotagate limits set --role user --metric tokens --window day 2000",
        "quotagate limits set --group research --metric tokens --window day 1000",
        "quotagate users add-group alice research",
    )
    catalog.set_limit(Scope.ROLE, "user", Metric.TOKENS, "day", 2000)
    catalog.set_limit(Scope.GROUP, "research", Metric.TOKENS, "day", 1000)
    catalog.add_member("alice", "research")
    catalog.ensure_user("bob")
    engine.refresh()
    console.print(
        "alice: role user + group research = 3,000 tokens/day; bob: role user = 2,000 tokens/day"
    )

    _step(console, "3. Requests: admit (reserve) → call the model → settle the real usage")
    rows = []
    for user, prompt, completion in (("alice", 150, 350), ("alice", 120, 280), ("bob", 200, 390)):
        ticket = await engine.admit(
            AdmitContext(user=user, model=MODEL, prompt_tokens=prompt, max_tokens=400)
        )
        reserved = next(h.reserved for h in ticket.holds if h.metric is Metric.TOKENS)
        event = await engine.settle(
            ticket, {"prompt_tokens": prompt, "completion_tokens": completion}
        )
        rows.append(
            (
                user,
                f"{reserved:,}",
                f"{event.total_tokens:,}",
                format_amount(Metric.CREDITS, event.credits),
            )
        )
    console.print(
        table(None, ("user", ">reserved at admit", ">charged at settle", ">credits"), rows)
    )

    _step(console, "4. What binds alice now", "quotagate status alice")
    statuses = await engine.status("alice")
    console.print(table(None, STATUS_COLUMNS, [status_cells(s, tz) for s in statuses]))

    _step(console, "5. A request larger than what is left is clamped, never overspent")
    ticket = await engine.admit(
        AdmitContext(user="alice", model=MODEL, prompt_tokens=100, max_tokens=4000)
    )
    console.print(
        f"alice asked for 4,000 completion tokens; the ticket allows {ticket.max_tokens:,} "
        "(what her daily allowance still covers after the 100-token prompt)"
    )
    await engine.settle(ticket, {"prompt_tokens": 100, "completion_tokens": ticket.max_tokens})

    _step(console, "6. The allowance is used up: the next request is refused")
    try:
        await engine.admit(
            AdmitContext(user="alice", model=MODEL, prompt_tokens=50, max_tokens=200)
        )
    except QuotaExceeded as refused:
        console.print(f"[yellow]{escape(str(refused))}[/yellow]", soft_wrap=True)
        console.print(
            f"→ alice can try again at {local_time(refused.resets_at, tz)}; "
            "the gateway answers HTTP 429 with Retry-After"
        )
    else:  # pragma: no cover - the numbers above make this impossible
        console.print("[red]unexpected: the request was admitted[/red]")

    _step(console, "7. Usage from the ledger", "quotagate usage --by user")
    sums = await engine.store.usage(EventQuery(), STORE_GROUPS[GroupBy.user])
    by_user = [
        (
            str(r.key),
            f"{r.requests:,}",
            f"{r.total_tokens:,}",
            format_amount(Metric.CREDITS, r.credits),
        )
        for r in usage_rows(sums, GroupBy.user, tz)
    ]
    console.print(table(None, ("user", ">requests", ">tokens", ">credits"), by_user))

    _step(console, "8. Counters always equal the ledger", "quotagate reconcile --check")
    diffs = await engine.reconcile(repair=False)
    console.print(f"{len(diffs)} counters differ from the ledger")
    console.print()
    console.print(
        "Next: `quotagate init` for a database of your own, then `quotagate --help`.",
        soft_wrap=True,
    )
