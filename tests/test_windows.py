"""Window boundaries: calendar periods in a timezone (daylight-saving changes, reset hours,
midnight), rolling windows that age out bucket by bucket, and lifetime totals.

The first half checks the pure rules; the second drives the engine through time with its
`now=` parameters and checks what a user would see (refusals, resets_at, status)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from quotagate.core.errors import InvalidInput, QuotaExceeded
from quotagate.core.pricing import Usage
from quotagate.core.windows import parse_window
from quotagate.engine import AdmitContext, Engine

pytestmark = pytest.mark.timeout(60)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = timedelta(hours=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[arg-type, misc]


def length(period: tuple[datetime, datetime]) -> timedelta:
    return period[1] - period[0]


# -- calendar periods --------------------------------------------------------------------


def test_a_berlin_day_is_23_hours_when_clocks_go_forward() -> None:
    day = parse_window("day", "Europe/Berlin")
    period = day.period(datetime(2025, 3, 30, 12, 0, tzinfo=BERLIN))
    assert period == (utc(2025, 3, 29, 23), utc(2025, 3, 30, 22))
    assert length(period) == 23 * HOUR
    assert period[0].astimezone(BERLIN).hour == 0 and period[1].astimezone(BERLIN).hour == 0


def test_a_berlin_day_is_25_hours_when_clocks_go_back() -> None:
    day = parse_window("day", "Europe/Berlin")
    period = day.period(datetime(2025, 10, 26, 12, 0, tzinfo=BERLIN))
    assert period == (utc(2025, 10, 25, 22), utc(2025, 10, 26, 23))
    assert length(period) == 25 * HOUR


@pytest.mark.parametrize(
    ("tz", "inside", "start", "end", "hours"),
    [
        # Berlin springs forward at 02:00 on 30 March 2025: the day ending 04:00 CEST is short
        ("Europe/Berlin", utc(2025, 3, 30, 1, 30), utc(2025, 3, 29, 3), utc(2025, 3, 30, 2), 23),
        ("Europe/Berlin", utc(2025, 3, 30, 2, 0), utc(2025, 3, 30, 2), utc(2025, 3, 31, 2), 24),
        ("Europe/Berlin", utc(2025, 10, 26, 1, 0), utc(2025, 10, 25, 2), utc(2025, 10, 26, 3), 25),
        # New York: forward on 9 March, back on 2 November 2025
        ("America/New_York", utc(2025, 3, 9, 7, 59), utc(2025, 3, 8, 9), utc(2025, 3, 9, 8), 23),
        ("America/New_York", utc(2025, 3, 9, 8, 0), utc(2025, 3, 9, 8), utc(2025, 3, 10, 8), 24),
        ("America/New_York", utc(2025, 11, 2, 5, 30), utc(2025, 11, 1, 8), utc(2025, 11, 2, 9), 25),
        ("America/New_York", utc(2025, 11, 2, 6, 30), utc(2025, 11, 1, 8), utc(2025, 11, 2, 9), 25),
    ],
)
def test_days_with_reset_hour_4_across_daylight_saving(
    tz: str, inside: datetime, start: datetime, end: datetime, hours: int
) -> None:
    day = parse_window("day", tz, reset_hour=4)
    period = day.period(inside)
    assert period == (start, end)
    assert length(period) == hours * HOUR
    assert {p.astimezone(ZoneInfo(tz)).hour for p in period} == {4}
    assert day.bucket(inside) == (int(start.timestamp()), int(end.timestamp()))
    assert day.resets_at(inside) == end
    assert day.expires_at(int(start.timestamp())) == int(end.timestamp())


def test_reset_hour_moves_the_boundary_across_midnight() -> None:
    day = parse_window("day", "UTC", reset_hour=4)
    assert day.period(utc(2025, 6, 2, 3, 59, 59)) == (utc(2025, 6, 1, 4), utc(2025, 6, 2, 4))
    assert day.period(utc(2025, 6, 2, 4)) == (utc(2025, 6, 2, 4), utc(2025, 6, 3, 4))
    assert day.describe() == "day (resets 04:00 UTC)"


def test_midnight_is_local_midnight() -> None:
    utc_day = parse_window("day")
    assert utc_day.bucket(utc(2025, 6, 2, 23, 59, 59)) != utc_day.bucket(utc(2025, 6, 3))
    assert utc_day.resets_at(utc(2025, 6, 2, 23, 59, 59)) == utc(2025, 6, 3)
    berlin_day = parse_window("day", "Europe/Berlin")
    # 23:30 UTC on 2 June is already 3 June in Berlin (CEST, UTC+2)
    assert berlin_day.period(utc(2025, 6, 2, 23, 30))[0] == utc(2025, 6, 2, 22)
    assert berlin_day.period(utc(2025, 6, 2, 21, 59, 59))[1] == utc(2025, 6, 2, 22)


def test_hours_follow_the_utc_offset_across_daylight_saving() -> None:
    hour = parse_window("hour", "Europe/Berlin")
    # 01:30 CET, then (an hour later by the clock on the wall: 03:00) 03:00 CEST
    assert hour.period(utc(2025, 3, 30, 0, 30)) == (utc(2025, 3, 30, 0), utc(2025, 3, 30, 1))
    assert hour.period(utc(2025, 3, 30, 1, 0)) == (utc(2025, 3, 30, 1), utc(2025, 3, 30, 2))
    # New York's repeated 01:00-02:00 on 2 November is two separate hours
    ny = parse_window("hour", "America/New_York")
    first = ny.period(datetime(2025, 11, 2, 1, 30, tzinfo=NEW_YORK, fold=0))
    second = ny.period(datetime(2025, 11, 2, 1, 30, tzinfo=NEW_YORK, fold=1))
    assert first == (utc(2025, 11, 2, 5), utc(2025, 11, 2, 6))
    assert second == (utc(2025, 11, 2, 6), utc(2025, 11, 2, 7))


def test_hours_in_a_half_hour_timezone_start_at_half_past_utc() -> None:
    hour = parse_window("hour", "Asia/Kolkata")
    assert hour.period(utc(2025, 6, 2, 10, 15)) == (utc(2025, 6, 2, 9, 30), utc(2025, 6, 2, 10, 30))


def test_minutes() -> None:
    minute = parse_window("minute", "America/New_York")
    assert minute.period(utc(2025, 11, 2, 6, 0, 59)) == (
        utc(2025, 11, 2, 6),
        utc(2025, 11, 2, 6, 1),
    )
    assert minute.resets_at(utc(2025, 6, 2, 10, 0, 0)) == utc(2025, 6, 2, 10, 1)


def test_weeks_start_on_monday_in_the_timezone() -> None:
    week = parse_window("week", "Europe/Berlin")
    # Sunday 30 March 2025: the week began Monday 24 March 00:00 CET, ends 31 March 00:00 CEST
    period = week.period(datetime(2025, 3, 30, 12, tzinfo=BERLIN))
    assert period == (utc(2025, 3, 23, 23), utc(2025, 3, 30, 22))
    assert length(period) == 7 * 24 * HOUR - HOUR
    with_reset = parse_window("week", "Europe/Berlin", reset_hour=4)
    # Monday 03:00 local still belongs to the previous week
    assert with_reset.period(datetime(2025, 3, 31, 3, tzinfo=BERLIN))[1] == datetime(
        2025, 3, 31, 4, tzinfo=BERLIN
    )


def test_months_in_the_timezone() -> None:
    month = parse_window("month", "Europe/Berlin")
    period = month.period(datetime(2025, 3, 15, tzinfo=BERLIN))
    assert period == (utc(2025, 2, 28, 23), utc(2025, 3, 31, 22))
    assert length(period) == 31 * 24 * HOUR - HOUR
    december = parse_window("month", "America/New_York", reset_hour=4)
    assert december.period(datetime(2025, 12, 31, 23, tzinfo=NEW_YORK)) == (
        datetime(2025, 12, 1, 4, tzinfo=NEW_YORK),
        datetime(2026, 1, 1, 4, tzinfo=NEW_YORK),
    )
    # 1 January 03:00 is still December's period with a 04:00 reset
    assert december.period(datetime(2026, 1, 1, 3, tzinfo=NEW_YORK))[0] == datetime(
        2025, 12, 1, 4, tzinfo=NEW_YORK
    )


# -- rolling and lifetime ----------------------------------------------------------------


def test_rolling_windows_have_sixty_buckets() -> None:
    last_day = parse_window("rolling:24h")
    assert (last_day.seconds, last_day.bucket_seconds, last_day.spec) == (
        86_400,
        1_440,
        "rolling:1d",
    )
    last_hour = parse_window("rolling:60m")
    assert (last_hour.seconds, last_hour.bucket_seconds, last_hour.spec) == (
        3_600,
        60,
        "rolling:1h",
    )
    at = utc(2025, 6, 2, 10, 0, 30)
    buckets = last_hour.counted_buckets(at)
    assert len(buckets) == 61  # the bucket straddling the window's start counts whole
    assert buckets[-1] == last_hour.bucket(at)[0] == int(utc(2025, 6, 2, 10).timestamp())
    assert buckets[0] == int(utc(2025, 6, 2, 9).timestamp())


def test_rolling_resets_when_the_oldest_used_bucket_leaves() -> None:
    window = parse_window("rolling:60m")
    charged = utc(2025, 6, 2, 10, 0, 30)
    bucket = window.bucket(charged)[0]
    leaves = window.resets_at(charged, {bucket: 10})
    assert leaves == utc(2025, 6, 2, 11, 1)
    assert bucket in window.counted_buckets(leaves - timedelta(seconds=1))
    assert bucket not in window.counted_buckets(leaves)
    assert window.expires_at(bucket) == int(leaves.timestamp())
    # with nothing used, the answer is when the current bucket would leave
    assert window.resets_at(charged) == leaves


@pytest.mark.parametrize(
    ("spec", "length", "rate_limit"),
    [
        ("minute", 60, True),
        ("rolling:59m", 3_540, True),
        ("rolling:60m", 3_600, True),
        ("rolling:1h", 3_600, True),
        ("hour", 3_600, True),
        ("rolling:61m", 3_660, False),
        ("rolling:24h", 86_400, False),
        ("day", 86_400, False),
        ("week", 604_800, False),
        ("month", 2_678_400, False),
        ("lifetime", None, False),
    ],
)
def test_a_window_up_to_an_hour_long_is_a_rate_limit(
    spec: str, length: int | None, rate_limit: bool
) -> None:
    """By length, however the window is written: `rolling:60m` is `hour`, not a quota."""
    window = parse_window(spec, "Europe/Berlin")
    assert window.length == length
    assert window.is_rate_limit is rate_limit


def test_a_rolling_reset_is_when_the_request_really_fits() -> None:
    """Ten buckets of 100 in a 1,000 window: a request that needs 250 fits only once three
    buckets have left, not when the first one does."""
    window = parse_window("rolling:60m")
    t0 = utc(2025, 6, 2, 10, 0, 0)
    usage = {int((t0 + timedelta(minutes=m)).timestamp()): 100 for m in range(10)}
    at = t0 + timedelta(minutes=59)
    assert window.resets_at(at, usage) == utc(2025, 6, 2, 11, 1)  # first room, as status says
    told = window.resets_at(at, usage, amount=1_000, need=250)
    assert told == utc(2025, 6, 2, 11, 3)  # the 10:02 bucket leaves

    def fits(moment: datetime) -> bool:
        counted = set(window.counted_buckets(moment))
        return sum(v for b, v in usage.items() if b in counted) + 250 <= 1_000

    assert fits(told) and not fits(told - timedelta(seconds=1))
    # what reservations hold counts the same as what was used
    assert window.resets_at(at, usage, amount=1_000, need=1) == utc(2025, 6, 2, 11, 1)
    assert window.resets_at(at, usage, amount=1_000, need=901) == utc(2025, 6, 2, 11, 10)
    # it fits already (room freed since the refusal): now; it can never fit: when empty
    assert window.resets_at(at, usage, amount=2_000, need=1) == at
    assert window.resets_at(at, usage, amount=1_000, need=1_001) == utc(2025, 6, 2, 11, 10)
    # empty buckets are ignored; calendar windows reset at the period's end whatever is used
    assert window.resets_at(at, {**usage, 0: 0}, amount=1_000, need=250) == told
    day = parse_window("day", "Europe/Berlin")
    assert day.resets_at(at, amount=1, need=5) == datetime(2025, 6, 3, tzinfo=BERLIN)


async def test_a_rolling_refusal_tells_when_the_request_fits(engine: Engine) -> None:
    """A 250-token request against ten used buckets: the refusal's reset is when three have
    left; a second earlier it is still refused, then it is admitted."""
    engine.catalog.set_limit("role", "user", "tokens", "rolling:60m", 1_000)
    t0 = utc(2025, 6, 2, 10, 0, 0)
    for minute in range(10):
        await spend(engine, 100, t0 + timedelta(minutes=minute, seconds=30))
    with pytest.raises(QuotaExceeded) as caught:
        await engine.admit(ask(249, 500), now=t0 + timedelta(minutes=59))
    refusal = caught.value.refusal
    assert refusal.requested == 250  # the prompt and min_output_tokens, not 249 + 500
    assert refusal.resets_at == utc(2025, 6, 2, 11, 3)
    with pytest.raises(QuotaExceeded) as again:
        await engine.admit(ask(249, 500), now=utc(2025, 6, 2, 11, 2, 59))
    assert again.value.resets_at == utc(2025, 6, 2, 11, 3)
    ticket = await engine.admit(ask(249, 500), now=utc(2025, 6, 2, 11, 3))
    assert ticket.max_tokens == 300 - 249


def test_lifetime_never_resets() -> None:
    lifetime = parse_window("lifetime")
    assert lifetime.bucket(utc(2025, 6, 2)) == (0, None)
    assert lifetime.counted_buckets(utc(2099, 1, 1)) == [0]
    assert lifetime.resets_at(utc(2025, 6, 2)) is None
    assert lifetime.expires_at(0) is None
    assert parse_window("total") == lifetime


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [
        ("fortnight", {}),
        ("rolling:30s", {}),
        ("rolling:400d", {}),
        ("rolling:24x", {}),
        ("rolling:h", {}),
        ("", {}),
        ("day", {"reset_hour": 24}),
        ("day", {"reset_hour": -1}),
        ("day", {"tz": "Europe/Atlantis"}),
    ],
)
def test_bad_windows_are_refused(spec: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        parse_window(spec, **kwargs)


def test_window_keys_change_with_timezone_and_reset_hour() -> None:
    keys = {
        parse_window("day").key,
        parse_window("day", "Europe/Berlin").key,
        parse_window("day", "Europe/Berlin", reset_hour=4).key,
        parse_window("hour", "Europe/Berlin").key,
    }
    assert len(keys) == 4
    assert parse_window("rolling:1440m").key == parse_window("rolling:24h").key


# -- the engine driven through time ------------------------------------------------------


def ask(prompt: int = 0, output: int = 1, **fields: Any) -> AdmitContext:
    return AdmitContext(user="alice", model="m", prompt_tokens=prompt, max_tokens=output, **fields)


async def spend(engine: Engine, tokens: int, at: datetime) -> None:
    ticket = await engine.admit(ask(tokens, 0), now=at)
    await engine.settle(ticket, Usage(tokens, 0), now=at)


async def left(engine: Engine, at: datetime, label_window: str) -> int | None:
    for status in await engine.status("alice", now=at):
        if status.window.spec == label_window:
            return status.remaining
    raise AssertionError(f"no {label_window} limit in status")


async def test_a_day_across_the_autumn_change_in_new_york_lasts_25_hours(
    make_engine: Any,
) -> None:
    engine = make_engine(timezone="America/New_York")
    engine.catalog.set_limit("role", "user", "tokens", "day", 1_000, reset_hour=4)
    start = datetime(2025, 11, 1, 4, 0, tzinfo=NEW_YORK).astimezone(UTC)
    await spend(engine, 1_000, start)
    end = start + 25 * HOUR  # in UTC: Python adds wall-clock time within one zone
    assert end == datetime(2025, 11, 2, 4, 0, tzinfo=NEW_YORK)  # 4 o'clock again, 25h later
    with pytest.raises(QuotaExceeded) as caught:
        await engine.admit(ask(1), now=end - timedelta(seconds=1))
    assert caught.value.resets_at == end
    await spend(engine, 1_000, end)
    assert await left(engine, end, "day") == 0


async def test_a_berlin_week_and_month_reset_at_local_time(make_engine: Any) -> None:
    engine = make_engine(timezone="Europe/Berlin")
    engine.catalog.set_limit("role", "user", "tokens", "week", 1_000)
    engine.catalog.set_limit("role", "user", "requests", "month", 100)
    sunday = datetime(2025, 3, 30, 23, 59, tzinfo=BERLIN)
    await spend(engine, 1_000, sunday)
    statuses = {s.window.spec: s for s in await engine.status("alice", now=sunday)}
    assert statuses["week"].resets_at == datetime(2025, 3, 31, 0, 0, tzinfo=BERLIN)
    assert statuses["month"].resets_at == datetime(2025, 4, 1, 0, 0, tzinfo=BERLIN)
    await spend(engine, 1_000, datetime(2025, 3, 31, 0, 0, tzinfo=BERLIN))
    assert await left(engine, datetime(2025, 3, 31, 12, tzinfo=BERLIN), "month") == 98
    assert await left(engine, datetime(2025, 4, 1, tzinfo=BERLIN), "month") == 100


async def test_usage_just_before_midnight_does_not_count_after_it(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 500)
    await spend(engine, 500, utc(2025, 6, 2, 23, 59, 59))
    with pytest.raises(QuotaExceeded):
        await engine.admit(ask(1), now=utc(2025, 6, 2, 23, 59, 59))
    await spend(engine, 500, utc(2025, 6, 3, 0, 0, 0))
    assert await left(engine, utc(2025, 6, 3, 0, 0, 1), "day") == 0
    assert await left(engine, utc(2025, 6, 4), "day") == 500


async def test_rolling_60_minutes_ages_out_bucket_by_bucket(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "rolling:60m", 1_000)
    t0 = utc(2025, 6, 2, 10, 0, 0)
    for minute in range(10):
        await spend(engine, 100, t0 + timedelta(minutes=minute, seconds=30))
    at = t0 + timedelta(minutes=59)
    with pytest.raises(QuotaExceeded) as caught:
        await engine.admit(ask(1), now=at)
    # the 10:00 bucket counts until 11:01, when it leaves the window
    assert caught.value.resets_at == utc(2025, 6, 2, 11, 1)
    assert caught.value.refusal.window == "rolling 1h"
    assert caught.value.refusal.rate_limit and caught.value.refusal.window_seconds == 3_600

    assert await left(engine, utc(2025, 6, 2, 11, 0, 59), "rolling:1h") == 0
    for gone in range(1, 11):
        at = t0 + timedelta(hours=1, minutes=gone)
        assert await left(engine, at, "rolling:1h") == 100 * gone
        [status] = await engine.status("alice", now=at)
        if gone < 10:
            assert status.resets_at == t0 + timedelta(hours=1, minutes=gone + 1)
    # what came back can be spent, and is counted again for the next hour
    await spend(engine, 100, t0 + timedelta(hours=1, minutes=1))
    assert await left(engine, t0 + timedelta(hours=1, minutes=1), "rolling:1h") == 0
    assert (await engine.admit(ask(0, 50), now=t0 + timedelta(hours=1, minutes=2))).max_tokens == 50


async def test_rolling_24_hours(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "rolling:24h", 1_000)
    t0 = utc(2025, 6, 2, 10, 0, 0)  # on a 24-minute bucket boundary
    await spend(engine, 600, t0)
    await spend(engine, 400, t0 + 6 * HOUR)
    with pytest.raises(QuotaExceeded) as caught:
        await engine.admit(ask(1), now=t0 + 23 * HOUR)
    leaves = t0 + 24 * HOUR + timedelta(minutes=24)
    assert caught.value.resets_at == leaves
    # across midnight nothing resets: a rolling window has no calendar
    with pytest.raises(QuotaExceeded):
        await engine.admit(ask(1), now=leaves - timedelta(seconds=1))
    assert (await engine.admit(ask(0, 10_000), now=leaves)).max_tokens == 600
    [status] = await engine.status("alice", now=leaves)
    assert status.resets_at == t0 + 30 * HOUR + timedelta(minutes=24)


async def test_lifetime_totals_never_come_back(engine: Engine) -> None:
    engine.catalog.set_limit("user", "alice", "tokens", "lifetime", 500)
    await spend(engine, 500, utc(2025, 6, 2))
    with pytest.raises(QuotaExceeded) as caught:
        await engine.admit(ask(1), now=utc(2035, 1, 1))
    assert caught.value.resets_at is None
    assert "never resets" in str(caught.value)
    [status] = await engine.status("alice", now=utc(2099, 1, 1))
    assert (status.used, status.remaining, status.resets_at) == (500, 0, None)
