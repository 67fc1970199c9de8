"""`quotagate usage|status|reconcile|sweep`: what was used, what is left, and keeping the
counters honest."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import typer

from quotagate.admin.common import (
    Format,
    TableOrJson,
    credits_text,
    done,
    local_time,
    note,
    opened,
    out,
    parse_instant,
    print_csv,
    print_json,
    state,
    table,
    user_id,
)
from quotagate.admin.reports import (
    STATUS_COLUMNS,
    STORE_GROUPS,
    USAGE_FIELDS,
    GroupBy,
    status_cells,
    status_record,
    total,
    usage_record,
    usage_rows,
)
from quotagate.core.errors import InvalidInput
from quotagate.core.limits import Metric, format_amount
from quotagate.store.base import EventQuery, UsageSum


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
    app.command("status")(status)
    app.command("reconcile")(reconcile)
    app.command("sweep")(sweep)


def usage(
    ctx: typer.Context,
    by: Annotated[GroupBy, typer.Option("--by", help="one row per user, model or day")] = (
        GroupBy.user
    ),
    user: Annotated[
        str | None, typer.Option(help="only this user (id, or email)", show_default=False)
    ] = None,
    model: Annotated[str | None, typer.Option(help="only this model", show_default=False)] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="from this date or time on (ISO; configured timezone)", show_default=False
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="up to this time; a bare date includes that day", show_default=False),
    ] = None,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
) -> None:
    """Requests, tokens and credits from the ledger, per user, model or day.

    Example: `usage --by day --since 2026-11-01 --format csv`.
    """
    tz = state(ctx).settings().timezone
    start = parse_instant(since, tz) if since else None
    end = parse_instant(until, tz, end_of_day=True) if until else None
    if start and end and end <= start:
        raise InvalidInput(f"--until ({until}) must be after --since ({since})")
    with opened(ctx) as engine:
        query = EventQuery(
            user_id=None if user is None else user_id(engine, user),
            model=model,
            since=start.timestamp() if start else None,
            until=end.timestamp() if end else None,
        )
        sums = asyncio.run(engine.store.usage(query, STORE_GROUPS[by]))
    rows = usage_rows(sums, by, tz)
    if format is Format.json:
        print_json([usage_record(row, by) for row in rows])
    elif format is Format.csv:
        print_csv((by.value, *USAGE_FIELDS), [_csv_cells(row) for row in rows])
    else:
        # excess (tokens an upstream reported beyond the reservation) gets a column only
        # when there is some: it is rare, and a narrow terminal keeps every figure whole
        excess = any(row.excess for row in rows)
        cells = [_table_cells(row, excess) for row in rows]
        if len(rows) > 1:
            cells.append(_table_cells(total(rows), excess))
        columns: tuple[str, ...] = (
            by.value,
            ">requests",
            ">prompt",
            ">completion",
            ">total tokens",
            ">credits",
        )
        if excess:
            columns += (">excess",)
        out.print(table(f"Usage by {by.value} ({tz})", columns, cells))


def _csv_cells(row: UsageSum) -> list[object]:
    return [
        row.key,
        row.requests,
        row.prompt_tokens,
        row.completion_tokens,
        row.cached_tokens,
        row.total_tokens,
        credits_text(row.credits),
        row.estimated,
        row.excess,
    ]


def _table_cells(row: UsageSum, excess: bool = False) -> list[object]:
    cells: list[object] = [
        row.key,
        f"{row.requests:,}",
        f"{row.prompt_tokens:,}",
        f"{row.completion_tokens:,}",
        f"{row.total_tokens:,}",
        format_amount(Metric.CREDITS, row.credits),
    ]
    if excess:
        cells.append(f"{row.excess:,}")
    return cells


def status(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="user id, or the email of one user")],
    format: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """Every limit that binds a user: amount, used, reserved, left and when it resets."""
    tz = state(ctx).settings().timezone
    with opened(ctx) as engine:
        user = user_id(engine, user)
        known = engine.catalog.user(user) is not None
        statuses = asyncio.run(engine.status(user))
    if format is TableOrJson.json:
        print_json(
            {"user": user, "known": known, "limits": [status_record(s, tz) for s in statuses]}
        )
        return
    if not known:
        note(f"user {user!r} has not been seen yet: showing what a new user with role 'user' gets")
    if not statuses:
        note(f"no limit binds {user!r}: requests are not capped")
        return
    out.print(table(f"Limits of {user}", STATUS_COLUMNS, [status_cells(s, tz) for s in statuses]))


def reconcile(
    ctx: typer.Context,
    check: Annotated[
        bool, typer.Option("--check", help="only report; exit 1 if any counter differs")
    ] = False,
) -> None:
    """Recompute every counter from the ledger and the open tickets, report and repair."""
    with opened(ctx) as engine:
        diffs = asyncio.run(engine.reconcile(repair=not check))
    if not diffs:
        done("every counter equals the ledger")
        return
    rows = [
        (
            d.key,
            f"{d.used:,}",
            f"{d.reserved:,}",
            f"{d.expected_used:,}",
            f"{d.expected_reserved:,}",
        )
        for d in diffs
    ]
    columns = ("counter", ">used", ">reserved", ">ledger used", ">ledger reserved")
    out.print(table("Counters that differ from the ledger", columns, rows))
    if check:
        note(f"{len(diffs)} counters differ; run `quotagate reconcile` to repair them")
        raise typer.Exit(1)
    done(f"repaired {len(diffs)} counters")


def sweep(ctx: typer.Context) -> None:
    """Settle tickets whose lease ran out (charged or released, as configured), then delete
    the counters of windows that ended (their usage stays in the ledger)."""
    tz = state(ctx).settings().timezone
    with opened(ctx) as engine:
        events = asyncio.run(engine.sweep())
        pruned = asyncio.run(engine.prune())
    if pruned:
        done(f"pruned {pruned:,} counters of ended windows")
    if not events:
        done("no expired tickets")
        return
    rows = [
        (
            e.ticket_id,
            e.user_id,
            e.model,
            e.status,
            f"{e.total_tokens:,}",
            format_amount(Metric.CREDITS, e.credits),
            local_time(_utc(e.started_at), tz),
        )
        for e in events
    ]
    columns = ("ticket", "user", "model", "status", ">tokens", ">credits", "started")
    out.print(table("Expired tickets settled", columns, rows))
    done(f"settled {len(events)} expired tickets")


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
