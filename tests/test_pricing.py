"""Prices in credits: what a request costs, rounding that never undercharges a reservation,
and the openwebui-token-tracking price-list format."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from quotagate.core.errors import InvalidInput
from quotagate.core.limits import ABSURD, MICRO
from quotagate.core.policy import Policy
from quotagate.core.pricing import Price, Usage, price_from_record, price_to_record

GPT4O = Price(
    model="gpt-4o",
    provider="openai",
    name="GPT-4o",
    input_credits=Decimal("2.5"),
    per_input_tokens=1_000,
    output_credits=Decimal(10),
    per_output_tokens=1_000,
    cached_credits=Decimal("1.25"),
    per_cached_tokens=1_000,
)


def test_cost_in_micro_credits() -> None:
    # 2.5 credits per 1,000 input tokens = 2,500 micro-credits per token
    assert GPT4O.cost(Usage(1_000, 0)) == 2_500_000
    assert GPT4O.cost(Usage(0, 1_000)) == 10_000_000
    assert GPT4O.cost(Usage(1_000, 500, cached_tokens=400)) == (
        600 * 2_500 + 400 * 1_250 + 500 * 10_000
    )


def test_cached_tokens_never_exceed_the_prompt() -> None:
    assert GPT4O.cost(Usage(100, 0, cached_tokens=1_000)) == 100 * 1_250


def test_without_a_cached_price_cached_tokens_cost_the_input_price() -> None:
    plain = Price("m", Decimal(1), 1_000_000, Decimal(2), 1_000_000)
    assert plain.cost(Usage(1_000_000, 0, cached_tokens=500_000)) == 1 * MICRO


def test_a_multiplier_scales_every_part() -> None:
    assert GPT4O.cost(Usage(1_000, 1_000, 0), Decimal("0.5")) == (2_500_000 + 10_000_000) // 2
    assert GPT4O.input_cost(1_000, Decimal(2)) == 5_000_000
    assert GPT4O.output_rate(Decimal(2)) == 20_000


def test_fractions_are_rounded_up_never_free() -> None:
    cheap = Price("m", Decimal("0.15"), 1_000_000, Decimal("0.6"), 1_000_000)
    # 0.15 micro-credits per token: one token still costs one micro-credit
    assert cheap.cost(Usage(1, 0)) == 1
    assert cheap.input_cost(1) == 1
    assert cheap.output_rate() == 1
    assert cheap.cost(Usage(1_000_000, 1_000_000)) == 750_000


@given(
    prompt=st.integers(0, 10**7),
    completion=st.integers(0, 10**6),
    input_credits=st.decimals(0, 1_000, places=4),
    output_credits=st.decimals(0, 1_000, places=4),
    per=st.sampled_from([1, 1_000, 1_000_000]),
    multiplier=st.decimals(0, 5, places=2),
)
@settings(max_examples=200, deadline=None, database=None)
def test_a_reservation_always_covers_the_charge(
    prompt: int,
    completion: int,
    input_credits: Decimal,
    output_credits: Decimal,
    per: int,
    multiplier: Decimal,
) -> None:
    price = Price("m", input_credits, per, output_credits, per)
    reserved = price.input_cost(prompt, multiplier) + price.output_rate(multiplier) * completion
    assume(reserved <= ABSURD)  # a bigger reservation is refused before anything is charged
    assert price.cost(Usage(prompt, completion), multiplier) <= reserved


def test_invalid_prices_are_refused() -> None:
    for bad in (Decimal(-1), Decimal("NaN"), Decimal("Infinity"), "cheap", None, True):
        with pytest.raises(InvalidInput):
            Price("m", bad, 1_000_000, Decimal(1), 1_000_000)  # type: ignore[arg-type]
    for per in (0, -1, 1.5, True):
        with pytest.raises(InvalidInput):
            Price("m", Decimal(1), per, Decimal(1), 1_000_000)  # type: ignore[arg-type]


# -- the openwebui-token-tracking format -------------------------------------------------

RECORD = {
    "provider": "openai",
    "id": "gpt-4o",
    "name": "GPT-4o",
    "input_cost_credits": 2.5,
    "per_input_tokens": 1000,
    "output_cost_credits": 10,
    "per_output_tokens": 1000,
}


def test_a_price_list_entry_round_trips() -> None:
    when = datetime(2025, 1, 1, tzinfo=UTC)
    price = price_from_record(RECORD, when)
    assert price.input_credits == Decimal("2.5") and price.per_input_tokens == 1_000
    assert price.effective_from == when
    assert price_to_record(price) == RECORD
    assert json.loads(json.dumps(price_to_record(price))) == RECORD
    cached = price_from_record({**RECORD, "cached_cost_credits": "1.25", "per_cached_tokens": 1000})
    assert price_to_record(cached)["cached_cost_credits"] == 1.25
    assert price_from_record({**RECORD, "per_input_tokens": "1000000"}).per_input_tokens == 10**6


MALFORMED: dict[str, Any] = {
    "not an object": ["gpt-4o", 1, 2],
    "no id": {k: v for k, v in RECORD.items() if k != "id"},
    "no input price": {k: v for k, v in RECORD.items() if k != "input_cost_credits"},
    "no output price": {k: v for k, v in RECORD.items() if k != "output_cost_credits"},
    "text price": {**RECORD, "input_cost_credits": "cheap"},
    "negative price": {**RECORD, "output_cost_credits": -1},
    "infinite price": {**RECORD, "output_cost_credits": "inf"},
    "nan price": {**RECORD, "input_cost_credits": float("nan")},
    "bool price": {**RECORD, "input_cost_credits": True},
    "null price": {**RECORD, "input_cost_credits": None},
    "list price": {**RECORD, "input_cost_credits": [1]},
    "zero per tokens": {**RECORD, "per_input_tokens": 0},
    "negative per tokens": {**RECORD, "per_output_tokens": -1000},
    "fractional per tokens": {**RECORD, "per_output_tokens": 1.5},
    "text per tokens": {**RECORD, "per_input_tokens": "many"},
    "bad cached price": {**RECORD, "cached_cost_credits": "x"},
}


@pytest.mark.parametrize("record", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_entries_are_refused(record: Any) -> None:
    with pytest.raises(InvalidInput):
        price_from_record(record)


# -- prices over time --------------------------------------------------------------------


def test_the_price_in_effect_at_an_instant() -> None:
    old = price_from_record(RECORD, datetime(2025, 1, 1, tzinfo=UTC))
    new = price_from_record({**RECORD, "output_cost_credits": 20}, datetime(2025, 6, 1, tzinfo=UTC))
    policy = Policy(prices=[new, old])
    assert policy.price("gpt-4o", datetime(2024, 12, 31, tzinfo=UTC)) is None
    assert policy.price("gpt-4o", datetime(2025, 5, 31, 23, 59, tzinfo=UTC)) == old
    assert policy.price("gpt-4o", datetime(2025, 6, 1, tzinfo=UTC)) == new
    assert policy.price("openai/gpt-4o", datetime(2025, 7, 1, tzinfo=UTC)) == new
    assert policy.price("gpt-4o-mini", datetime(2025, 7, 1, tzinfo=UTC)) is None
