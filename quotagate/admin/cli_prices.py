"""`quotagate prices`: model prices in credits, and price files in and out.

A price applies from its effective time on; older rows stay, so usage already in the
ledger (which keeps the credits it was charged) is never repriced.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from quotagate.admin.common import (
    TableOrJson,
    done,
    local_time,
    opened,
    out,
    parse_decimal,
    parse_instant,
    print_json,
    state,
    table,
)
from quotagate.admin.pricebook import price_records, read_price_file
from quotagate.core.errors import InvalidInput
from quotagate.core.pricing import Price

prices_app = typer.Typer(no_args_is_help=True, help="Model prices in credits.")


def register(app: typer.Typer) -> None:
    app.add_typer(prices_app, name="prices")


@prices_app.command("set")
def prices_set(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model id as clients send it, e.g. gpt-4o")],
    input: Annotated[
        str, typer.Option("--input", help="credits per --per input tokens", show_default=False)
    ],
    output: Annotated[
        str, typer.Option("--output", help="credits per --per output tokens", show_default=False)
    ],
    cached: Annotated[
        str | None,
        typer.Option(help="credits per --per cached input tokens", show_default=False),
    ] = None,
    per: Annotated[int, typer.Option(min=1, help="tokens the prices are for")] = 1_000_000,
    effective: Annotated[
        str | None,
        typer.Option(help="when the price starts (ISO time; default now)", show_default=False),
    ] = None,
    provider: Annotated[str, typer.Option(help="shown in lists and exports")] = "",
    name: Annotated[str, typer.Option(help="display name")] = "",
) -> None:
    """Set a model's price from now (or --effective) on.

    Example: `prices set gpt-4o --input 2500 --output 10000 --cached 1250`.
    """
    tz = state(ctx).settings().timezone
    price = Price(
        model=model,
        provider=provider,
        name=name or model,
        input_credits=parse_decimal(input, "--input"),
        per_input_tokens=per,
        output_credits=parse_decimal(output, "--output"),
        per_output_tokens=per,
        cached_credits=None if cached is None else parse_decimal(cached, "--cached"),
        per_cached_tokens=per,
        effective_from=parse_instant(effective, tz) if effective else None,
    )
    with opened(ctx) as engine:
        stored = engine.catalog.add_price(price)
    cached_text = f", cached {stored.cached_credits}" if stored.cached_credits is not None else ""
    done(
        f"{model} from {local_time(stored.effective_from, tz)}: input {stored.input_credits}, "
        f"output {stored.output_credits}{cached_text} credits per {per:,} tokens"
    )


@prices_app.command("list")
def prices_list(
    ctx: typer.Context,
    all: Annotated[
        bool, typer.Option("--all", help="also superseded and scheduled prices")
    ] = False,
    search: Annotated[
        str | None, typer.Option(help="only models whose id contains this", show_default=False)
    ] = None,
    format: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """The price of every model now (credits per N tokens)."""
    tz = state(ctx).settings().timezone
    now = datetime.now(UTC)
    with opened(ctx) as engine:
        current = engine.catalog.current_prices(now)
        rows = engine.catalog.prices() if all else current
    in_effect = {(p.model, p.effective_from) for p in current}
    if search:
        rows = [p for p in rows if search.lower() in p.model.lower()]

    def state_of(price: Price) -> str:
        if (price.model, price.effective_from) in in_effect:
            return "current"
        return "scheduled" if price.effective_from and price.effective_from > now else "old"

    if format is TableOrJson.json:
        records = []
        for price in rows:
            record = price_records([price])[0]
            record["effective_from"] = (
                price.effective_from.isoformat() if price.effective_from else None
            )
            record["state"] = state_of(price)
            records.append(record)
        print_json(records)
        return
    cells = [
        (
            p.model,
            p.provider,
            p.input_credits,
            p.output_credits,
            "" if p.cached_credits is None else p.cached_credits,
            f"{p.per_input_tokens:,}",
            local_time(p.effective_from, tz),
            state_of(p),
        )
        for p in rows
    ]
    columns = ("model", "provider", ">input", ">output", ">cached", ">per tokens", "from", "state")
    out.print(
        table(
            "Prices in credits",
            columns if all else columns[:-1],
            [c if all else c[:-1] for c in cells],
        )
    )


@prices_app.command("import")
def prices_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON list in openwebui-token-tracking's format")],
    effective: Annotated[
        str | None,
        typer.Option(help="when the prices start (ISO time; default now)", show_default=False),
    ] = None,
) -> None:
    """Import a price list; every entry is checked first, a bad file imports nothing."""
    tz = state(ctx).settings().timezone
    when = parse_instant(effective, tz) if effective else None
    prices = read_price_file(file, when)
    with opened(ctx) as engine:
        count = engine.catalog.add_prices(prices, source="import")
    done(f"imported {count} prices from {file}")


@prices_app.command("export")
def prices_export(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="where to write; default: stdout", show_default=False)
    ] = None,
) -> None:
    """Export the prices in effect now in openwebui-token-tracking's JSON format."""
    with opened(ctx) as engine:
        records = price_records(engine.catalog.current_prices())
    if file is None:
        print_json(records)
        return
    try:
        file.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot write {file}: {exc.strerror or exc}") from None
    done(f"exported {len(records)} prices to {file}")
