"""The lease keeper (quotagate.leases) on every store backend: a held ticket is renewed
in the background until it is settled or cancelled, or until the task holding it ends;
expiry applies only to the tickets nobody renews. The gateway-level proof (a real stream
lasting several leases, a killed gateway process) is tests/gateway/test_leases.py."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from quotagate.core.pricing import Usage
from quotagate.engine import AdmitContext, Engine

pytestmark = pytest.mark.timeout(30)

LEASE = 1.0


def context(user: str = "alice") -> AdmitContext:
    return AdmitContext(user=user, model="gpt-4o", prompt_tokens=10, max_tokens=50)


async def lease_of(engine: Engine, ticket_id: str) -> float:
    stored = await engine.store.ticket(ticket_id)
    assert stored is not None
    return stored.expires_at


async def test_renew_extends_pending_tickets_to_a_full_lease(make_engine: Any) -> None:
    engine: Engine = make_engine(lease_seconds=60)
    first, second = await engine.admit(context()), await engine.admit(context())
    await engine.settle(second, Usage(10, 5))
    before = await lease_of(engine, first.id)
    assert await engine.renew([first, second.id, "never"]) == {first.id}
    assert await lease_of(engine, first.id) > before
    assert await engine.renew([]) == set()
    swept = await engine.sweep()
    assert swept == []
    # the ticket restored from the store carries its renewed lease
    [due] = await engine.store.expired(float("inf"))
    event = await engine.settle(first.id, Usage(10, 5))
    assert event.status == "settled"
    assert due.expires_at > before


async def test_a_held_ticket_outlives_its_lease_until_settled(make_engine: Any) -> None:
    engine: Engine = make_engine(lease_seconds=LEASE)
    held, left = await engine.admit(context()), await engine.admit(context("bob"))
    engine.leases.hold(held.id)
    begun = time.monotonic()
    swept = []
    while time.monotonic() - begun < 3 * LEASE:
        swept += await engine.sweep()
        await asyncio.sleep(LEASE / 6)
    # the one nobody held expired; the held one is still pending
    assert [e.ticket_id for e in swept] == [left.id]
    assert held.id in engine.leases
    event = await engine.settle(held, Usage(10, 7))
    assert (event.status, event.completion_tokens) == ("settled", 7)
    assert held.id not in engine.leases
    assert await engine.leases.renew() == 0


async def test_cancel_lets_go_of_a_ticket(make_engine: Any) -> None:
    engine: Engine = make_engine(lease_seconds=LEASE)
    ticket = await engine.admit(context())
    engine.leases.hold(ticket.id)
    assert await engine.leases.renew() == 1
    await engine.cancel(ticket)
    assert len(engine.leases) == 0


async def test_a_ticket_whose_task_ended_unsettled_is_left_to_its_lease(
    make_engine: Any,
) -> None:
    """A request that ended without settling (a bug, a cancellation) must not keep its
    reservation for as long as the process lives."""
    engine: Engine = make_engine(lease_seconds=LEASE)

    async def request() -> str:
        ticket = await engine.admit(context())
        engine.leases.hold(ticket.id)
        return ticket.id

    ticket_id = await asyncio.ensure_future(request())
    assert await engine.leases.renew() == 0
    assert ticket_id not in engine.leases
    await asyncio.sleep(LEASE + 0.05)
    [event] = await engine.sweep()
    assert (event.ticket_id, event.status) == (ticket_id, "expired")


async def test_a_ticket_settled_elsewhere_is_let_go_of(make_engine: Any) -> None:
    """Cancelled by another process (or swept while the store was out of reach): the
    store says it is not pending any more, and the keeper stops renewing it."""
    engine: Engine = make_engine(lease_seconds=LEASE)
    ticket = await engine.admit(context())
    engine.leases.hold(ticket.id)
    assert await engine.store.release(ticket.id)  # behind this engine's back
    assert ticket.id in engine.leases
    assert await engine.leases.renew() == 0
    assert ticket.id not in engine.leases


async def test_this_process_never_sweeps_a_ticket_it_holds(make_engine: Any) -> None:
    """However late the renewal (a busy store, a clock moved forward), a ticket held by a
    running request of this process is alive; another process sweeps only what its lease
    says (tests/gateway/test_leases.py kills a gateway to show it)."""
    engine: Engine = make_engine(lease_seconds=60)
    held, left = await engine.admit(context()), await engine.admit(context("bob"))
    engine.leases.hold(held.id)
    later = datetime.now(UTC) + timedelta(days=1)
    assert [e.ticket_id for e in await engine.sweep(later)] == [left.id]
    assert await engine.store.ticket(held.id) is not None
    engine.leases.drop(held.id)  # its request let go: now it is swept like any other
    assert [e.ticket_id for e in await engine.sweep(later)] == [held.id]
