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
from quotagate.core.limits import ABSURD, MICRO
from quotagate.core.text import MAX_NAME, check_name

#: The most a price may ask per token, in credits. With micro-credits that is 10^15 per
#: token, so every cost the engine computes fits a 64-bit column (it bounds the products
#: on top, see :meth:`Price.cost`).
MAX_CREDITS_PER_TOKEN = 10**9
#: Characters of decimal text a price (or a group's multiplier) is stored as.
PRICE_DIGITS = 32
#: The most a group's multiplier may scale a price by.
MAX_MULTIPLIER = 10**6


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
        check_name(self.model, "model id", allow_bar=True)
        for field, longest in (("provider", 64), ("name", MAX_NAME)):
            value = getattr(self, field)
            if not isinstance(value, str) or len(value) > longest:
                raise InvalidInput(f"{field} must be text of at most {longest} characters")
        for field in ("per_input_tokens", "per_output_tokens", "per_cached_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInput(f"{field} must be a positive whole number, got {value!r}")
            if value > ABSURD:
                raise InvalidInput(f"{field} is absurdly large: {value:,} (at most {ABSURD:,})")
        for field, per in (
            ("input_credits", self.per_input_tokens),
            ("output_credits", self.per_output_tokens),
            ("cached_credits", self.per_cached_tokens),
        ):
            value = getattr(self, field)
            optional = field == "cached_credits"
            if not (value is None and optional):
                _check_credits(value, per, field)

    def _rate(self, credits: Decimal, per: int, multiplier: Decimal) -> Decimal:
        return Decimal(credits) * MICRO * multiplier / per

    def cost(self, usage: Usage, multiplier: Decimal = Decimal(1)) -> int:
        """Micro-credits charged for `usage` (cached prompt tokens at the cached price).

        More than :data:`~quotagate.core.limits.ABSURD` is refused (InvalidInput): no
        real request costs a billion credits, and the ledger's column holds 64 bits."""
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
        if total > ABSURD:
            raise InvalidInput(
                f"usage of {usage.prompt_tokens:,} + {usage.completion_tokens:,} tokens would "
                f"cost an absurd {total / MICRO:,.0f} credits at the price of {self.model!r}"
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
            input_credits=_decimal(record["input_cost_credits"], "input_cost_credits"),
            per_input_tokens=_per(record, "per_input_tokens"),
            output_credits=_decimal(record["output_cost_credits"], "output_cost_credits"),
            per_output_tokens=_per(record, "per_output_tokens"),
            cached_credits=(
                _decimal(record["cached_cost_credits"], "cached_cost_credits")
                if record.get("cached_cost_credits") is not None
                else None
            ),
            per_cached_tokens=_per(record, "per_cached_tokens"),
            effective_from=effective_from,
        )
    except InvalidInput as exc:
        message = str(exc)
        for field, name in _RECORD_NAMES.items():  # say it as the price file does
            message = message.replace(field, name)
        raise InvalidInput(message) from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise InvalidInput(f"price entry {record.get('id')!r}: {exc}") from exc


#: Price's fields as a price list names them
_RECORD_NAMES = {
    "input_credits": "input_cost_credits",
    "output_credits": "output_cost_credits",
    "cached_credits": "cached_cost_credits",
}


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
    number = _decimal(value, field)
    if number != number.to_integral_value() or number <= 0:
        raise InvalidInput(f"{field} must be a positive whole number, got {value!r}")
    return int(number)


def _check_credits(value: Any, per: int, field: str) -> None:
    """A price: a non-negative number of at most :data:`MAX_CREDITS_PER_TOKEN` credits per
    token, short enough for the catalog's column (32 characters of decimal text)."""
    number: Decimal | None = None
    if not isinstance(value, bool) and isinstance(value, int | float | str | Decimal):
        try:
            number = Decimal(str(value) if isinstance(value, float) else value)
        except ArithmeticError:
            number = None
    if number is None or not number.is_finite() or number < 0:
        raise InvalidInput(f"{field} must be a non-negative number, got {value!r}")
    if number > MAX_CREDITS_PER_TOKEN * per:
        raise InvalidInput(
            f"{field} is absurdly large: {number} credits per {per:,} tokens "
            f"(at most {MAX_CREDITS_PER_TOKEN:,} credits per token)"
        )
    if len(str(number)) > PRICE_DIGITS:
        raise InvalidInput(f"{field} has too many digits: {number} (at most {PRICE_DIGITS})")


def _decimal(value: Any, field: str) -> Decimal:
    """`value` of the price entry's `field` as a Decimal; a number in text is fine, other
    text is refused naming the field (Decimal's own error names only its internals)."""
    result: Decimal | None = None
    if not isinstance(value, bool) and isinstance(value, int | float | str | Decimal):
        try:
            result = Decimal(str(value))
        except ArithmeticError:
            result = None
    if result is None or not result.is_finite() or result < 0:
        raise InvalidInput(f"{field} must be a non-negative number, got {value!r}")
    return result


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)
