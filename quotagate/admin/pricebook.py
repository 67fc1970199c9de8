"""Price lists in and out: the defaults shipped by `genai-prices`, and the JSON price files
of openwebui-token-tracking (a list of ``{provider, id, name, input_cost_credits,
per_input_tokens, output_cost_credits, per_output_tokens}``).

Reading a price file validates every entry before anything is stored, so a bad file
imports nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

from quotagate.core.errors import InvalidInput
from quotagate.core.pricing import Price, price_from_record, price_to_record

#: Where a model is sold by several providers, the maker's own price is the reference;
#: resellers follow in the order genai-prices lists them.
FIRST_PARTY = (
    "openai",
    "anthropic",
    "google",
    "mistral",
    "deepseek",
    "x-ai",
    "meta",
    "cohere",
    "moonshotai",
    "zai",
    "zhipuai",
    "minimax",
    "perplexity",
    "voyageai",
)
PER_MILLION = 1_000_000


@dataclass
class DefaultPrices:
    """What genai-prices offers: one price per model id, and how many it could not price."""

    prices: list[Price]
    skipped: int
    source: str


def genai_prices(credits_per_usd: Decimal, at: datetime | None = None) -> DefaultPrices:
    """The price in effect now of every model genai-prices knows, in credits per 1M tokens.

    genai-prices gives USD per million tokens. A model may have one plain price, tiered
    prices (the base tier is taken: it is what a request below the first threshold pays)
    or a list of conditional prices (the last one whose start date has passed is taken;
    time-of-day discounts are ignored, which errs towards charging the full price).
    Prices scheduled for a future date are not imported: they would later override a
    price an admin has set in the meantime.
    """
    from genai_prices.data import providers

    moment = at or datetime.now(UTC)
    order = {name: index for index, name in enumerate(FIRST_PARTY)}
    ranked = sorted(
        enumerate(providers), key=lambda item: (order.get(item[1].id, len(order)), item[0])
    )
    chosen: dict[str, Price] = {}
    skipped = 0
    for _, provider in ranked:
        for model in provider.models:
            if model.id in chosen:
                continue
            price = _to_credits(provider.id, model, moment, credits_per_usd)
            if price is None:
                skipped += 1
                continue
            chosen[model.id] = price
    return DefaultPrices(
        prices=sorted(chosen.values(), key=lambda p: (p.provider, p.model)),
        skipped=skipped,
        source=f"genai-prices {_version()}",
    )


def _version() -> str:
    try:
        return metadata.version("genai-prices")
    except metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency
        return "(unknown version)"


def _to_credits(provider: str, model: Any, at: datetime, rate: Decimal) -> Price | None:
    current = _current(model.prices, at)
    if current is None:
        return None
    input_usd = _base(getattr(current, "input_mtok", None))
    if input_usd is None:
        return None  # priced per image, per request, per second...: not a token price
    output_usd = _base(getattr(current, "output_mtok", None)) or Decimal(0)  # embeddings
    cached_usd = _base(getattr(current, "cache_read_mtok", None))
    return Price(
        model=model.id,
        provider=provider,
        name=model.name or model.id,
        input_credits=_tidy(input_usd * rate),
        per_input_tokens=PER_MILLION,
        output_credits=_tidy(output_usd * rate),
        per_output_tokens=PER_MILLION,
        cached_credits=None if cached_usd is None else _tidy(cached_usd * rate),
        per_cached_tokens=PER_MILLION,
    )


def _current(prices: Any, at: datetime) -> Any | None:
    """The ModelPrice in effect at `at`: plain, or the last conditional one that applies."""
    if not isinstance(prices, list):
        return prices
    found = None
    for conditional in prices:
        constraint = conditional.constraint
        if constraint is None or (hasattr(constraint, "start_date") and constraint.active(at)):
            found = conditional.prices
    return found


def _base(value: Any) -> Decimal | None:
    """A plain price, or the base of tiered prices; None when there is none."""
    if value is None:
        return None
    base = getattr(value, "base", value)
    try:
        result = Decimal(base)
    except (TypeError, ValueError, ArithmeticError):
        return None
    return result if result.is_finite() and result >= 0 else None


def _tidy(value: Decimal) -> Decimal:
    """2500.000 → 2500, 0.150 → 0.15: exact values without noise digits or exponents."""
    if value == value.to_integral_value():
        return Decimal(int(value))
    return value.normalize()


# -- openwebui-token-tracking price files ------------------------------------------------


def read_price_file(path: Path, effective_from: datetime | None = None) -> list[Price]:
    """Every price of a JSON price file, or an InvalidInput naming the file and the entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"price file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read price file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"price file {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidInput(
            f"price file {path} is nested too deeply: a price list is a list of objects"
        ) from None
    return parse_price_list(data, str(path), effective_from)


def parse_price_list(
    data: Any, origin: str = "price list", effective_from: datetime | None = None
) -> list[Price]:
    if not isinstance(data, list):
        raise InvalidInput(
            f"{origin} must be a JSON list of price objects, got {type(data).__name__}"
        )
    if not data:
        raise InvalidInput(f"{origin} contains no prices")
    prices: list[Price] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(data, start=1):
        try:
            _check_record(record)
            price = price_from_record(record, effective_from)
        except InvalidInput as exc:
            raise InvalidInput(f"{origin}, entry {index}: {exc}") from None
        if price.model in seen:
            raise InvalidInput(
                f"{origin}, entry {index}: model {price.model!r} is also entry {seen[price.model]}"
            )
        seen[price.model] = index
        prices.append(price)
    return prices


def _check_record(record: Any) -> None:
    """What :func:`price_from_record` lets through but a price file must not contain."""
    if not isinstance(record, dict):
        return  # price_from_record names the problem
    model = record.get("id")
    if not isinstance(model, str) or not model.strip():
        raise InvalidInput(f"id must be a non-empty string, got {model!r}")
    for field in ("input_cost_credits", "output_cost_credits", "cached_cost_credits"):
        value = record.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise InvalidInput(f"{field} of {model!r} must not be negative: {value!r}")


def price_records(prices: Sequence[Price]) -> list[dict[str, Any]]:
    return [price_to_record(price) for price in prices]
