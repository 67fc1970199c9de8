"""`quotagate init` and `quotagate demo`: the two commands that may create a database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from quotagate.admin.common import done, note, opened, out, state
from quotagate.admin.demo import demo_database, run_demo
from quotagate.admin.setup import database_exists, initialise


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("demo")(demo)


def init(ctx: typer.Context) -> None:
    """Create the database (schema through migrations), load default model prices from
    genai-prices and set the default daily allowance. Safe to run again: it only adds
    prices for models that have none and never changes what an admin has set."""
    settings = state(ctx).settings()
    existed = database_exists(settings.database_url)
    with opened(ctx, create=True) as engine:
        report = initialise(engine)
    if existed:
        done(f"database {report.database} is up to date")
    else:
        done(f"created database {report.database}")
    if report.prices_added:
        done(
            f"added prices of {report.prices_added:,} models from {report.price_source} "
            f"at {settings.credits_per_usd:,} credits per USD"
        )
    else:
        done(f"prices: every model of {report.price_source} has a price already")
    if report.allowance is not None:
        done(f"default allowance: {report.allowance_note}")
    else:
        out.print(f"  {escape(report.allowance_note)}", soft_wrap=True)
    if report.first_run:
        note("next: `quotagate limits set ...` to shape allowances; `quotagate --help` for more")


def demo(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="SQLite file to create and keep (must not exist); default: a temporary file",
            show_default=False,
        ),
    ] = None,
) -> None:
    """A short guided demo on a fresh SQLite file: init, allowances, requests admitted and
    settled through the engine, a refusal with its reset time, and the usage report."""
    with demo_database(path) as file:
        asyncio.run(run_demo(file, out))
        if path is not None:
            done(f"kept the demo database: quotagate --database {file} status alice")
