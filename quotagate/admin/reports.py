"""Usage reports from the ledger and a user's limits as rows: the data behind
`quotagate usage` and `quotagate status`, kept apart from how it is printed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from quotagate.admin.common import credits_number, iso_time, local_time, value_number
from quotagate.core.limits import format_amount
from quotagate.core.windows import zone
from quotagate.engine import LimitStatus
from quotagate.store.base import UsageEvent


class GroupBy(StrEnum):
    user = "user"
    model = "model"
    day = "day"


USAGE_FIELDS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "credits",
    "estimated",
)


@dataclass
class UsageRow:
    """Sums over the ledger rows of one user, model or day. `credits` in micro-credits."""

    key: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    credits: int = 0
    estimated: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, event: UsageEvent) -> None:
        self.requests += 1
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        self.cached_tokens += event.cached_tokens
        self.credits += event.credits
        self.estimated += int(event.estimated)

    def record(self, by: str) -> dict[str, Any]:
        """The row for JSON: credits as a number of credits."""
        return {
            by: self.key,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "total_tokens": self.total_tokens,
            "credits": credits_number(self.credits),
            "estimated": self.estimated,
        }


def aggregate(events: Iterable[UsageEvent], by: GroupBy, tz: str = "UTC") -> list[UsageRow]:
    """One row per user, model or calendar day (in `tz`, by when the request started)."""
    local = zone(tz)
    rows: dict[str, UsageRow] = {}
    for event in events:
        if by is GroupBy.user:
            key = event.user_id
        elif by is GroupBy.model:
            key = event.model
        else:
            key = datetime.fromtimestamp(event.started_at, UTC).astimezone(local).date().isoformat()
        row = rows.get(key)
        if row is None:
            row = rows[key] = UsageRow(key)
        row.add(event)
    return [rows[key] for key in sorted(rows)]


def total(rows: Sequence[UsageRow]) -> UsageRow:
    result = UsageRow("total")
    for row in rows:
        result.requests += row.requests
        result.prompt_tokens += row.prompt_tokens
        result.completion_tokens += row.completion_tokens
        result.cached_tokens += row.cached_tokens
        result.credits += row.credits
        result.estimated += row.estimated
    return result


# -- status ------------------------------------------------------------------------------


def status_record(status: LimitStatus, tz: str) -> dict[str, Any]:
    """One binding limit for JSON: amounts in tokens, requests or credits."""
    return {
        "limit": status.label,
        "metric": status.metric.value,
        "window": status.window.spec,
        "window_description": status.window.describe(),
        "amount": value_number(status.metric, status.amount),
        "used": value_number(status.metric, status.used),
        "reserved": value_number(status.metric, status.reserved),
        "left": value_number(status.metric, status.remaining),
        "resets_at": iso_time(status.resets_at, tz),
    }


def status_cells(status: LimitStatus, tz: str) -> list[str]:
    """One binding limit for a table: formatted amounts and the local reset time."""
    metric = status.metric
    return [
        status.label,
        metric.value,
        status.window.describe(),
        format_amount(metric, status.amount),
        format_amount(metric, status.used),
        format_amount(metric, status.reserved),
        format_amount(metric, status.remaining),
        local_time(status.resets_at, tz),
    ]


STATUS_COLUMNS = (
    "limit",
    "metric",
    "window",
    ">amount",
    ">used",
    ">reserved",
    ">left",
    "resets at",
)
