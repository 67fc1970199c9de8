"""The contract every counter store keeps, run against each backend in conftest.BACKENDS.

These tests talk to the store protocol only (reserve / commit / release / read /
reconcile); a new store passes them before the engine may use it.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from quotagate.core.decisions import Hold
from quotagate.store.base import CounterStore, EventQuery, UsageEvent

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count()


def tid() -> str:
    return f"t{next(_ids)}"


def hold(
    key: str,
    limit: int | None,
    base: int = 0,
    per_output: int = 1,
    read_keys: tuple[str, ...] | None = None,
) -> Hold:
    return Hold(key, read_keys or (key,), limit, base, per_output, None)


async def reserve(
    store: CounterStore,
    ticket_id: str,
    holds: list[Hold],
    want: int,
    *,
    strict: bool = True,
    min_output: int = 1,
    expires_at: float = 1_000.0,
    payload: str = "{}",
):
    return await store.reserve(
        ticket_id,
        holds,
        want,
        strict=strict,
        min_output=min_output,
        expires_at=expires_at,
        payload=payload,
    )


def event(ticket_id: str, charges: list[tuple[str, int]], **fields: object) -> UsageEvent:
    values: dict = dict(
        ticket_id=ticket_id,
        user_id="alice",
        model="gpt-4o",
        started_at=100.0,
        settled_at=110.0,
        prompt_tokens=10,
        completion_tokens=20,
        charges=charges,
    )
    values.update(fields)
    return UsageEvent(**values)


async def state(store: CounterStore, key: str) -> tuple[int, int]:
    return (await store.counters([key])).get(key, (0, 0))


# -- reserve -----------------------------------------------------------------------------


async def test_reserve_holds_prompt_plus_completion_on_every_counter(store: CounterStore) -> None:
    decision = await reserve(store, "a", [hold("day", 1000, 100), hold("req", 10, 1, 0)], 200)
    assert decision.admitted
    assert decision.max_output == 200
    assert decision.amounts == (300, 1)
    assert await store.counters(["day", "req", "never-written"]) == {
        "day": (0, 300),
        "req": (0, 1),
    }
    stored = await store.ticket("a")
    assert stored is not None
    assert stored.held == (("day", 300), ("req", 1))
    assert stored.max_output == 200
    assert stored.payload == "{}"


async def test_reserve_is_all_or_nothing(store: CounterStore) -> None:
    await reserve(store, tid(), [hold("tight", 100, 0)], 90)
    decision = await reserve(store, "b", [hold("roomy", 10_000, 50), hold("tight", 100, 50)], 10)
    assert not decision.admitted
    assert decision.refused == 1
    assert (decision.used, decision.reserved) == (0, 90)
    # the counter that had room was not touched, and no ticket was kept
    assert await state(store, "roomy") == (0, 0)
    assert await state(store, "tight") == (0, 90)
    assert await store.ticket("b") is None
    assert await store.commit("b", event("b", [("roomy", 60)])) is None


async def test_strict_clamps_the_completion_to_the_tightest_limit(store: CounterStore) -> None:
    decision = await reserve(
        store,
        "a",
        [hold("loose", 10_000, 100), hold("tight", 500, 100), hold("free", None, 100)],
        1000,
    )
    assert decision.admitted
    assert decision.max_output == 400
    assert decision.amounts == (500, 500, 500)
    assert await state(store, "tight") == (0, 500)
    # nothing left: the next request is refused even with a tiny completion
    refused = await reserve(store, "b", [hold("tight", 500, 0)], 1)
    assert not refused.admitted


async def test_strict_refuses_when_less_than_min_output_is_left(store: CounterStore) -> None:
    await reserve(store, tid(), [hold("k", 100, 0)], 95)
    decision = await reserve(store, "b", [hold("k", 100, 0)], 50, min_output=10)
    assert not decision.admitted
    assert (await reserve(store, "c", [hold("k", 100, 0)], 50, min_output=5)).max_output == 5


async def test_strict_refuses_when_the_prompt_alone_does_not_fit(store: CounterStore) -> None:
    decision = await reserve(store, "a", [hold("k", 100, 101)], 1)
    assert not decision.admitted
    assert await state(store, "k") == (0, 0)


async def test_unlimited_hold_counts_but_never_refuses(store: CounterStore) -> None:
    decision = await reserve(store, "a", [hold("k", None, 10**12)], 10**12)
    assert decision.admitted and decision.max_output == 10**12
    assert await state(store, "k") == (0, 2 * 10**12)


async def test_read_keys_are_summed_but_only_the_current_bucket_is_written(
    store: CounterStore,
) -> None:
    old = hold("b1", 100, 0)
    await reserve(store, "x", [old], 60)
    await store.commit("x", event("x", [("b1", 60)]))
    rolling = hold("b2", 100, 0, read_keys=("b1", "b2"))
    decision = await reserve(store, "a", [rolling], 100)
    assert decision.max_output == 40
    assert await store.counters(["b1", "b2"]) == {"b1": (60, 0), "b2": (0, 40)}


async def test_optimistic_admits_while_one_unit_is_left(store: CounterStore) -> None:
    await reserve(store, "x", [hold("k", 100, 0)], 99)
    await store.commit("x", event("x", [("k", 99)]))
    decision = await reserve(store, "a", [hold("k", 100, 50)], 500, strict=False)
    assert decision.admitted
    assert decision.max_output == 500  # not clamped
    assert decision.amounts == (550,)
    assert await state(store, "k") == (99, 550)
    refused = await reserve(store, "b", [hold("k", 100, 0)], 1, strict=False)
    assert not refused.admitted
    assert refused.refused == 0


async def test_a_ticket_id_is_reserved_once(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 100, 0)], 10)
    with pytest.raises(Exception):  # noqa: B017 - each backend names its own error
        await reserve(store, "a", [hold("k", 100, 0)], 10)
    assert await state(store, "k") == (0, 10)


async def test_concurrent_reserves_never_overbook(store: CounterStore) -> None:
    async def one(n: int) -> bool:
        await asyncio.sleep(0)
        decision = await reserve(store, f"c{n}", [hold("k", 1000, 30)], 70, min_output=70)
        return decision.admitted

    results = await asyncio.gather(*(asyncio.create_task(one(n)) for n in range(40)))
    assert sum(results) == 10
    assert await state(store, "k") == (0, 1000)


async def test_writes_in_flight_together_each_see_the_ones_before(store: CounterStore) -> None:
    """Writes started in the same turn (the SQLite store applies them in one transaction)
    take effect in the order they were made."""
    await reserve(store, "x", [hold("k", 100, 0)], 50)
    results = await asyncio.gather(
        store.release("x"),  # frees the 50 that x held
        reserve(store, "a", [hold("k", 100, 0)], 60, min_output=60),  # fits only after it
        reserve(store, "b", [hold("k", 100, 0)], 60, min_output=60),  # 40 left: refused
        reserve(store, "c", [hold("k", 100, 0)], 60),  # clamped to the 40 left
        store.commit("x", event("x", [("k", 5)])),  # released just before: nothing
        store.commit("a", event("a", [("k", 10)])),  # a, reserved in this turn, settles
        store.release("a"),  # already settled
    )
    released, a, b, c, x_settled, a_settled, a_released = results
    assert released is True
    assert (a.admitted, b.admitted, c.admitted, c.max_output) == (True, False, True, 40)
    assert x_settled is None
    assert a_settled is not None and a_settled.charges == [("k", 10)]
    assert a_released is False
    assert await state(store, "k") == (10, 40)
    assert [t.id for t in await store.expired(1e9)] == ["c"]
    assert [e.ticket_id for e in await store.events(EventQuery())] == ["a"]
    assert await store.reconcile(repair=False) == []


async def test_a_failing_write_does_not_fail_the_others_in_flight(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 1000, 0)], 10)
    duplicate, other, settled = await asyncio.gather(
        reserve(store, "a", [hold("k", 1000, 0)], 10),
        reserve(store, "b", [hold("k", 1000, 0)], 20),
        store.commit("a", event("a", [("k", 7)])),
        return_exceptions=True,
    )
    assert isinstance(duplicate, Exception)
    assert not isinstance(other, BaseException) and other.admitted
    assert isinstance(settled, UsageEvent)
    assert await state(store, "k") == (7, 20)
    assert await store.reconcile(repair=False) == []


async def test_a_cancelled_reserve_either_returned_or_left_nothing(store: CounterStore) -> None:
    task = asyncio.create_task(reserve(store, "a", [hold("k", 1000, 0)], 10))
    await asyncio.sleep(0)  # the task starts its reserve
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    if task.cancelled():
        assert await store.ticket("a") is None
        assert await state(store, "k") == (0, 0)
    else:
        assert task.result().admitted
        assert await state(store, "k") == (0, 10)


# -- commit / release --------------------------------------------------------------------


async def test_commit_replaces_the_reservation_by_the_charge(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 1000, 100), hold("r", 5, 1, 0)], 200)
    written = await store.commit("a", event("a", [("k", 130), ("r", 1)], credits=7))
    assert written is not None
    assert written.id is not None
    assert written.charges == [("k", 130), ("r", 1)]
    assert await store.counters(["k", "r"]) == {"k": (130, 0), "r": (1, 0)}
    assert await store.ticket("a") is None
    again = await store.event("a")
    assert again is not None
    assert (again.id, again.credits, again.charges) == (written.id, 7, [("k", 130), ("r", 1)])


async def test_commit_is_idempotent(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 1000, 100)], 200)
    first = await store.commit("a", event("a", [("k", 130)], prompt_tokens=100))
    assert first is not None
    second = await store.commit("a", event("a", [("k", 999)], prompt_tokens=999))
    assert second is not None
    assert second.id == first.id
    assert second.prompt_tokens == 100
    assert second.charges == [("k", 130)]
    assert await state(store, "k") == (130, 0)
    assert len(await store.events(EventQuery())) == 1


async def test_commit_of_an_unknown_or_released_ticket_writes_nothing(store: CounterStore) -> None:
    assert await store.commit("never", event("never", [("k", 5)])) is None
    await reserve(store, "a", [hold("k", 1000, 100)], 200)
    assert await store.release("a")
    assert await store.commit("a", event("a", [("k", 5)])) is None
    assert await state(store, "k") == (0, 0)
    assert await store.events(EventQuery()) == []


async def test_release_drops_the_reservation_once(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 1000, 100), hold("j", None, 1, 0)], 200)
    assert await store.release("a")
    assert await store.counters(["k", "j"]) == {"k": (0, 0), "j": (0, 0)}
    assert await store.ticket("a") is None
    assert not await store.release("a")
    assert not await store.release("never")
    assert await store.events(EventQuery()) == []


async def test_release_after_commit_changes_nothing(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 1000, 100)], 200)
    await store.commit("a", event("a", [("k", 150)]))
    assert not await store.release("a")
    assert await state(store, "k") == (150, 0)


# -- reads -------------------------------------------------------------------------------


async def test_expired_lists_due_tickets_oldest_first(store: CounterStore) -> None:
    for name, expires in (("late", 300.0), ("early", 100.0), ("mid", 200.0), ("future", 900.0)):
        await reserve(store, name, [hold("k", None, 1)], 1, expires_at=expires)
    assert [t.id for t in await store.expired(250.0)] == ["early", "mid"]
    assert [t.id for t in await store.expired(300.0)] == ["early", "mid", "late"]
    assert [t.id for t in await store.expired(1e9, limit=2)] == ["early", "mid"]
    await store.commit("early", event("early", [("k", 2)]))
    await store.release("mid")
    assert [t.id for t in await store.expired(1e9)] == ["late", "future"]
    due = (await store.expired(1e9))[0]
    assert due.held == (("k", 2),)
    assert due.expires_at == 300.0


async def test_renew_extends_the_leases_of_pending_tickets_only(store: CounterStore) -> None:
    for name in ("a", "b", "c", "d"):
        await reserve(store, name, [hold("k", 1000, 1)], 1, expires_at=100.0)
    await store.commit("b", event("b", [("k", 2)]))
    await store.release("c")
    pending = await store.renew(["a", "b", "c", "never", "a"], 500.0)
    assert pending == {"a"}
    assert [(t.id, t.expires_at) for t in await store.expired(1e9)] == [
        ("d", 100.0),
        ("a", 500.0),
    ]
    assert [t.id for t in await store.expired(200.0)] == ["d"]
    # a lease is never shortened, and renewing nothing is a no-op
    assert await store.renew(["a"], 300.0) == {"a"}
    ticket = await store.ticket("a")
    assert ticket is not None and ticket.expires_at == 500.0
    assert await store.renew([], 900.0) == set()
    # what a ticket holds is untouched
    assert ticket.held == (("k", 2),)
    assert await state(store, "k") == (2, 4)
    assert await store.reconcile(repair=False) == []


async def test_renew_of_many_tickets_in_flight_with_other_writes(store: CounterStore) -> None:
    """A process renews all its tickets in one call, in the same turn as other writes."""
    names = [f"m{n}" for n in range(1200)]  # more than one statement's worth of ids
    await asyncio.gather(*(reserve(store, n, [hold("k", None, 1)], 1) for n in names))
    renewed, settled, _ = await asyncio.gather(
        store.renew(names, 5_000.0),
        store.commit("m0", event("m0", [("k", 2)])),
        reserve(store, "late", [hold("k", None, 1)], 1, expires_at=100.0),
    )
    assert settled is not None
    # the renew was submitted first: m0 was still pending when it ran
    assert renewed == set(names)
    assert await store.expired(4_999.0) == [await store.ticket("late")]
    assert len(await store.expired(5_000.0, limit=5_000)) == len(names)


async def test_events_filters(store: CounterStore) -> None:
    rows = [
        ("e1", "alice", "gpt-4o", 100.0),
        ("e2", "bob", "gpt-4o", 200.0),
        ("e3", "alice", "llama", 300.0),
        ("e4", "alice", "gpt-4o", 400.0),
    ]
    for ticket_id, user, model, started in rows:
        await reserve(store, ticket_id, [hold("k", None, 1)], 1)
        await store.commit(
            ticket_id, event(ticket_id, [("k", 1)], user_id=user, model=model, started_at=started)
        )

    async def ids(**query: object) -> list[str]:
        return [e.ticket_id for e in await store.events(EventQuery(**query))]  # type: ignore[arg-type]

    assert await ids() == ["e1", "e2", "e3", "e4"]
    assert await ids(user_id="alice") == ["e1", "e3", "e4"]
    assert await ids(model="gpt-4o") == ["e1", "e2", "e4"]
    assert await ids(user_id="alice", model="gpt-4o") == ["e1", "e4"]
    assert await ids(since=200.0) == ["e2", "e3", "e4"]
    assert await ids(until=300.0) == ["e1", "e2"]
    assert await ids(since=200.0, until=400.0, user_id="alice") == ["e3"]
    assert await ids(limit=2) == ["e1", "e2"]
    assert await ids(user_id="carol") == []


async def test_usage_sums_the_matching_ledger_rows_per_group(store: CounterStore) -> None:
    rows = [
        ("e1", "alice", "gpt-4o", 100.0, 10, 20, 3, 700, False),
        ("e2", "bob", "gpt-4o", 950.0, 1, 2, 0, 30, True),
        ("e3", "alice", "llama", 1000.0, 5, 0, 0, 0, False),
        ("e4", "alice", "gpt-4o", 1900.0, 7, 8, 7, 90, True),
    ]
    for ticket_id, user, model, started, prompt, completion, cached, credits, guess in rows:
        await reserve(store, ticket_id, [hold("k", None, 1)], 1)
        await store.commit(
            ticket_id,
            event(
                ticket_id,
                [("k", prompt + completion)],
                user_id=user,
                model=model,
                started_at=started,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                credits=credits,
                estimated=guess,
            ),
        )

    async def sums(by: str, **query: object) -> dict[object, tuple[int, ...]]:
        found = await store.usage(EventQuery(**query), by)  # type: ignore[arg-type]
        return {
            s.key: (
                s.requests,
                s.prompt_tokens,
                s.completion_tokens,
                s.cached_tokens,
                s.credits,
                s.estimated,
            )
            for s in found
        }

    assert await sums("user") == {"alice": (3, 22, 28, 10, 790, 1), "bob": (1, 1, 2, 0, 30, 1)}
    assert await sums("model") == {"gpt-4o": (3, 18, 30, 10, 820, 2), "llama": (1, 5, 0, 0, 0, 0)}
    # quarter hours since 1970: 100 s and 950 s fall in slots 0 and 1, 1,000 in 1, 1,900 in 2
    assert await sums("slot") == {
        0: (1, 10, 20, 3, 700, 0),
        1: (2, 6, 2, 0, 30, 1),
        2: (1, 7, 8, 7, 90, 1),
    }
    assert await sums("user", model="gpt-4o", since=500.0) == {
        "alice": (1, 7, 8, 7, 90, 1),
        "bob": (1, 1, 2, 0, 30, 1),
    }
    assert await sums("model", user_id="carol") == {}
    with pytest.raises(ValueError):
        await store.usage(EventQuery(), "colour")


async def test_usage_sums_the_excess(store: CounterStore) -> None:
    """What `quotagate usage` shows of upstreams that reported beyond the reservation."""
    for ticket_id, excess in (("x1", 5), ("x2", 0), ("x3", 7)):
        await reserve(store, ticket_id, [hold("k", None, 1)], 1)
        await store.commit(ticket_id, event(ticket_id, [("k", 1)], excess=excess))
    for by in ("user", "model", "slot"):
        [row] = await store.usage(EventQuery(), by)
        assert (row.requests, row.excess) == (3, 12)


async def test_event_round_trips_every_field(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", None, 1)], 1)
    original = event(
        "a",
        [("k", 3)],
        cached_tokens=4,
        credits=12345,
        key_id="key1",
        channel="ch",
        pool="research",
        source="pool",
        status="expired",
        estimated=True,
        excess=2,
    )
    await store.commit("a", original)
    stored = await store.event("a")
    assert stored is not None
    assert stored.id is not None
    original.id = stored.id
    assert stored == original


# -- reconcile ---------------------------------------------------------------------------


async def test_reconcile_finds_nothing_on_a_consistent_store(store: CounterStore) -> None:
    await reserve(store, "a", [hold("k", 1000, 100)], 200)
    await reserve(store, "b", [hold("k", 1000, 100)], 200)
    await reserve(store, "c", [hold("k", 1000, 100)], 200)
    await store.commit("a", event("a", [("k", 120)]))
    await store.release("b")
    assert await store.reconcile(repair=False) == []
    assert await store.reconcile(repair=True) == []


async def test_reconcile_finds_and_repairs_a_corrupted_counter(
    store: CounterStore, backend: Any
) -> None:
    await reserve(store, "a", [hold("k", 1000, 100), hold("other", 1000, 1, 0)], 200)
    await store.commit("a", event("a", [("k", 120), ("other", 1)]))
    await reserve(store, "b", [hold("k", 1000, 100)], 200)  # pending: 300 reserved

    backend.corrupt(store, "k", 5, 7)
    backend.corrupt(store, "ghost", 40, 0)  # a counter the ledger knows nothing of
    assert await state(store, "k") == (5, 7)

    diffs = await store.reconcile(repair=False)
    assert [(d.key, d.used, d.reserved, d.expected_used, d.expected_reserved) for d in diffs] == [
        ("ghost", 40, 0, 0, 0),
        ("k", 5, 7, 120, 300),
    ]
    assert await state(store, "k") == (5, 7)  # a dry run repairs nothing

    assert len(await store.reconcile(repair=True)) == 2
    assert await store.counters(["k", "other", "ghost"]) == {
        "k": (120, 300),
        "other": (1, 0),
        "ghost": (0, 0),
    }
    assert await store.reconcile(repair=False) == []
    # the repaired counter keeps working: the pending ticket settles onto it
    await store.commit("b", event("b", [("k", 250)]))
    assert await state(store, "k") == (370, 0)
    assert await store.reconcile(repair=False) == []


# -- pruning -----------------------------------------------------------------------------

# day buckets of 1970-01-02 (ends at 172,800) and 1970-01-03 (ends at 259,200)
ALICE_DAY1 = "a|tokens|alice|day@0@UTC|86400"
BOB_DAY1 = "a|tokens|bob|day@0@UTC|86400"
ALICE_DAY2 = "a|tokens|alice|day@0@UTC|172800"


def day_hold(key: str) -> Hold:
    return Hold(key, (key,), 1000, 0, 1, int(key.rsplit("|", 1)[1]) + 86400)


async def test_prune_deletes_ended_counters_that_hold_nothing(
    store: CounterStore, backend: Any
) -> None:
    for ticket, key, used in (("d1", ALICE_DAY1, 60), ("d2", ALICE_DAY2, 70)):
        await reserve(store, ticket, [day_hold(key)], 100)
        await store.commit(ticket, event(ticket, [(key, used)]))
    await reserve(store, "pending", [day_hold(BOB_DAY1)], 100)  # never settled yet

    assert await store.prune(200_000.0) == 1  # day 1 ended at 172,800; day 2 has not
    assert await store.counters([ALICE_DAY1, BOB_DAY1, ALICE_DAY2]) == {
        BOB_DAY1: (0, 100),  # still held by a ticket: kept
        ALICE_DAY2: (70, 0),
    }
    assert len(await store.events(EventQuery())) == 2  # the ledger keeps everything
    assert await store.reconcile(repair=False) == []
    assert await store.prune(200_000.0) == 0

    # reconcile still checks what is live, and repairing never brings pruned rows back
    backend.corrupt(store, ALICE_DAY2, 1, 0)
    assert [d.key for d in await store.reconcile(repair=True)] == [ALICE_DAY2]
    assert await store.counters([ALICE_DAY1, ALICE_DAY2]) == {ALICE_DAY2: (70, 0)}

    # the pending ticket still settles onto its (kept) counter
    await store.commit("pending", event("pending", [(BOB_DAY1, 80)]))
    assert await state(store, BOB_DAY1) == (80, 0)
    assert await store.prune(200_000.0) == 1
    assert await store.reconcile(repair=False) == []


async def test_prune_takes_at_most_its_limit(store: CounterStore) -> None:
    keys = [f"a|tokens|u{n}|day@0@UTC|86400" for n in range(5)]
    for n, key in enumerate(keys):
        await reserve(store, f"t{n}", [day_hold(key)], 10)
        await store.commit(f"t{n}", event(f"t{n}", [(key, 5)]))
    assert await store.prune(200_000.0, limit=3) == 3
    assert await store.prune(200_000.0, limit=3) == 2
    assert await store.counters(keys) == {}
    assert await store.reconcile(repair=False) == []
