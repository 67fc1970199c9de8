"""The exceptions QuotaGate raises, shared by every layer and front door."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


class QuotaGateError(Exception):
    """Base class of every error QuotaGate raises on purpose."""


class InvalidInput(QuotaGateError, ValueError):
    """A caller passed a value QuotaGate cannot accept (negative tokens, unknown window, ...).

    `param` names the offending field of a request where there is one (for example
    ``messages[0].tool_calls[0].function``), so an HTTP front door can say which."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(QuotaGateError, LookupError):
    """The model has no price and the configuration refuses unpriced models."""


class UnknownTicket(QuotaGateError, LookupError):
    """A ticket id that was never issued, or was cancelled."""


class ConfigError(QuotaGateError):
    """The configuration or the database is missing or unusable."""


class StoreUnavailable(QuotaGateError):
    """The counter store cannot be reached."""


@dataclass
class Refusal:
    """Why one limit refused a request: everything a client needs to decide when to retry."""

    limit: str
    metric: str
    window: str
    amount: int
    used: int
    reserved: int
    #: the least this request needs left on the limit to be admitted: in strict mode its
    #: prompt plus `min_output_tokens` (not the completion budget it asked for), in
    #: optimistic mode one unit
    requested: int
    resets_at: datetime | None
    #: what the limit is attached to ("allowance", "wallet", or a Scope value such as
    #: "channel") and its target: a gateway lets a channel-cap refusal fall through to the
    #: next channel
    scope: str | None = None
    target: str | None = None
    #: the window as data, for wording and classification: its kind ("day", "rolling"…),
    #: its length in seconds (None: lifetime), whether running out of it is a rate limit
    #: (:attr:`Window.is_rate_limit`: up to an hour long) and the timezone its reset is
    #: told in (the configured one for windows that have none of their own)
    window_kind: str = "day"
    window_seconds: int | None = None
    rate_limit: bool = False
    timezone: str = "UTC"
    #: a model or pool limit that gives each user a counter of their own
    per_user: bool = False

    @property
    def remaining(self) -> int:
        return max(0, self.amount - self.used - self.reserved)


class QuotaExceeded(QuotaGateError):
    """A request does not fit a limit. Carries the refusing limit, what is left and the reset."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        resets = (
            f"resets at {refusal.resets_at.isoformat()}" if refusal.resets_at else "never resets"
        )
        super().__init__(
            f"Quota exceeded: {refusal.limit} ({refusal.metric} per {refusal.window}): "
            f"{refusal.used + refusal.reserved:,} of {refusal.amount:,} used, "
            f"{refusal.remaining:,} left, {refusal.requested:,} needed; {resets}"
        )

    @property
    def limit(self) -> str:
        return self.refusal.limit

    @property
    def remaining(self) -> int:
        return self.refusal.remaining

    @property
    def resets_at(self) -> datetime | None:
        return self.refusal.resets_at
