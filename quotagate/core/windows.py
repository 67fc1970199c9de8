"""When a limit resets: calendar windows in a timezone, rolling windows and lifetime totals.

A window maps an instant to the *bucket* a charge is written to and to the buckets whose
sum is the usage that counts now. A calendar window has one bucket per period; a rolling
window of length L is split into 60 buckets of L/60, and the bucket that straddles the
window's start is counted whole, which errs on the side of never overspending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from quotagate.core.errors import InvalidInput

CALENDAR_KINDS = ("minute", "hour", "day", "week", "month")
ROLLING_BUCKETS = 60
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ROLLING = re.compile(r"^rolling:(\d+)([smhdw])$")
#: nominal length of each calendar window (a month at its longest): what classifies it
_CALENDAR_SECONDS = {"minute": 60, "hour": 3600, "day": 86400, "week": 604800, "month": 2678400}
#: windows up to this long are rate limits (waiting is the answer: a client may retry
#: soon); longer ones, a day and up, are quotas. One hour, `hour` and `rolling:60m`
#: alike, is still a rate limit.
RATE_LIMIT_SECONDS = 3600


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The timezone called `name`, with a precise error when it does not exist."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"unknown timezone {name!r}") from exc


@dataclass(frozen=True)
class Window:
    """A reset rule. Build one with :func:`parse_window`; `spec` is its canonical text."""

    kind: str
    seconds: int = 0
    reset_hour: int = 0
    tz: str = "UTC"

    @property
    def spec(self) -> str:
        if self.kind == "rolling":
            return f"rolling:{_format_seconds(self.seconds)}"
        return self.kind

    @property
    def key(self) -> str:
        """Identifies the window in counter keys: a changed timezone starts new counters."""
        if self.kind in ("day", "week", "month"):
            return f"{self.kind}@{self.reset_hour}@{self.tz}"
        if self.kind in ("minute", "hour"):
            return f"{self.kind}@{self.tz}"
        return self.spec

    @property
    def length(self) -> int | None:
        """How long the window is, in seconds (None: lifetime). A month counts 31 days."""
        if self.kind == "rolling":
            return self.seconds
        return _CALENDAR_SECONDS.get(self.kind)

    @property
    def is_rate_limit(self) -> bool:
        """Whether running out of this window is a rate limit rather than a quota: decided
        by its length alone, however it is written (`rolling:60m` is `hour`)."""
        length = self.length
        return length is not None and length <= RATE_LIMIT_SECONDS

    @property
    def bucket_seconds(self) -> int:
        return max(1, self.seconds // ROLLING_BUCKETS)

    def describe(self) -> str:
        if self.kind == "rolling":
            return f"rolling {_format_seconds(self.seconds)}"
        if self.kind == "lifetime":
            return "lifetime"
        if self.kind in ("day", "week", "month") and self.reset_hour:
            return f"{self.kind} (resets {self.reset_hour:02d}:00 {self.tz})"
        return self.kind

    # -- buckets -----------------------------------------------------------------------
    def bucket(self, at: datetime) -> tuple[int, int | None]:
        """(start, end) in epoch seconds of the bucket a charge made at `at` belongs to."""
        if self.kind == "lifetime":
            return 0, None
        if self.kind == "rolling":
            size = self.bucket_seconds
            start = int(at.timestamp()) // size * size
            return start, start + size
        start_dt, end_dt = self.period(at)
        return int(start_dt.timestamp()), int(end_dt.timestamp())

    def counted_buckets(self, at: datetime) -> list[int]:
        """Start of every bucket whose charges count against the limit at `at`."""
        if self.kind != "rolling":
            return [self.bucket(at)[0]]
        size = self.bucket_seconds
        newest = int(at.timestamp()) // size * size
        oldest = (int(at.timestamp()) - self.seconds) // size * size
        return list(range(oldest, newest + 1, size))

    def slots(self, at: datetime) -> tuple[int, tuple[int, ...], int | None]:
        """(bucket a charge made at `at` goes to, the buckets that count at `at`, when that
        bucket expires): what a reservation needs, in one call that admit can afford."""
        if self.kind in CALENDAR_KINDS:
            cached = _current_periods.slots(self, at)
            if cached is not None:
                return cached
        bucket = self.bucket(at)[0]
        return bucket, tuple(self.counted_buckets(at)), self.expires_at(bucket)

    def expires_at(self, bucket_start: int) -> int | None:
        """Epoch second after which a bucket can no longer count against anything."""
        if self.kind == "lifetime":
            return None
        if self.kind == "rolling":
            return bucket_start + self.bucket_seconds + self.seconds
        end = self.period(datetime.fromtimestamp(bucket_start, UTC))[1]
        return int(end.timestamp())

    def resets_at(
        self,
        at: datetime,
        usage_by_bucket: dict[int, int] | None = None,
        *,
        amount: int | None = None,
        need: int = 0,
    ) -> datetime | None:
        """When capacity comes back: the period's end; for a rolling window, the moment
        its buckets' usage (used + reserved, by bucket start) has aged out enough.

        Without `amount` that is when the oldest bucket holding usage leaves (the first
        capacity that comes back, as a status shows). With it, the earliest moment at which
        what still counts plus `need` fits in `amount`: a request that needs several
        buckets to leave is told when it really fits. It is `at` if it fits already, and
        when the window is empty if it can never fit.
        """
        if self.kind == "lifetime":
            return None
        if self.kind != "rolling":
            return self.period(at)[1]
        held = sorted((b, v) for b, v in (usage_by_bucket or {}).items() if v > 0)
        if not held:
            return self._leaves(self.bucket(at)[0])
        if amount is None:
            return self._leaves(held[0][0])
        counted = sum(v for _, v in held)
        if counted + need <= amount:
            return at
        for bucket, value in held:
            counted -= value
            if counted + need <= amount:
                return self._leaves(bucket)
        return self._leaves(held[-1][0])  # it never fits: when the window is empty

    def _leaves(self, bucket_start: int) -> datetime:
        """When a rolling window's bucket stops counting (its :meth:`expires_at`)."""
        return datetime.fromtimestamp(bucket_start + self.bucket_seconds + self.seconds, UTC)

    # -- calendar arithmetic -------------------------------------------------------------
    def period(self, at: datetime) -> tuple[datetime, datetime]:
        """[start, end) of the calendar period containing `at`, as aware UTC datetimes.

        Boundaries are wall-clock times in the window's timezone, so a day is 23 or 25
        hours long across a daylight-saving change, as a person there would expect.
        """
        # Every admit asks for the current period of each limit: remember the last one
        # per window instead of redoing the timezone arithmetic (see _CurrentPeriods).
        cached = _current_periods.get(self, at)
        if cached is not None:
            return cached
        found = self._period(at)
        _current_periods.put(self, found)
        return found

    def _period(self, at: datetime) -> tuple[datetime, datetime]:
        tz = zone(self.tz)
        local = at.astimezone(tz)
        if self.kind in ("minute", "hour"):
            unit = 60 if self.kind == "minute" else 3600
            offset = int(local.utcoffset().total_seconds())  # type: ignore[union-attr]
            epoch = int(at.timestamp())
            start = (epoch + offset) // unit * unit - offset
            return datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + unit, UTC)
        wall = local.replace(tzinfo=None) - timedelta(hours=self.reset_hour)
        day = wall.date()
        if self.kind == "day":
            first, nxt = day, day + timedelta(days=1)
        elif self.kind == "week":
            first = day - timedelta(days=day.weekday())
            nxt = first + timedelta(days=7)
        elif self.kind == "month":
            first = day.replace(day=1)
            nxt = (first + timedelta(days=32)).replace(day=1)
        else:  # pragma: no cover - parse_window rejects other kinds
            raise InvalidInput(f"unknown window kind {self.kind!r}")
        return self._wall_to_utc(first), self._wall_to_utc(nxt)

    def _wall_to_utc(self, day: date) -> datetime:
        wall = datetime.combine(day, time(self.reset_hour), tzinfo=zone(self.tz))
        return wall.astimezone(UTC)


