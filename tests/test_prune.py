"""Counters of ended windows are pruned: they can no longer refuse anything, their usage
stays in the ledger, and reconcile, status and the ledger's reports are unchanged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from quotagate.core.pricing import Usage
from quotagate.core.windows import counter_expires_at
from quotagate.engine import AdmitContext
from quotagate.store.base import EventQuery

DAY1 = datetime(2026, 3, 28, 10, 0, tzinfo=UTC)


async def test_a_counter_key_tells_when_its_window_ends(make_engine: Any) -> None:
    engine = make_engine(timezone="Europe/Berlin")
    for window in ("minute", "hour", "day", "week", "month", "rolling:24h", "rolling:90m"):
        engine.catalog.set_limit("role", "user", "tokens", window, 10**9)
    engine.catalog.set_limit("role", "user", "requests", "lifetime", 10**9)
    engine.catalog.set_limit("role", "user", "credits", "day", 10**12, reset_hour=4)
    context = AdmitContext(user="alice", model="gpt-4o", prompt_tokens=5, max_tokens=5)
    # the night Europe/Berlin moves its clocks forward: the day is 23 hours long
    ticket = await engine.admit(context, now=datetime(2026, 3, 29, 0, 30, tzinfo=UTC))
    assert len(ticket.holds) == 9
    for hold in ticket.holds:
        assert counter_expires_at(hold.key) == hold.resets_at, hold.label


def test_keys_that_name_no_window_never_expire() -> None:
    for key in ("k", "a|b", "a|day@0@UTC|x", "l1|alice|day@0@No/Such_Zone|86400", "w|al|ice"):
        assert counter_expires_at(key) is None
    assert counter_expires_at("w|alice|lifetime|0") is None


async def test_prune_forgets_ended_windows_but_not_what_was_used(make_engine: Any) -> None:
    engine = make_engine(timezone="UTC", lease_seconds=600)
    engine.catalog.set_limit("role", "user", "tokens", "day", 1000)
    engine.catalog.set_limit("role", "user", "tokens", "rolling:1h", 500)
    context = AdmitContext(user="alice", model="gpt-4o", prompt_tokens=40, max_tokens=60)
    settled = await engine.admit(context, now=DAY1)
    await engine.settle(settled, Usage(40, 60), now=DAY1)
    forgotten = await engine.admit(context, now=DAY1)  # its caller never comes back
    keys = [hold.key for hold in forgotten.holds]
    assert len(await engine.store.counters(keys)) == len(keys)

    later = DAY1 + timedelta(days=2)
    assert await engine.prune(now=later) == 0  # the forgotten ticket still holds them
    assert await engine.reconcile(repair=False) == []
    swept = await engine.sweep(now=later)
    assert [e.ticket_id for e in swept] == [forgotten.id]
    assert await engine.prune(now=later) >= len(keys)
    assert await engine.store.counters(keys) == {}

    assert await engine.reconcile(repair=False) == []
    events = await engine.store.events(EventQuery(user_id="alice"))
    assert sorted(e.total_tokens for e in events) == [100, 100]
    (alice,) = await engine.store.usage(EventQuery(), "user")
    assert (alice.requests, alice.total_tokens) == (2, 200)
    today = {s.window.spec: (s.used, s.reserved) for s in await engine.status("alice", now=later)}
    assert today == {"day": (0, 0), "rolling:1h": (0, 0)}
    assert await engine.prune(now=later) == 0  # nothing left to prune


async def test_prune_keeps_windows_that_ended_less_than_a_lease_ago(make_engine: Any) -> None:
    engine = make_engine(timezone="UTC", lease_seconds=600)
    engine.catalog.set_limit("role", "user", "tokens", "hour", 1000)
    context = AdmitContext(user="alice", model="gpt-4o", prompt_tokens=40, max_tokens=60)
    ticket = await engine.admit(context, now=DAY1)
    await engine.settle(ticket, Usage(40, 60), now=DAY1)
    (key,) = [hold.key for hold in ticket.holds]
    hour_ends = DAY1 + timedelta(hours=1)
    assert await engine.prune(now=hour_ends + timedelta(seconds=599)) == 0
    assert key in await engine.store.counters([key])
    assert await engine.prune(now=hour_ends + timedelta(seconds=601)) == 1
    assert await engine.store.counters([key]) == {}
