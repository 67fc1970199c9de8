"""Prices in credits and what a request costs.

A price is "N credits per M tokens" for input, output and cached input, valid from an
instant on. Costs are computed in micro-credits and rounded up, so a reservation made
with :meth:`Price.output_rate` always covers what :meth:`Price.cost` charges later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from quotagate.core.errors import InvalidInput
from quotagate.core.limits import MICRO


@dataclass(frozen=True)
class Usage:
    """Tokens a model reported (or that were counted) for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Price:
    model: str
    input_credits: Decimal
    per_input_tokens: int
    output_credits: Decimal
    per_output_tokens: int
    cached_credits: Decimal | None = None
    per_cached_tokens: int = 1_000_000
    effective_from: datetime | None = None
    provider: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("input_credits", "output_credits", "cached_credits"):
            value = getattr(self, field)
            optional = field == "cached_credits"
            if not (value is None and optional) and not _non_negative(value):
                raise InvalidInput(f"{field} must be a non-negative number, got {value!r}")
        for field in ("per_input_tokens", "per_output_tokens", "per_cached_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInput(f"{field} must be a positive whole number, got {value!r}")

    def _rate(self, credits: Decimal, per: int, multiplier: Decimal) -> Decimal:
        return Decimal(credits) * MICRO * multiplier / per

    def cost(self, usage: Usage, multiplier: Decimal = Decimal(1)) -> int:
        """Micro-credits charged for `usage` (cached prompt tokens at the cached price)."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = self.cached_credits if self.cached_credits is not None else None
        total = self._rate(self.input_credits, self.per_input_tokens, multiplier) * (
            usage.prompt_tokens - (cached if cached_price is not None else 0)
        )
        if cached_price is not None:
            total += self._rate(cached_price, self.per_cached_tokens, multiplier) * cached
        total += self._rate(self.output_credits, self.per_output_tokens, multiplier) * (
            usage.completion_tokens
        )
        return math.ceil(total)

    def input_cost(self, tokens: int, multiplier: Decimal = Decimal(1)) -> int:
        return math.ceil(self._rate(self.input_credits, self.per_input_tokens, multiplier) * tokens)

    def output_rate(self, multiplier: Decimal = Decimal(1)) -> int:
        """Micro-credits to reserve per completion token (rounded up: never too little)."""
        return math.ceil(self._rate(self.output_credits, self.per_output_tokens, multiplier))


# -- the price-list format of openwebui-token-tracking -----------------------------------

PRICE_FIELDS = (
    "provider",
    "id",
    "name",
    "input_cost_credits",
    "per_input_tokens",
    "output_cost_credits",
    "per_output_tokens",
)


def price_from_record(record: Any, effective_from: datetime | None = None) -> Price:
    """A :class:`Price` from one entry of an openwebui-token-tracking price list."""
    if not isinstance(record, dict):
        raise InvalidInput(f"price entry must be an object, got {record!r}")
    missing = [f for f in ("id", "input_cost_credits", "output_cost_credits") if f not in record]
    if missing:
        raise InvalidInput(f"price entry {record.get('id', record)!r} lacks {', '.join(missing)}")
    try:
        return Price(
            model=str(record["id"]),
            provider=str(record.get("provider", "")),
            name=str(record.get("name", record["id"])),
            input_credits=_decimal(record["input_cost_credits"]),
            per_input_tokens=_per(record, "per_input_tokens"),
            output_credits=_decimal(record["output_cost_credits"]),
            per_output_tokens=_per(record, "per_output_tokens"),
            cached_credits=(
                _decimal(record["cached_cost_credits"])
                if record.get("cached_cost_credits") is not None
                else None
            ),
            per_cached_tokens=_per(record, "per_cached_tokens"),
            effective_from=effective_from,
        )
    except (TypeError, ValueError, ArithmeticError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"price entry {record.get('id')!r}: {exc}") from exc


def price_to_record(price: Price, *, exact: bool = False) -> dict[str, Any]:
    """The price as an openwebui-token-tracking entry; `exact` keeps amounts as decimal
    strings (for tickets, which must settle at exactly the price they were admitted at)."""
    number = str if exact else _number
    record: dict[str, Any] = {
        "provider": price.provider,
        "id": price.model,
        "name": price.name or price.model,
        "input_cost_credits": number(price.input_credits),
        "per_input_tokens": price.per_input_tokens,
        "output_cost_credits": number(price.output_credits),
        "per_output_tokens": price.per_output_tokens,
    }
    if price.cached_credits is not None:
        record["cached_cost_credits"] = number(price.cached_credits)
        record["per_cached_tokens"] = price.per_cached_tokens
    return record


def _per(record: dict[str, Any], field: str) -> int:
    """A "per N tokens" field: a positive whole number (1e6 and "1000000" are fine, 1.5 is
    a typo that `int()` would silently turn into 1)."""
    value = record.get(field, 1_000_000)
    number = _decimal(value)
    if number != number.to_integral_value() or number <= 0:
        raise InvalidInput(f"{field} must be a positive whole number, got {value!r}")
    return int(number)


def _non_negative(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return False
    try:
        number = Decimal(value)
    except ArithmeticError:
        return False
    return number.is_finite() and number >= 0


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise InvalidInput(f"not a number: {value!r}")
    result = Decimal(str(value))
    if not result.is_finite() or result < 0:
        raise InvalidInput(f"price must be a non-negative number, got {value!r}")
    return result


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)