class _CurrentPeriods:
    """The last calendar period computed for each window, reused while the clock is in it.

    A period is only kept when the timezone's UTC offset is the same at its start and
    its end, so no daylight-saving change falls inside it: then every instant of the
    period maps to that same period and the cached answer is exactly what
    :meth:`Window._period` would compute. Periods that do contain a change are simply
    recomputed each time.
    """

    def __init__(self) -> None:
        self._by_window: dict[Window, _Period] = {}

    def get(self, window: Window, at: datetime) -> tuple[datetime, datetime] | None:
        entry = self._by_window.get(window)
        if entry is not None and entry.start <= at.timestamp() < entry.end:
            return entry.period
        return None

    def slots(self, window: Window, at: datetime) -> tuple[int, tuple[int, ...], int] | None:
        """:meth:`Window.slots` of a calendar window: its one bucket is the period."""
        entry = self._by_window.get(window)
        if entry is not None and entry.start <= at.timestamp() < entry.end:
            return entry.slots
        return None

    def put(self, window: Window, period: tuple[datetime, datetime]) -> None:
        start, end = period
        tz = zone(window.tz)
        if (
            start.astimezone(tz).utcoffset()
            == (end - timedelta(seconds=1)).astimezone(tz).utcoffset()
        ):
            first, last = int(start.timestamp()), int(end.timestamp())
            self._by_window[window] = _Period(
                start.timestamp(), end.timestamp(), period, (first, (first,), last)
            )


