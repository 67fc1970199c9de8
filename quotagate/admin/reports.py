"""Usage reports from the ledger and a user's limits as rows: the data behind
`quotagate usage` and `quotagate status`, kept apart from how it is printed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from quotagate.admin.common import credits_number, iso_time, local_time, value_number
from quotagate.core.limits import format_amount
from quotagate.core.windows import zone
from quotagate.engine import LimitStatus
from quotagate.store.base import SLOT_SECONDS, UsageSum


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
    "excess",
)


#: what the store groups by for each report: days are summed from quarter-hour slots
STORE_GROUPS = {GroupBy.user: "user", GroupBy.model: "model", GroupBy.day: "slot"}


def usage_rows(sums: Iterable[UsageSum], by: GroupBy, tz: str = "UTC") -> list[UsageSum]:
    """One row per user, model or calendar day (in `tz`, by when the request started),
    sorted, from the store's sums grouped by ``STORE_GROUPS[by]``."""
    if by is not GroupBy.day:
        return sorted(sums, key=lambda row: str(row.key))
    local = zone(tz)
    days: dict[str, UsageSum] = {}
    for part in sums:
        start = datetime.fromtimestamp(int(part.key) * SLOT_SECONDS, UTC)
        day = start.astimezone(local).date().isoformat()
        found = days.get(day)
        if found is None:
            found = days[day] = UsageSum(day)
        found.add(part)
    return [days[day] for day in sorted(days)]


def usage_record(row: UsageSum, by: GroupBy) -> dict[str, Any]:
    """One row for JSON: credits as a number of credits."""
    return {
        by.value: row.key,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens,
        "total_tokens": row.total_tokens,
        "credits": credits_number(row.credits),
        "estimated": row.estimated,
        "excess": row.excess,
    }


def total(rows: Sequence[UsageSum]) -> UsageSum:
    result = UsageSum("total")
    for row in rows:
        result.add(row)
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
