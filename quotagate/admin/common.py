"""What every CLI command shares: the consoles, the database a command works on, and
parsers for the quantities operators type (amounts, credits, instants).

Parsers raise :class:`~quotagate.core.errors.InvalidInput` with a message that names the
option, so the CLI can print it and exit with status 2 before touching the database.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quotagate.config import Settings
from quotagate.core.errors import InvalidInput
from quotagate.core.limits import ABSURD, MICRO, Metric
from quotagate.core.windows import zone
from quotagate.engine import Engine

#: Tables and messages for people; data for scripts goes to stdout unformatted.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

UNLIMITED_WORDS = ("unlimited", "none", "inf", "infinite", "-")


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class TableOrJson(StrEnum):
    table = "table"
    json = "json"


# -- the database a command works on -----------------------------------------------------


@dataclass
class CliState:
    """Options of the root command, handed to every sub-command through the click context."""

    database_url: str | None = None

    def settings(self, **overrides: Any) -> Settings:
        if self.database_url is not None:
            overrides.setdefault("database_url", self.database_url)
        return Settings(**overrides)


def database_url(value: str) -> str:
    """A URL as given, or a plain file path turned into a ``sqlite:///`` URL."""
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser()}"


def state(ctx: typer.Context) -> CliState:
    found = ctx.find_object(CliState)
    return found if found is not None else CliState()


@contextmanager
def opened(ctx: typer.Context, *, create: bool = False) -> Iterator[Engine]:
    """The engine on the configured database. Without `create` a missing database is a
    :class:`ConfigError` telling the operator to run ``quotagate init``."""
    from quotagate.store.factory import open_engine

    engine = open_engine(state(ctx).database_url, create=create)
    try:
        yield engine
    finally:
        asyncio.run(engine.close())


# -- parsing what operators type ---------------------------------------------------------


def parse_decimal(text: str, what: str) -> Decimal:
    """A finite, non-negative decimal number (``1_000``, ``1,000`` and ``2.5`` are fine)."""
    cleaned = text.strip().replace("_", "").replace(",", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise InvalidInput(f"{what} must be a number, got {text!r}") from None
    if not value.is_finite():
        raise InvalidInput(f"{what} must be a finite number, got {text!r}")
    if value < 0:
        raise InvalidInput(f"{what} must not be negative, got {text!r}")
    if value > ABSURD:
        raise InvalidInput(f"{what} is absurdly large: {text!r}")
    return value


def parse_credits(text: str, what: str, *, allow_negative: bool = False) -> int:
    """Credits as typed (``12.5``) → micro-credits, exactly; more than 6 decimals is an error."""
    negative = allow_negative and text.strip().startswith("-")
    value = parse_decimal(text.strip().removeprefix("-") if negative else text, what)
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise InvalidInput(f"{what} has more than 6 decimals: {text!r}")
    return -int(micro) if negative else int(micro)


def parse_amount(text: str, metric: Metric) -> int | None:
    """A limit amount in base units: tokens and requests whole, credits in credits.

    ``unlimited`` gives None (counted, never refused)."""
    if text.strip().lower() in UNLIMITED_WORDS:
        return None
    if metric is Metric.CREDITS:
        return parse_credits(text, "amount")
    value = parse_decimal(text, "amount")
    if value != value.to_integral_value():
        raise InvalidInput(f"amount of {metric.value} must be a whole number, got {text!r}")
    return int(value)


def parse_instant(text: str, tz: str, *, end_of_day: bool = False) -> datetime:
    """An ISO date or date-time. Naive values are in `tz`; a bare date means its midnight,
    or with `end_of_day` the next midnight (so ``--until 2026-01-31`` includes that day)."""
    raw = text.strip()
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            if end_of_day:
                day += timedelta(days=1)
            return datetime.combine(day, time(), tzinfo=zone(tz)).astimezone(UTC)
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"not a date or time: {text!r} (use e.g. 2026-11-01 or 2026-11-01T08:00:00+01:00)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone(tz))
    return parsed.astimezone(UTC)


# -- showing results ---------------------------------------------------------------------


def credits_number(micro: int) -> int | float:
    """Micro-credits as a JSON number of credits (exact to the micro-credit)."""
    value = Decimal(micro) / MICRO
    return int(value) if value == value.to_integral_value() else float(value)


def credits_text(micro: int) -> str:
    """Micro-credits as exact decimal text of credits (for CSV)."""
    value = Decimal(micro) / MICRO
    return str(int(value)) if value == value.to_integral_value() else f"{value:f}"


def value_number(metric: Metric, amount: int | None) -> int | float | None:
    """An amount in the unit an operator thinks in: credits for credits, else as is."""
    if amount is None:
        return None
    return credits_number(amount) if metric is Metric.CREDITS else amount


def local_time(moment: datetime | None, tz: str) -> str:
    """A moment for people: local date and time, seconds only when there are any."""
    if moment is None:
        return "never"
    local = moment.astimezone(zone(tz))
    clock = "%H:%M:%S" if local.second or local.microsecond else "%H:%M"
    return f"{local:%Y-%m-%d} {local:{clock}} {local.tzname()}"


def iso_time(moment: datetime | None, tz: str) -> str | None:
    return None if moment is None else moment.astimezone(zone(tz)).isoformat()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    """A Rich table; columns whose name starts with '>' are right-aligned numbers.

    Nothing is shortened with an ellipsis in a narrow terminal: numbers keep their whole
    width while they fit side by side, and text wraps, folding a word wider than its
    column onto the next line.
    """
    texts = [[escape(str(cell)) for cell in row] for row in rows]
    widths = [max((len(row[i]) for row in texts), default=0) for i in range(len(columns))]
    numbers = [i for i, column in enumerate(columns) if column.startswith(">")]
    # each column takes 3 characters of border and padding, each text column at least 4
    texts_need = 4 * (len(columns) - len(numbers))
    whole = sum(widths[i] for i in numbers) + 3 * len(columns) + 1 + texts_need <= out.width
    result = Table(title=title, title_justify="left", show_lines=False)
    for index, column in enumerate(columns):
        if index in numbers:
            result.add_column(
                column[1:],
                justify="right",
                overflow="fold",
                no_wrap=whole,
                min_width=widths[index] if whole else None,
            )
        else:
            result.add_column(column, overflow="fold")
    for row in texts:
        result.add_row(*row)
    return result


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def print_csv(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


def done(message: str) -> None:
    """A one-line confirmation (green tick) of a change."""
    out.print(f"[green]✓[/green] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    """A remark that is not an error (yellow, on stderr so scripts' stdout stays clean)."""
    err.print(f"[yellow]note:[/yellow] {escape(message)}", soft_wrap=True)


def user_id(engine: Engine, name: str) -> str:
    """The user id an admin means by `name`: a user id, or the email of exactly one user
    (Open WebUI's users are known by a UUID; admins know their email). An email nobody
    has is kept as an id, as any unknown id is (a user created before they first chat)."""
    found = engine.catalog.find_users(name)
    if len(found) > 1:
        ids = ", ".join(u.id for u in found)
        raise InvalidInput(f"{len(found)} users have the email {name!r} ({ids}): name one by id")
    return found[0].id if found else name
