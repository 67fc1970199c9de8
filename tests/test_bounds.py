"""Numbers that must fit 64 bits, messages that must have OpenAI's shape, names that must be
printable — through the library door (the engine on the memory and SQLite stores) — and a
sweeper that one bad ticket cannot stop.

Every refusal is an InvalidInput that names the problem, and leaves the catalog, the ledger
and the counters as they were.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotagate.core.decisions import Hold
from quotagate.core.errors import InvalidInput
from quotagate.core.limits import ABSURD, MICRO
from quotagate.core.pricing import Price, Usage, price_from_record
from quotagate.engine import AdmitContext, Engine
from quotagate.store.base import EventQuery, UsageEvent
from quotagate.store.factory import open_engine

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
INT64 = 2**63 - 1
MESSAGES = [{"role": "user", "content": "hello"}]


async def ledger(engine: Engine) -> list[UsageEvent]:
    return await engine.store.events(EventQuery())


async def everything(engine: Engine) -> tuple[Any, ...]:
    """What a refused call must leave alone: users, the ledger, the pending tickets and what
    they hold (the counters follow from these two, which reconcile proves)."""
    assert await engine.reconcile(repair=False) == []
    return (
        [(u.id, u.role, u.groups, u.email) for u in engine.catalog.users()],
        await ledger(engine),
        [(t.id, t.held) for t in await engine.store.expired(1e12)],
        engine.catalog.version(),
    )


def gpt4o() -> Price:
    return Price("gpt-4o", Decimal(2500), 1_000_000, Decimal(10_000), 1_000_000)


# -- 1.8 numbers that overflow --------------------------------------------------------------


async def test_absurd_usage_is_refused_and_the_ticket_stays_settleable(make_engine: Any) -> None:
    engine = make_engine()
    engine.catalog.add_price(gpt4o())
    engine.catalog.set_limit("everyone", "*", "credits", "day", None)
    ticket = await engine.admit(
        AdmitContext(user="alice", model="gpt-4o", prompt_tokens=10, max_tokens=20), now=T0
    )
    before = await everything(engine)
    # 10^15 - 1 tokens each pass the per-number bound; at gpt-4o's price they cost 1.25e10
    # credits, more than a 64-bit micro-credit column holds: refused, nothing changes
    absurd = {"prompt_tokens": 10**15 - 1, "completion_tokens": 10**15 - 1}
    with pytest.raises(InvalidInput, match="absurd"):
        await engine.settle(ticket, absurd, now=T0)
    with pytest.raises(InvalidInput, match="absurdly large"):
        await engine.settle(ticket, {"prompt_tokens": 10**16}, now=T0)
    assert await everything(engine) == before
    event = await engine.settle(ticket, Usage(10, 20), now=T0)
    assert (event.status, event.prompt_tokens, event.completion_tokens) == ("settled", 10, 20)


async def test_a_huge_max_tokens_is_clamped_to_what_fits_64_bits(make_engine: Any) -> None:
    engine = make_engine()
    engine.catalog.add_price(gpt4o())
    engine.catalog.set_limit("everyone", "*", "credits", "day", None)  # unlimited: no clamp
    ticket = await engine.admit(
        AdmitContext(user="alice", model="gpt-4o", prompt_tokens=10, max_tokens=ABSURD), now=T0
    )
    assert ticket.requested_max_tokens == ABSURD and ticket.clamped
    assert all(0 < h.reserved <= ABSURD for h in ticket.holds)
    # settling on the reservation (what the gateway falls back on) fits as well
    event = await engine.settle(ticket, Usage(10, ticket.max_tokens), now=T0)
    assert 0 < event.credits <= ABSURD


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("input_cost_credits", 1e300, "input_cost_credits is absurdly large"),
        ("output_cost_credits", "1e16", "output_cost_credits is absurdly large"),
        ("per_input_tokens", 1e30, "per_input_tokens is absurdly large"),
        ("input_cost_credits", "1." + "1" * 40, "has too many digits"),
        ("id", "m" * 300, "model id must be at most 255 characters"),
        ("id", "gpt\n4o", "control characters"),
        ("provider", "p" * 65, "provider must be text of at most 64"),
    ],
)
def test_prices_that_cannot_be_stored_or_summed_are_refused(
    field: str, value: Any, message: str
) -> None:
    record = {"id": "m", "input_cost_credits": 1, "output_cost_credits": 2, field: value}
    with pytest.raises(InvalidInput, match=message):
        price_from_record(record)


prices = st.builds(
    dict,
    id=st.just("m"),
    input_cost_credits=st.decimals(0, 10**20, allow_nan=False, places=3).map(str),
    output_cost_credits=st.decimals(0, 10**20, allow_nan=False, places=3).map(str),
    per_input_tokens=st.integers(1, 10**17),
    per_output_tokens=st.integers(1, 10**17),
)
tokens = st.integers(0, ABSURD)


@given(record=prices, prompt=tokens, completion=tokens, multiplier=st.integers(0, 1000))
def test_every_accepted_price_costs_at_most_absurd_or_refuses(
    record: dict[str, Any], prompt: int, completion: int, multiplier: int
) -> None:
    try:
        price = price_from_record(record)
    except InvalidInput:
        return
    try:
        cost = price.cost(Usage(prompt, completion), Decimal(multiplier))
    except InvalidInput:
        return
    assert 0 <= cost <= ABSURD


@settings(max_examples=60, deadline=None)
@given(record=prices, prompt=tokens, want=st.integers(1, ABSURD))
def test_every_admitted_reservation_and_its_settlement_fit(
    record: dict[str, Any], prompt: int, want: int
) -> None:
    """Whatever price the catalog accepted and whatever a client asks for, on unlimited
    counters (which the store does not clamp): the ticket holds at most ABSURD on every
    counter, and settling at the reservation fits too."""
    try:
        price = price_from_record(record)
    except InvalidInput:
        return

    async def run() -> None:
        engine = open_engine("memory://", catalog_refresh_seconds=0)
        try:
            engine.catalog.set_limit("everyone", "*", "credits", "day", None)
            engine.catalog.set_limit("everyone", "*", "tokens", "day", None)
            engine.catalog.add_price(price)
            context = AdmitContext(user="u", model="m", prompt_tokens=prompt, max_tokens=want)
            try:
                ticket = await engine.admit(context, now=T0)
            except InvalidInput as exc:
                assert "absurd" in str(exc)
                return
            assert all(h.reserved <= ABSURD for h in ticket.holds)
            event = await engine.settle(ticket, Usage(prompt, ticket.max_tokens), now=T0)
            assert event.credits <= ABSURD and event.total_tokens <= 2 * ABSURD < INT64
        finally:
            await engine.close()

    asyncio.run(run())


# -- the sweeper against a poisoned ticket -------------------------------------------------


async def poison(engine: Engine, payload: dict[str, Any] | str, at: datetime) -> str:
    """A pending ticket written straight through the store, with a record the engine would
    never write (an absurd price, say): what an old version, a bug or a hand edit leaves."""
    model = await engine.admit(
        AdmitContext(user="mallory", model="gpt-4o", prompt_tokens=5, max_tokens=5), now=at
    )
    stored = await engine.store.ticket(model.id)
    assert stored is not None
    record = orjson.loads(stored.payload)
    await engine.cancel(model)
    ticket_id = f"poisoned{len(str(payload))}"
    record["id"] = ticket_id
    text = payload if isinstance(payload, str) else orjson.dumps({**record, **payload}).decode()
    holds = [
        Hold(h.key, (h.key,), None, 5, 1, None if h.resets_at is None else int(h.resets_at))
        for h in model.holds
    ]
    decision = await engine.store.reserve(
        ticket_id, holds, 5, strict=True, min_output=1, expires_at=model.expires_at, payload=text
    )
    assert decision.admitted
    return ticket_id


ABSURD_PRICE = {
    "price": {
        "provider": "",
        "id": "gpt-4o",
        "name": "gpt-4o",
        "input_cost_credits": "1e300",
        "per_input_tokens": 1,
        "output_cost_credits": "1e300",
        "per_output_tokens": 1,
    }
}


ABSURD_PROMPT = {"prompt_tokens": 10**18}


@pytest.mark.parametrize("on_expiry", ["charge", "release"])
@pytest.mark.parametrize(
    "payload",
    [ABSURD_PRICE, ABSURD_PROMPT, "not json at all", {"user_id": None}],
    ids=["absurd price", "absurd prompt", "not json", "no user"],
)
async def test_one_poisoned_ticket_cannot_stop_the_sweeper(
    make_engine: Any, on_expiry: str, payload: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(lease_seconds=60, on_expiry=on_expiry)
    engine.catalog.add_price(gpt4o())
    engine.catalog.set_limit("everyone", "*", "tokens", "day", 10_000)
    engine.catalog.set_limit("everyone", "*", "credits", "day", 100 * MICRO)
    # the poisoned ticket expires first, so every sweep meets it before the others
    bad = await poison(engine, payload, T0)
    normal = [
        await engine.admit(
            AdmitContext(user=user, model="gpt-4o", prompt_tokens=100, max_tokens=200),
            now=T0 + timedelta(seconds=1),
        )
        for user in ("alice", "bob")
    ]
    with caplog.at_level(logging.WARNING, logger="quotagate.engine"):
        events = await engine.sweep(now=T0 + timedelta(minutes=5))
    swept = {e.ticket_id: e for e in events}
    assert {t.id for t in normal} <= set(swept)
    expected = "expired" if on_expiry == "charge" else "released"
    assert all(swept[t.id].status == expected for t in normal)
    assert await engine.store.expired(1e12) == []  # nothing left pending, the bad one neither
    assert bad in caplog.text
    # releasing needs nothing of the record but its holds, so an absurd prompt is no poison
    poisoned = on_expiry == "charge" or payload is not ABSURD_PROMPT
    assert poisoned == ("cannot be settled as recorded" in caplog.text)
    if bad in swept:  # expired on what the store held: exactly its reservation, or nothing
        event = swept[bad]
        assert (event.status, event.estimated) == (expected, True)
        charged = [amount for _, amount in event.charges]
        assert charged == ([10] * len(charged) if on_expiry == "charge" else [0] * len(charged))
    else:
        assert isinstance(payload, str) or payload.get("user_id", "") is None
    assert await engine.reconcile(repair=False) == []
    assert await engine.sweep(now=T0 + timedelta(minutes=10)) == []


# -- 2.5 message shapes, through the library door ------------------------------------------

MALFORMED: list[tuple[Any, str]] = [
    (
        [{"role": "assistant", "content": "x", "tool_calls": [{"function": "abc"}]}],
        "messages[0].tool_calls[0].function",
    ),
    (
        [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
        "messages[0].tool_calls[0].function.name",
    ),
    (
        [
            MESSAGES[0],
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        ],
        "messages[1].tool_calls[0].function.arguments",
    ),
    ([{"role": "assistant", "tool_calls": {"function": {}}}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": ["abc"]}], "messages[0].tool_calls[0]"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [5]}], "messages[0].content[0]"),
    (
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "messages[0].content[0].image_url.url",
    ),
    ([{"role": "user", "content": "x", "name": 3}], "messages[0].name"),
    ([{"role": "tool", "content": "x", "tool_call_id": {}}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "function_call": "f"}], "messages[0].function_call"),
    (["hi"], "messages[0]"),
    ("hi", "messages"),
]

WELL_FORMED: list[Any] = [
    [{"role": "system", "content": "s"}, {"role": "developer", "content": "d"}],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}},
                {"type": "file", "file": {"file_id": "f"}},
            ],
        },
        {
            "role": "assistant",
            "tool_calls": [{"id": "c2", "type": "custom", "custom": {"name": "g", "input": "x"}}],
        },
    ],
]


@pytest.mark.parametrize(("messages", "param"), MALFORMED)
async def test_malformed_messages_are_refused_with_the_field_named(
    make_engine: Any, messages: Any, param: str
) -> None:
    engine = make_engine()
    before = await everything(engine)
    with pytest.raises(InvalidInput) as caught:
        await engine.admit(AdmitContext(user="alice", model="m", messages=messages), now=T0)
    assert caught.value.param == param
    assert param in str(caught.value)
    assert await everything(engine) == before  # alice was not even created


@pytest.mark.parametrize("messages", WELL_FORMED)
async def test_well_formed_messages_are_counted(make_engine: Any, messages: Any) -> None:
    from quotagate.core.messages import check_messages

    assert check_messages(messages) is messages
    engine = make_engine()
    ticket = await engine.admit(AdmitContext(user="alice", model="m", messages=messages), now=T0)
    assert ticket.prompt_tokens > 3 * len(messages)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "role",
                        "content",
                        "type",
                        "text",
                        "tool_calls",
                        "function",
                        "name",
                        "arguments",
                        "image_url",
                        "url",
                        "function_call",
                    ]
                ),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_whatever_the_validator_lets_through_can_be_counted(messages: Any) -> None:
    from quotagate.core.messages import check_messages
    from quotagate.core.tokens import TokenCounter

    try:
        check_messages(messages)
    except InvalidInput:
        return
    assert TokenCounter().messages(messages) >= 3


# -- 2.6 names: control characters, and a refused admit changes nothing ---------------------


@pytest.mark.parametrize(
    "user",
    [
        "a\nb",
        "alice\r\nINFO forged",
        "tab\there",
        "esc\x1b[31m",
        "nul\x00",
        "bidi\u202e",
        "",
        "   ",
        "a|b",
        "x" * 256,
    ],
)
async def test_unusable_user_ids_are_refused_and_create_nothing(
    make_engine: Any, user: str
) -> None:
    engine = make_engine()
    before = await everything(engine)
    with pytest.raises(InvalidInput, match="user"):
        await engine.admit(AdmitContext(user=user, model="m", prompt_tokens=1), now=T0)
    with pytest.raises(InvalidInput):
        engine.catalog.ensure_user(user)
    assert await everything(engine) == before


async def test_a_refused_admit_neither_creates_nor_updates_the_user(make_engine: Any) -> None:
    engine = make_engine(unknown_models="refuse")
    engine.catalog.add_price(gpt4o())
    engine.catalog.ensure_user("bob", "user", groups=["staff"])
    before = await everything(engine)
    refused = [
        AdmitContext(user="carol", model="gpt-4o", messages=[{"role": "x"}]),
        AdmitContext(user="carol", model="unpriced", prompt_tokens=1),
        AdmitContext(user="carol", model="gpt-4o", prompt_tokens=1, pool="no-such-pool"),
        AdmitContext(user="bob", model="gpt-4o", messages=[{"role": "x"}], groups=["new"]),
        AdmitContext(user="bob", model="gpt-4o", max_tokens=-1, groups=["new"]),
    ]
    for context in refused:
        with pytest.raises((InvalidInput, LookupError)):
            await engine.admit(context, now=T0)
        with pytest.raises((InvalidInput, LookupError)):
            engine.check(context, now=T0)
    assert await everything(engine) == before


async def test_a_price_stored_before_prices_were_bounded_is_ignored_not_fatal(
    make_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Older versions let `prices import` store 1e300 credits: such a row must not make every
    request fail once prices are validated on reading."""
    import sqlalchemy as sa

    from quotagate.store import schema

    engine = make_engine()
    engine.catalog.add_price(gpt4o())
    with engine.catalog.db.begin() as conn:
        conn.execute(
            sa.insert(schema.prices).values(
                model="gpt-4o-mini",
                input_credits="1E+300",
                per_input_tokens=1_000_000,
                output_credits="1",
                per_output_tokens=1_000_000,
                effective_from=0.0,
            )
        )
    engine.refresh()
    with caplog.at_level(logging.ERROR, logger="quotagate.catalog"):
        assert [p.model for p in engine.catalog.prices()] == ["gpt-4o"]
        for model in ("gpt-4o", "gpt-4o-mini"):  # the second at the default price
            ticket = await engine.admit(AdmitContext(user="alice", model=model), now=T0)
            await engine.settle(ticket, Usage(10, 10), now=T0)
    assert "unusable and ignored" in caplog.text
