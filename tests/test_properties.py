"""Property: whatever many concurrent tasks do — admit, settle, cancel, let leases run out
and sweep — in strict mode no limit is ever overspent, and once every ticket has ended the
counters are exactly the ledger's sums.

Each example runs a fresh engine on a fresh store. Tasks are real asyncio tasks started
together with asyncio.gather; they yield to each other between operations, so hypothesis
explores interleavings as well as operation sequences. A shared virtual clock only moves
forward (the engine takes `now=`), so rolling windows age and leases expire without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotagate.core.errors import QuotaExceeded, UnknownTicket
from quotagate.core.limits import MICRO
from quotagate.core.pricing import Price, Usage
from quotagate.engine import AdmitContext, Engine, Ticket
from quotagate.store.base import EventQuery
from quotagate.store.factory import open_engine

pytestmark = pytest.mark.timeout(120)

START = datetime(2025, 6, 2, 0, 30, tzinfo=UTC)
USERS = ("alice", "bob", "carol")
MODELS = ("gpt-4o", "local-model")  # the second has no price: the default price applies
LEASE = 300.0

admit_op = st.tuples(
    st.just("admit"),
    st.integers(0, len(USERS) - 1),
    st.integers(0, len(MODELS) - 1),
    st.integers(0, 400),  # prompt tokens
    st.one_of(st.none(), st.integers(0, 900)),  # max_tokens (None: the default)
)
settle_op = st.tuples(
    st.just("settle"),
    st.integers(0, 10**6),  # which open ticket
    st.floats(0, 1),  # share of the reserved prompt really used
    st.floats(0, 1),  # share of the granted completion really used
    st.booleans(),  # hand back the ticket object, or only its id
)
cancel_op = st.tuples(st.just("cancel"), st.integers(0, 10**6))
sweep_op = st.tuples(st.just("sweep"))
tick_op = st.tuples(st.just("tick"), st.integers(1, 240))
operation = st.one_of(admit_op, admit_op, settle_op, settle_op, cancel_op, sweep_op, tick_op)
scripts = st.lists(st.lists(operation, min_size=1, max_size=12), min_size=4, max_size=8)


@dataclass
class World:
    engine: Engine
    now: datetime = START
    open: list[Ticket] = field(default_factory=list)
    #: calendar counter key -> (limit, label) of every limited hold seen on a ticket
    holds: dict[str, tuple[int, str]] = field(default_factory=dict)
    admitted: int = 0
    refused: int = 0
    swept: int = 0  # tickets charged by a sweep while the tasks ran
    steps: int = 0

    async def check(self) -> None:
        """used + reserved <= limit on every counter, read back from the store."""
        self.steps += 1
        for user in USERS:
            for status in await self.engine.status(user, now=self.now):
                if status.amount is not None:
                    assert status.used + status.reserved <= status.amount, (user, status)
        states = await self.engine.store.counters(list(self.holds))
        for key, (used, reserved) in states.items():
            assert used + reserved <= self.holds[key][0], (key, used, reserved)


def setup_engine(url: str) -> Engine:
    engine = open_engine(
        url,
        mode="strict",
        lease_seconds=LEASE,
        on_expiry="charge",
        unknown_models="default_price",
        default_max_tokens=500,
        min_output_tokens=1,
        timezone="UTC",
        catalog_refresh_seconds=0,
    )
    cat = engine.catalog
    cat.add_price(
        Price(
            "gpt-4o",
            Decimal(2_500),
            1_000_000,
            Decimal(10_000),
            1_000_000,
            effective_from=START - timedelta(days=1),
        )
    )
    cat.set_limit("role", "user", "tokens", "day", 6_000)
    cat.set_limit("role", "user", "tokens", "rolling:60m", 2_500)
    cat.set_limit("role", "user", "requests", "hour", 14)
    cat.set_limit("group", "lab", "tokens", "day", 1_000)
    cat.set_limit("model", "gpt-4o", "credits", "day", 12 * MICRO)  # per user
    cat.set_limit("model", "gpt-4o", "tokens", "day", 9_000, per_user=False)  # shared
    cat.set_limit("model", "local-model", "credits", "hour", 40 * MICRO, per_user=False)
    cat.set_multiplier("lab", "0.5")
    for user in USERS:
        cat.ensure_user(user, "user", groups=["lab"] if user == "bob" else [])
    engine.policy()
    engine.settings = engine.settings.model_copy(update={"catalog_refresh_seconds": 3600})
    return engine


async def act(world: World, op: tuple[Any, ...]) -> None:
    engine = world.engine
    kind = op[0]
    if kind == "admit":
        _, user, model, prompt, max_tokens = op
        try:
            ticket = await engine.admit(
                AdmitContext(
                    user=USERS[user],
                    model=MODELS[model],
                    prompt_tokens=prompt,
                    max_tokens=max_tokens,
                ),
                now=world.now,
            )
        except QuotaExceeded:
            world.refused += 1
            return
        world.admitted += 1
        world.open.append(ticket)
        for hold in ticket.holds:
            if hold.limit is not None and "rolling" not in hold.key:
                world.holds[hold.key] = (hold.limit, hold.label)
    elif kind in ("settle", "cancel") and world.open:
        # pick without removing: another task may settle or cancel the same ticket again
        ticket = world.open[op[1] % len(world.open)]
        if kind == "cancel":
            await engine.cancel(ticket if op[1] % 2 else ticket.id)
            return
        _, _, prompt_share, output_share, as_object = op
        usage = Usage(
            int(ticket.prompt_tokens * prompt_share), int(ticket.max_tokens * output_share)
        )
        with contextlib.suppress(UnknownTicket):  # cancelled before: nothing to charge
            await engine.settle(ticket if as_object else ticket.id, usage, now=world.now)
    elif kind == "sweep":
        world.swept += len(await engine.sweep(now=world.now))
    elif kind == "tick":
        world.now += timedelta(seconds=op[1])


async def scenario(url: str, script: list[list[tuple[Any, ...]]]) -> World:
    engine = setup_engine(url)
    world = World(engine)
    try:

        async def task(operations: list[tuple[Any, ...]]) -> None:
            for op in operations:
                await act(world, op)
                await world.check()
                await asyncio.sleep(0)  # let the other tasks interleave here

        await asyncio.gather(*(asyncio.create_task(task(ops)) for ops in script))

        # end every ticket: a final sweep after every lease has run out
        world.now += timedelta(seconds=LEASE)
        await engine.sweep(now=world.now)
        await world.check()
        for ticket in world.open:
            assert await engine.store.ticket(ticket.id) is None

        assert await engine.reconcile(repair=False) == []
        await ledger_matches_counters(world)
        return world
    finally:
        await engine.close()


async def ledger_matches_counters(world: World) -> None:
    """The counters' used amounts, recomputed from the ledger rows' own usage figures."""
    engine = world.engine
    events = await engine.store.events(EventQuery())
    assert len({e.ticket_id for e in events}) == len(events)
    assert all(e.status in ("settled", "expired") for e in events)
    assert all(e.estimated == (e.status == "expired") for e in events)
    tokens: dict[str, int] = defaultdict(int)
    requests: dict[str, int] = defaultdict(int)
    gpt4o_credits: dict[str, int] = defaultdict(int)
    for event in events:
        tokens[event.user_id] += event.total_tokens
        requests[event.user_id] += 1
        if event.model == "gpt-4o":
            gpt4o_credits[event.user_id] += event.credits
    assert world.now < START + timedelta(days=1) - timedelta(minutes=30)  # one calendar day
    for user in USERS:
        statuses = {(s.label, s.window.spec): s for s in await engine.status(user, now=world.now)}
        day = next(
            s for (label, spec), s in statuses.items() if spec == "day" and "allowance" in label
        )
        assert (day.used, day.reserved) == (tokens[user], 0)
        model = statuses[("model gpt-4o per user", "day")]
        assert (model.used, model.reserved) == (gpt4o_credits[user], 0)
    total_gpt4o_tokens = sum(e.total_tokens for e in events if e.model == "gpt-4o")
    shared = [key for key, (_, label) in world.holds.items() if label == "model gpt-4o"]
    if shared:
        [key] = shared
        assert await engine.store.counters([key]) == {key: (total_gpt4o_tokens, 0)}
    assert total_gpt4o_tokens <= 9_000
    assert sum(requests.values()) == len(events)


@dataclass
class Dirs:
    made: list[str] = field(default_factory=list)

    def fresh(self) -> Path:
        directory = tempfile.mkdtemp(prefix="quotagate-prop-")
        self.made.append(directory)
        return Path(directory)

    def clean(self) -> None:
        for directory in self.made:
            shutil.rmtree(directory, ignore_errors=True)


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts)
def test_strict_mode_never_overspends_and_counters_equal_the_ledger(
    backend: Any, script: list[list[tuple[Any, ...]]]
) -> None:
    dirs = Dirs()
    try:
        world = asyncio.run(scenario(backend.url(dirs.fresh()), script))
    finally:
        dirs.clean()
    assert world.steps >= sum(len(ops) for ops in script)


def test_the_property_test_really_reaches_the_limits(backend: Any) -> None:
    """A fixed heavy script: many tasks admitting big requests must be refused some of the
    time, or the property above would prove nothing."""
    heavy: list[list[tuple[Any, ...]]] = [
        [("admit", n % 3, n % 2, 400, 900), ("tick", 5)] * 6 for n in range(8)
    ]
    heavy.append([("tick", 200), ("tick", 200), ("sweep",), ("admit", 0, 0, 10, 10)])
    directory = tempfile.mkdtemp(prefix="quotagate-prop-")
    try:
        world = asyncio.run(scenario(backend.url(Path(directory)), heavy))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert world.refused > 0 and world.admitted > 0 and world.swept > 0
