"""`quotagate init`: default prices and a default allowance, safe to run again.

A second run adds prices only for models that have none (a newer genai-prices may know
more models) and never touches the default allowance again once it was set, so nothing
an admin changed is undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from quotagate.admin.pricebook import genai_prices
from quotagate.core.limits import Limit, Metric, Scope
from quotagate.core.text import masked
from quotagate.engine import Engine
from quotagate.store.factory import sqlite_path

META_INITIALISED = "initialised_at"
META_ALLOWANCE = "default_allowance"


@dataclass
class InitReport:
    database: str
    first_run: bool
    prices_added: int
    prices_kept: int
    prices_unpriceable: int
    price_source: str
    allowance: Limit | None
    allowance_note: str


def database_exists(url: str) -> bool:
    """Whether the database behind `url` exists already (servers: assume it does)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return False
    if scheme.startswith("sqlite"):
        return Path(sqlite_path(url)).is_file()
    return True


def describe_database(url: str) -> str:
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        return str(Path(sqlite_path(url)).resolve())
    return masked(url)


def initialise(engine: Engine, at: datetime | None = None) -> InitReport:
    """Load default prices and the default allowance into the engine's catalog."""
    catalog = engine.catalog
    settings = engine.settings
    moment = at or datetime.now(UTC)
    first_run = catalog.get_meta(META_INITIALISED) is None

    defaults = genai_prices(settings.credits_per_usd, moment)
    priced = {price.model for price in catalog.prices()}
    new = [price for price in defaults.prices if price.model not in priced]
    if new:
        catalog.add_prices(new, source="genai-prices")

    allowance, allowance_note = _default_allowance(engine)
    if first_run:
        catalog.set_meta(META_INITIALISED, moment.isoformat())
    engine.refresh()
    return InitReport(
        database=describe_database(settings.database_url),
        first_run=first_run,
        prices_added=len(new),
        prices_kept=len(defaults.prices) - len(new),
        prices_unpriceable=defaults.skipped,
        price_source=defaults.source,
        allowance=allowance,
        allowance_note=allowance_note,
    )


def _default_allowance(engine: Engine) -> tuple[Limit | None, str]:
    catalog = engine.catalog
    if catalog.get_meta(META_ALLOWANCE) is not None:
        return None, "default allowance was set by an earlier init: left as it is"
    amount = engine.settings.default_daily_tokens
    existing = [
        limit
        for limit in catalog.limits()
        if limit.scope is Scope.EVERYONE
        and limit.metric is Metric.TOKENS
        and limit.window.kind == "day"
    ]
    if existing:
        catalog.set_meta(META_ALLOWANCE, str(existing[0].id))
        return None, "an allowance for everyone per day exists already: left as it is"
    limit = catalog.set_limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", amount)
    catalog.set_meta(META_ALLOWANCE, str(limit.id))
    return limit, f"everyone: {amount:,} tokens per day"
