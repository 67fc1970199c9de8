"""What is counted (metrics), whom a limit binds (scopes) and the limit itself."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from quotagate.core.errors import InvalidInput
from quotagate.core.windows import Window

#: Credits are kept as integers of this many micro-credits, so prices of a fraction of a
#: credit per token add up exactly.
MICRO = 1_000_000

#: No quantity QuotaGate accepts may exceed this; larger numbers are typos or attacks.
ABSURD = 10**15


class Metric(StrEnum):
    TOKENS = "tokens"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    CREDITS = "credits"
    REQUESTS = "requests"

    @classmethod
    def parse(cls, text: str) -> Metric:
        try:
            return cls(text.strip().lower().replace("-", "_"))
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidInput(f"unknown metric {text!r}: use one of {names}") from None


class Scope(StrEnum):
    """What a limit is attached to.

    `everyone`, `role`, `group` and `user` limits are *allowances*: they always count per
    user and combine (override, else role-or-base plus the sum of the groups). The others
    apply on top; `per_user` says whether each user has a counter of their own.
    """

    EVERYONE = "everyone"
    ROLE = "role"
    GROUP = "group"
    USER = "user"
    MODEL = "model"
    KEY = "key"
    CHANNEL = "channel"
    POOL = "pool"

    @classmethod
    def parse(cls, text: str) -> Scope:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise InvalidInput(f"unknown scope {text!r}: use one of {names}") from None

    @property
    def is_allowance(self) -> bool:
        return self in (Scope.EVERYONE, Scope.ROLE, Scope.GROUP, Scope.USER)


@dataclass(frozen=True)
class Limit:
    """subject × metric × window × amount. `amount=None` means unlimited (still counted).

    Amounts are in base units: tokens, requests, or micro-credits.
    """

    id: int
    scope: Scope
    target: str
    metric: Metric
    window: Window
    amount: int | None
    per_user: bool = True

    def describe(self) -> str:
        if self.scope is Scope.EVERYONE:
            return "base allowance"
        who = f"{self.scope.value} {self.target}"
        return f"{who} per user" if self.per_user and not self.scope.is_allowance else who


def check_amount(value: object, what: str = "amount") -> int:
    """An integer quantity between 0 and ABSURD, or a precise InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be a whole number, got {value!r}")
    if value < 0:
        raise InvalidInput(f"{what} must not be negative, got {value}")
    if value > ABSURD:
        raise InvalidInput(f"{what} is absurdly large: {value}")
    return value


def format_amount(metric: Metric | str, value: int | None) -> str:
    """Human text of an amount in base units (credits shown in credits)."""
    if value is None:
        return "unlimited"
    if metric == Metric.CREDITS:
        credits = value / MICRO
        return f"{credits:,.2f}" if credits != int(credits) else f"{int(credits):,}"
    return f"{value:,}"