@dataclass(frozen=True)
class _Period:
    start: float
    end: float
    period: tuple[datetime, datetime]
    slots: tuple[int, tuple[int, ...], int]


_current_periods = _CurrentPeriods()


def _format_seconds(seconds: int) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def counter_expires_at(key: str) -> int | None:
    """When the bucket a counter key names stops counting against anything: the epoch
    second :meth:`Window.expires_at` gives for it. None for lifetime counters, and for a
    key that is not of the form ``…|<window key>|<bucket start>``.
    """
    parts = key.rsplit("|", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    window = _window_of_key(parts[1])
    return None if window is None else window.expires_at(int(parts[2]))


@lru_cache(maxsize=1024)
def _window_of_key(text: str) -> Window | None:
    """The window whose :attr:`Window.key` is `text`, or None if no window has that key."""
    kind, _, rest = text.partition("@")
    try:
        if kind in ("day", "week", "month"):
            hour, _, tz = rest.partition("@")
            window = parse_window(kind, tz, int(hour))
        elif kind in ("minute", "hour"):
            window = parse_window(kind, rest)
        else:
            window = parse_window(text)
    except (InvalidInput, ValueError):
        return None
    return window if window.key == text else None


def parse_window(spec: str, tz: str = "UTC", reset_hour: int = 0) -> Window:
    """Parse `minute|hour|day|week|month|lifetime|rolling:<n><s|m|h|d|w>`.

    >>> parse_window("rolling:24h").seconds
    86400
    """
    text = spec.strip().lower()
    zone(tz)
    if not 0 <= reset_hour <= 23:
        raise InvalidInput(f"reset hour must be 0..23, got {reset_hour}")
    if text in CALENDAR_KINDS:
        hour = reset_hour if text in ("day", "week", "month") else 0
        return Window(kind=text, reset_hour=hour, tz=tz)
    if text in ("lifetime", "total"):
        return Window(kind="lifetime")
    match = _ROLLING.match(text)
    if match:
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if not 60 <= seconds <= 366 * 86400:
            raise InvalidInput(f"rolling window must be between 1 minute and 366 days: {spec!r}")
        return Window(kind="rolling", seconds=seconds)
    raise InvalidInput(
        f"unknown window {spec!r}: use minute, hour, day, week, month, lifetime "
        "or rolling:<n><s|m|h|d|w> (e.g. rolling:24h)"
    )
