"""`quotagate usage --by day` adds the store's quarter-hour sums into calendar days of the
configured timezone: checked against each request's own local date, in timezones with
half-hour offsets and across a daylight-saving change, on every backend."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from quotagate.admin.reports import STORE_GROUPS, GroupBy, total, usage_rows
from quotagate.core.decisions import Hold
from quotagate.core.windows import zone
from quotagate.store.base import CounterStore, EventQuery, UsageEvent

# 2026-03-28 to 2026-04-01: Europe/Berlin moves its clocks forward on 2026-03-29
START = datetime(2026, 3, 27, 18, 0, tzinfo=UTC).timestamp()
SPAN = 5 * 86400


async def settle_many(store: CounterStore, count: int) -> list[float]:
    draw = random.Random(11)
    started = [START + draw.random() * SPAN for _ in range(count)]
    # requests right at a local midnight, and a second before it
    started += [datetime(2026, 3, 29, 22, 0, tzinfo=UTC).timestamp() - d for d in (0, 1)]
    started += [datetime(2026, 3, 28, 18, 30, tzinfo=UTC).timestamp() - d for d in (0, 1)]
    for n, moment in enumerate(started):
        ticket = f"t{n}"
        await store.reserve(
            ticket,
            [Hold("k", ("k",), None, 1, 0)],
            0,
            strict=True,
            min_output=0,
            expires_at=1e12,
            payload="{}",
        )
        await store.commit(
            ticket,
            UsageEvent(
                ticket_id=ticket,
                user_id="alice",
                model="m",
                started_at=moment,
                settled_at=moment + 1,
                prompt_tokens=3,
                completion_tokens=4,
                charges=[("k", 7)],
            ),
        )
    return started


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/St_Johns"])
async def test_days_are_local_calendar_days(store: CounterStore, tz: str) -> None:
    started = await settle_many(store, 400)
    local = zone(tz)
    want = Counter(
        datetime.fromtimestamp(s, UTC).astimezone(local).date().isoformat() for s in started
    )
    sums = await store.usage(EventQuery(), STORE_GROUPS[GroupBy.day])
    rows = usage_rows(sums, GroupBy.day, tz)
    assert [r.key for r in rows] == sorted(want)
    assert {r.key: r.requests for r in rows} == dict(want)
    assert all(r.total_tokens == 7 * r.requests for r in rows)
    assert total(rows).requests == len(started)
