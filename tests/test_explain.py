"""A refusal in words: the limit named by what it is to the person, the numbers, what the
request needs at the least, and the reset in the limit's timezone."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from quotagate.core.errors import Refusal
from quotagate.core.explain import explain, human_duration, limit_name, local_moment

NOW = datetime(2025, 11, 24, 20, 48, 0, tzinfo=UTC)  # 21:48 in Berlin
MIDNIGHT_BERLIN = datetime(2025, 11, 24, 23, 0, tzinfo=UTC)


def refusal(**fields: object) -> Refusal:
    base = Refusal(
        limit="user 73d4c8e2-9b1f-4c55-8f0e-2d6a1c9e7b10 override allowance",
        metric="tokens",
        window="day",
        amount=50_000,
        used=50_000,
        reserved=0,
        requested=14,
        resets_at=MIDNIGHT_BERLIN,
        scope="allowance",
        window_kind="day",
        window_seconds=86_400,
        timezone="Europe/Berlin",
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_a_used_up_daily_allowance() -> None:
    assert explain(refusal(), NOW) == (
        "Your daily token allowance is used up: 50,000 of 50,000 tokens used, 0 left. "
        "It resets at 00:00 Europe/Berlin (in 2 h 12 min)."
    )


def test_a_request_that_does_not_fit_says_what_it_needs_at_the_least() -> None:
    text = explain(refusal(used=49_990, reserved=5), NOW)
    assert text == (
        "This request does not fit in your daily token allowance: 49,995 of 50,000 tokens "
        "used (5 held by requests in progress), 5 left; this request needs at least 14. "
        "It resets at 00:00 Europe/Berlin (in 2 h 12 min)."
    )
    too_big = explain(refusal(used=0, requested=60_000), NOW)
    assert "this request alone needs at least 60,000, more than the whole limit." in too_big


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({}, "your daily token allowance"),
        (
            {"scope": "key", "metric": "requests", "window_kind": "minute"},
            "your API key's per-minute request limit",
        ),
        (
            {"scope": "model", "target": "gpt-4o", "per_user": True},
            "your daily token limit for model gpt-4o",
        ),
        (
            {"scope": "model", "target": "gpt-4o", "metric": "output_tokens"},
            "the daily output token cap of model gpt-4o, shared by everyone",
        ),
        (
            {"scope": "pool", "target": "research", "window_kind": "month"},
            "the monthly token budget of pool research, shared by its members",
        ),
        (
            {"scope": "pool", "target": "research", "per_user": True, "window_kind": "week"},
            "your weekly token share of pool research",
        ),
        (
            {"scope": "channel", "target": "azure", "window_kind": "hour"},
            "the hourly token capacity of upstream channel azure",
        ),
        (
            {"window_kind": "rolling", "window_seconds": 5 * 3600, "metric": "credits"},
            "your 5-hour rolling credit allowance",
        ),
        (
            {"window_kind": "rolling", "window_seconds": 90 * 60},
            "your 90-minute rolling token allowance",
        ),
        ({"scope": "wallet", "metric": "credits", "window_kind": "lifetime"}, "your credit wallet"),
    ],
)
def test_limits_are_named_in_words(fields: dict[str, object], name: str) -> None:
    assert limit_name(refusal(**fields)) == name


def test_credits_are_shown_in_credits_and_a_wallet_does_not_reset() -> None:
    wallet = refusal(
        scope="wallet",
        metric="credits",
        window="lifetime",
        window_kind="lifetime",
        window_seconds=None,
        amount=5_000_000_000,
        used=4_999_500_000,
        requested=2_000_000,
        resets_at=None,
    )
    assert explain(wallet, NOW) == (
        "This request does not fit in your credit wallet: 4,999.50 of 5,000 credits used, "
        "0.50 left; this request needs at least 2. It does not reset."
    )


def test_a_rolling_window_says_when_the_request_fits_again() -> None:
    fits = datetime(2025, 11, 24, 21, 50, 30, tzinfo=UTC)
    text = explain(
        refusal(window_kind="rolling", window_seconds=3600, resets_at=fits, used=900, amount=1000),
        NOW,
    )
    assert text.endswith(
        "It has room for this request again at 22:50:30 Europe/Berlin (in 1 h 3 min)."
    )


def test_moments_are_local_and_dated_when_more_than_a_day_away() -> None:
    assert local_moment(MIDNIGHT_BERLIN, "Europe/Berlin", NOW) == "00:00 Europe/Berlin"
    assert local_moment(MIDNIGHT_BERLIN, "UTC", NOW) == "23:00 UTC"
    later = MIDNIGHT_BERLIN + timedelta(days=6, seconds=5)
    assert local_moment(later, "Europe/Berlin", NOW) == "Mon 01 Dec 00:00:05 Europe/Berlin"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 s"),
        (59, "59 s"),
        (60, "1 min"),
        (725, "12 min 5 s"),
        (3600, "1 h"),
        (3601, "1 h 1 min"),
        (11_520, "3 h 12 min"),
        (2 * 86400 + 4 * 3600, "2 d 4 h"),
        (-5, "0 s"),
    ],
)
def test_waits_are_rounded_up(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text
