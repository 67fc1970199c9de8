"""The engine's accounting rules (issue 2), each driven through admit / settle / cancel /
sweep / status on every store backend, with time given by the `now=` parameters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from quotagate.core.errors import InvalidInput, QuotaExceeded, UnknownModel, UnknownTicket
from quotagate.core.limits import MICRO, Metric
from quotagate.core.pricing import Price, Usage, price_from_record
from quotagate.engine import AdmitContext, Engine, Ticket
from quotagate.store.base import EventQuery

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)  # a Monday morning
EARLY = datetime(2025, 1, 1, tzinfo=UTC)
NEXT_DAY = datetime(2025, 6, 3, 0, 0, tzinfo=UTC)


def ctx(user: str = "alice", model: str = "gpt-4o", **fields: Any) -> AdmitContext:
    fields.setdefault("prompt_tokens", 100)
    fields.setdefault("max_tokens", 100)
    return AdmitContext(user=user, model=model, **fields)


def gpt4o_price(output: int = 10_000, effective: datetime = EARLY) -> Price:
    """$2.50 / $10 per 1M tokens at 1,000 credits per USD: 2,500 and 10,000 micro-credits
    per input and output token."""
    return Price(
        model="gpt-4o",
        input_credits=Decimal(2_500),
        per_input_tokens=1_000_000,
        output_credits=Decimal(output),
        per_output_tokens=1_000_000,
        effective_from=effective,
    )


async def run(
    engine: Engine,
    context: AdmitContext,
    usage: tuple[int, int] | None = None,
    at: datetime = T0,
) -> Ticket:
    """Admit and settle (at the ticket's full reservation unless `usage` is given)."""
    ticket = await engine.admit(context, now=at)
    used = usage or (ticket.prompt_tokens, ticket.max_tokens)
    await engine.settle(ticket, Usage(*used), now=at)
    return ticket


async def refused(engine: Engine, context: AdmitContext, at: datetime = T0) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        await engine.admit(context, now=at)
    return caught.value


async def ledger(engine: Engine, **query: Any) -> list:
    return await engine.store.events(EventQuery(**query))


async def status_of(engine: Engine, user: str, at: datetime = T0) -> dict[str, Any]:
    return {f"{s.label} / {s.window.spec}": s for s in await engine.status(user, now=at)}


# -- allowances --------------------------------------------------------------------------


async def test_role_allowances_per_day(engine: Engine) -> None:
    cat = engine.catalog
    cat.set_limit("role", "user", "tokens", "day", 10_000)
    cat.set_limit("role", "premium", "tokens", "day", 50_000)
    cat.set_limit("role", "admin", "tokens", "day", None)
    cat.ensure_user("ursula", "user")
    cat.ensure_user("paul", "premium")
    cat.ensure_user("ada", "admin")

    ask: dict[str, Any] = {"prompt_tokens": 1_000, "max_tokens": 100_000}
    assert (await engine.admit(ctx("ursula", **ask), now=T0)).max_tokens == 9_000
    assert (await engine.admit(ctx("paul", **ask), now=T0)).max_tokens == 49_000
    admin = await engine.admit(ctx("ada", **ask), now=T0)
    assert admin.max_tokens == 100_000 and not admin.clamped

    error = await refused(engine, ctx("ursula", prompt_tokens=1, max_tokens=1))
    assert error.limit == "role user allowance"
    assert error.remaining == 0
    assert error.resets_at == NEXT_DAY
    # the admin may go on and on
    await run(engine, ctx("ada", prompt_tokens=10**6, max_tokens=10**6))


async def test_role_allowance_per_hour_binds_before_the_daily_one(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    engine.catalog.set_limit("role", "user", "tokens", "hour", 1_000)
    ticket = await run(engine, ctx(prompt_tokens=200, max_tokens=5_000))
    assert ticket.max_tokens == 800

    error = await refused(engine, ctx(prompt_tokens=1, max_tokens=1), T0 + timedelta(minutes=59))
    assert error.refusal.window == "hour"
    assert error.resets_at == T0 + timedelta(hours=1)

    later = await run(engine, ctx(prompt_tokens=200, max_tokens=5_000), at=T0 + timedelta(hours=1))
    assert later.max_tokens == 800
    status = await status_of(engine, "alice", T0 + timedelta(hours=1))
    assert status["role user allowance / day"].used == 2_000
    assert status["role user allowance / hour"].used == 1_000


async def test_base_plus_groups_add_up(engine: Engine) -> None:
    cat = engine.catalog
    cat.set_limit("everyone", "*", "tokens", "day", 1_000)
    cat.set_limit("group", "A", "tokens", "day", 500)
    cat.set_limit("group", "B", "tokens", "day", 300)
    cat.ensure_user("both", groups=["A", "B"])
    cat.ensure_user("only-a", groups=["A"])

    big: dict[str, Any] = {"prompt_tokens": 0, "max_tokens": 10_000}
    assert (await engine.admit(ctx("both", **big), now=T0)).max_tokens == 1_800
    assert (await engine.admit(ctx("only-a", **big), now=T0)).max_tokens == 1_500
    assert (await engine.admit(ctx("nobody", **big), now=T0)).max_tokens == 1_000
    # groups named by the front door (e.g. Open WebUI's groups) count the same way
    via_ctx = await engine.admit(ctx("dora", groups=["B"], **big), now=T0)
    assert via_ctx.max_tokens == 1_300
    assert via_ctx.holds[0].label == "base + group B allowance"


async def test_a_role_default_replaces_the_base(engine: Engine) -> None:
    engine.catalog.set_limit("everyone", "*", "tokens", "day", 1_000)
    engine.catalog.set_limit("role", "premium", "tokens", "day", 5_000)
    engine.catalog.set_limit("group", "A", "tokens", "day", 500)
    engine.catalog.ensure_user("paul", "premium", groups=["A"])
    big: dict[str, Any] = {"prompt_tokens": 0, "max_tokens": 10_000}
    assert (await engine.admit(ctx("paul", **big), now=T0)).max_tokens == 5_500
    assert (await engine.admit(ctx("ursula", **big), now=T0)).max_tokens == 1_000


async def test_a_user_override_replaces_role_base_and_groups(engine: Engine) -> None:
    cat = engine.catalog
    cat.set_limit("everyone", "*", "tokens", "day", 1_000)
    cat.set_limit("role", "user", "tokens", "day", 2_000)
    cat.set_limit("group", "A", "tokens", "day", 500)
    cat.ensure_user("carol", groups=["A"])
    await run(engine, ctx("carol", prompt_tokens=0, max_tokens=100))

    cat.set_limit("user", "carol", "tokens", "day", 250)
    ticket = await engine.admit(ctx("carol", prompt_tokens=0, max_tokens=10_000), now=T0)
    # the override counts on the same counter: 100 already used today
    assert ticket.max_tokens == 150
    assert [h.label for h in ticket.holds] == ["user carol override allowance"]

    cat.set_limit("user", "carol", "tokens", "day", None)  # unlimited override
    assert (await engine.admit(ctx("carol", max_tokens=10**9), now=T0)).max_tokens == 10**9


async def test_model_limit_per_user(engine: Engine) -> None:
    engine.catalog.set_limit("model", "gpt-4o", "tokens", "day", 20_000)
    first = await run(engine, ctx(prompt_tokens=500, max_tokens=50_000))
    assert first.max_tokens == 19_500
    error = await refused(engine, ctx(prompt_tokens=1, max_tokens=1))
    assert error.limit == "model gpt-4o per user"
    assert error.resets_at == NEXT_DAY
    # other models are not bound, and other users have 20,000 of their own
    await run(engine, ctx(model="gpt-4o-mini", max_tokens=50_000))
    assert (await engine.admit(ctx("bob", max_tokens=50_000), now=T0)).max_tokens == 19_900
    # tomorrow the limit is fresh
    assert (await engine.admit(ctx(max_tokens=50_000), now=NEXT_DAY)).max_tokens == 19_900


async def test_model_limit_shared_by_everyone(engine: Engine) -> None:
    engine.catalog.set_limit("model", "gpt-4o", "requests", "day", 2, per_user=False)
    await run(engine, ctx("alice"))
    await run(engine, ctx("bob"))
    error = await refused(engine, ctx("carol"))
    assert error.limit == "model gpt-4o"


async def test_key_limits(engine: Engine) -> None:
    key, _secret = engine.catalog.create_key("alice", "laptop")
    other, _ = engine.catalog.create_key("alice", "phone")
    engine.catalog.set_limit("key", key.id, "requests", "minute", 2)
    engine.catalog.set_limit("key", key.id, "tokens", "day", 1_000)

    assert (await run(engine, ctx(key_id=key.id, max_tokens=5_000))).max_tokens == 900
    await run(engine, ctx(key_id=key.id, prompt_tokens=0, max_tokens=0))
    error = await refused(engine, ctx(key_id=key.id, prompt_tokens=0, max_tokens=0))
    assert error.limit == f"key {key.id}"
    assert error.resets_at == T0 + timedelta(minutes=1)
    # the user's other key and key-less requests are not bound by this key's limits
    await run(engine, ctx(key_id=other.id))
    await run(engine, ctx())
    # next minute: the request limit is free again, the daily token limit is spent
    error = await refused(engine, ctx(key_id=key.id, max_tokens=1), T0 + timedelta(minutes=1))
    assert error.refusal.metric == "tokens"


# -- metrics -----------------------------------------------------------------------------


async def test_input_token_limit_counts_only_the_prompt(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "input_tokens", "day", 1_000)
    ticket = await run(engine, ctx(prompt_tokens=600, max_tokens=50_000))
    assert ticket.max_tokens == 50_000  # completions are not clamped by an input limit
    await refused(engine, ctx(prompt_tokens=401))
    await run(engine, ctx(prompt_tokens=400, max_tokens=7))
    [status] = await engine.status("alice", now=T0)
    assert (status.metric, status.used, status.remaining) == (Metric.INPUT_TOKENS, 1_000, 0)


async def test_output_token_limit_counts_only_the_completion(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "output_tokens", "day", 1_000)
    ticket = await engine.admit(ctx(prompt_tokens=100_000, max_tokens=5_000), now=T0)
    assert ticket.max_tokens == 1_000
    await engine.settle(ticket, Usage(100_000, 600), now=T0)
    [status] = await engine.status("alice", now=T0)
    assert status.used == 600
    assert (await engine.admit(ctx(max_tokens=5_000), now=T0)).max_tokens == 400


async def test_request_limit(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "requests", "day", 3)
    tickets = [await engine.admit(ctx(max_tokens=10**6), now=T0) for _ in range(3)]
    assert all(t.max_tokens == 10**6 for t in tickets)  # requests do not clamp tokens
    error = await refused(engine, ctx())
    assert error.refusal.metric == "requests"
    assert await engine.cancel(tickets[0])
    fourth = await engine.admit(ctx(), now=T0)
    for ticket in (*tickets[1:], fourth):
        await engine.settle(ticket, Usage(10, 10), now=T0)
    [status] = await engine.status("alice", now=T0)
    assert (status.used, status.reserved) == (3, 0)


async def test_credit_limit_clamps_through_the_output_price(engine: Engine) -> None:
    engine.catalog.add_price(gpt4o_price())
    engine.catalog.set_limit("role", "user", "credits", "day", 1 * MICRO)
    ticket = await engine.admit(ctx(prompt_tokens=100, max_tokens=1_000), now=T0)
    # 100 prompt tokens cost 250,000 micro-credits; 750,000 left buy 75 output tokens
    assert ticket.max_tokens == 75
    assert ticket.holds[0].reserved == 1 * MICRO
    event = await engine.settle(ticket, Usage(100, 75), now=T0)
    assert event.credits == 1 * MICRO
    error = await refused(engine, ctx(prompt_tokens=1, max_tokens=1))
    assert error.refusal.metric == "credits" and error.remaining == 0


async def test_group_multiplier_scales_credits(engine: Engine) -> None:
    engine.catalog.add_price(gpt4o_price())
    engine.catalog.set_limit("role", "user", "credits", "day", 1 * MICRO)
    engine.catalog.set_multiplier("students", "0.5")
    engine.catalog.ensure_user("sam", groups=["students"])
    ticket = await engine.admit(ctx("sam", prompt_tokens=100, max_tokens=1_000), now=T0)
    assert ticket.max_tokens == 175  # (1,000,000 - 125,000) / 5,000
    event = await engine.settle(ticket, Usage(100, 50), now=T0)
    assert event.credits == 125_000 + 250_000
    full = await run(engine, ctx("alice", prompt_tokens=100, max_tokens=10), (100, 10))
    assert (await ledger(engine, user_id="alice"))[0].credits == 250_000 + 100_000
    assert full.multiplier == "1"


async def test_cached_prompt_tokens_are_charged_at_the_cached_price(engine: Engine) -> None:
    price = gpt4o_price()
    engine.catalog.add_price(
        Price(**{**price.__dict__, "cached_credits": Decimal(1_250), "per_cached_tokens": 10**6})
    )
    ticket = await engine.admit(ctx(prompt_tokens=1_000, max_tokens=10), now=T0)
    usage = {"prompt_tokens": 1_000, "completion_tokens": 10}
    event = await engine.settle(ticket, {**usage, "prompt_tokens_details": {"cached_tokens": 800}})
    assert event.cached_tokens == 800
    assert event.credits == 200 * 2_500 + 800 * 1_250 + 10 * 10_000


# -- strict and optimistic modes ---------------------------------------------------------


async def test_strict_never_lets_a_response_push_over(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 1_000)
    ticket = await engine.admit(ctx(prompt_tokens=100, max_tokens=5_000), now=T0)
    assert ticket.clamped and ticket.max_tokens == 900 and ticket.requested_max_tokens == 5_000
    # while it is in flight nothing else fits
    error = await refused(engine, ctx(prompt_tokens=0, max_tokens=1))
    assert (error.refusal.used, error.refusal.reserved) == (0, 1_000)
    await engine.settle(ticket, Usage(100, 300), now=T0)
    assert (await engine.admit(ctx(prompt_tokens=0, max_tokens=5_000), now=T0)).max_tokens == 600


async def test_usage_beyond_the_reservation_is_recorded_and_reported(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 1_000)
    ticket = await engine.admit(ctx(prompt_tokens=100, max_tokens=5_000), now=T0)
    assert ticket.max_tokens == 900
    # the upstream counted more prompt tokens than the estimate: the ledger keeps the truth,
    # the limit is charged what the ticket held on it and never passes its amount
    event = await engine.settle(ticket, Usage(130, 900), now=T0)
    assert (event.total_tokens, event.excess) == (1_030, 30)
    assert [amount for _, amount in event.charges] == [1_000]
    assert "30 more than the 100 + 900 reserved (prompt over)" in caplog.text
    [status] = await engine.status("alice", now=T0)
    assert (status.used, status.remaining) == (1_000, 0)
    await refused(engine, ctx(prompt_tokens=0, max_tokens=1))
    assert await engine.reconcile(repair=False) == []


async def test_an_overlong_answer_charges_every_limit_at_most_what_it_held(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Credits and tokens alike: the counters stop at their amounts, the ledger keeps the
    upstream's report (tokens and credits) and the tokens over, named as the completion."""
    engine.catalog.add_price(gpt4o_price())
    engine.catalog.set_limit("role", "user", "credits", "day", 1 * MICRO)
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    ticket = await engine.admit(ctx(prompt_tokens=100, max_tokens=1_000), now=T0)
    assert ticket.max_tokens == 75
    event = await engine.settle(ticket, Usage(100, 500), now=T0)
    assert (event.completion_tokens, event.excess) == (500, 425)
    assert event.credits == 250_000 + 500 * 10_000
    assert [amount for _, amount in event.charges] == [h.reserved for h in ticket.holds]
    assert "(completion over)" in caplog.text
    for status in await engine.status("alice", now=T0):
        assert status.used + status.reserved <= (status.amount or 0)
    assert await engine.reconcile(repair=False) == []


async def test_optimistic_admits_while_one_unit_is_left(make_engine: Any) -> None:
    engine = make_engine(mode="optimistic")
    engine.catalog.set_limit("role", "user", "tokens", "day", 1_000)
    first = await engine.admit(ctx(prompt_tokens=100, max_tokens=5_000), now=T0)
    assert first.max_tokens == 5_000 and not first.clamped
    await engine.settle(first, Usage(100, 899), now=T0)
    second = await engine.admit(ctx(prompt_tokens=100, max_tokens=5_000), now=T0)  # 1 left
    await engine.settle(second, Usage(100, 400), now=T0)
    error = await refused(engine, ctx(prompt_tokens=1, max_tokens=1))
    assert error.refusal.used == 1_499 and error.remaining == 0
    # the ledger keeps the truth, overspend included
    assert sum(e.total_tokens for e in await ledger(engine)) == 1_499


async def test_default_max_tokens_is_reserved_when_none_is_given(make_engine: Any) -> None:
    engine = make_engine(default_max_tokens=300)
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    ticket = await engine.admit(ctx(max_tokens=None, prompt_tokens=50), now=T0)
    assert ticket.max_tokens == 300 and ticket.requested_max_tokens == 300
    [status] = await engine.status("alice", now=T0)
    assert status.reserved == 350
    # embeddings produce no output: only the prompt is reserved
    embedding = await engine.admit(ctx(max_tokens=None, produces_output=False), now=T0)
    assert embedding.max_tokens == 0 and embedding.holds[0].reserved == 100


async def test_the_prompt_is_counted_from_messages(make_engine: Any) -> None:
    engine = make_engine()
    engine.catalog.set_limit("role", "user", "input_tokens", "day", 10_000)
    text = "x" * 3_000
    ticket = await engine.admit(
        AdmitContext(
            user="alice",
            model="some-local-model",  # no tokenizer known: the conservative estimate
            messages=[{"role": "user", "content": text}],
            max_tokens=10,
        ),
        now=T0,
    )
    assert ticket.prompt_tokens >= 1_000
    assert ticket.holds[0].reserved == ticket.prompt_tokens


# -- pools and wallets -------------------------------------------------------------------


async def test_pool_named_by_the_request_replaces_the_allowance(engine: Engine) -> None:
    cat = engine.catalog
    cat.set_limit("role", "user", "tokens", "day", 100)
    cat.set_pool("research")
    cat.set_limit("pool", "research", "tokens", "lifetime", 10_000, per_user=False)
    cat.set_limit("pool", "research", "tokens", "day", 3_000, per_user=True)

    ticket = await engine.admit(ctx(pool="research", prompt_tokens=0, max_tokens=9_999), now=T0)
    assert (ticket.source, ticket.pool, ticket.max_tokens) == ("pool", "research", 3_000)
    event = await engine.settle(ticket, Usage(0, 3_000), now=T0)
    assert (event.source, event.pool) == ("pool", "research")

    status = await status_of(engine, "alice")
    assert status["role user allowance / day"].used == 0  # the allowance was not touched
    assert status["pool research per user / day"].used == 3_000
    assert status["pool research / lifetime"].used == 3_000
    # the per-user daily cap binds alice, then the total cap binds everyone
    error = await refused(engine, ctx(pool="research"))
    assert error.limit == "pool research per user"
    for user in ("bob", "carol"):
        await run(engine, ctx(user, pool="research", prompt_tokens=0, max_tokens=9_999))
    last = await engine.admit(
        ctx("dan", pool="research", prompt_tokens=0, max_tokens=9_999), now=T0
    )
    assert last.max_tokens == 1_000
    await engine.settle(last, Usage(0, 1_000), now=T0)
    error = await refused(engine, ctx("erin", pool="research"), NEXT_DAY)
    assert error.limit == "pool research" and error.resets_at is None
    # without the pool, the user's own allowance applies as before
    assert (
        await engine.admit(ctx("erin", prompt_tokens=0, max_tokens=999), now=T0)
    ).max_tokens == 100


async def test_a_model_bound_to_a_pool_draws_from_it(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 100)
    engine.catalog.set_pool("sponsored", models=["llama-70b"])
    engine.catalog.set_limit("pool", "sponsored", "tokens", "day", 5_000, per_user=True)
    ticket = await engine.admit(ctx(model="llama-70b", max_tokens=9_999), now=T0)
    assert (ticket.source, ticket.pool, ticket.max_tokens) == ("pool", "sponsored", 4_900)
    other = await engine.admit(ctx(model="gpt-4o", prompt_tokens=10, max_tokens=9_999), now=T0)
    assert (other.source, other.pool, other.max_tokens) == ("allowance", None, 90)


async def test_a_pool_open_to_some_groups_refuses_others(engine: Engine) -> None:
    engine.catalog.set_pool("lab", groups=["physics"])
    engine.catalog.ensure_user("phil", groups=["physics"])
    await run(engine, ctx("phil", pool="lab"))
    with pytest.raises(InvalidInput, match="may not draw from pool"):
        await engine.admit(ctx("alice", pool="lab"), now=T0)
    with pytest.raises(InvalidInput, match="unknown pool"):
        await engine.admit(ctx("alice", pool="no-such-pool"), now=T0)


async def test_wallet_is_drawn_only_after_the_allowance_is_used_up(engine: Engine) -> None:
    cat = engine.catalog
    cat.add_price(gpt4o_price())
    cat.set_limit("role", "user", "tokens", "day", 1_000)
    cat.top_up("alice", 5 * MICRO, "prepaid")

    for _ in range(2):
        ticket = await run(engine, ctx(prompt_tokens=100, max_tokens=400))
        assert ticket.source == "allowance"
    assert {e.source for e in await ledger(engine)} == {"allowance"}
    status = await status_of(engine, "alice")
    assert status["wallet of alice / lifetime"].used == 0

    paid = await engine.admit(ctx(prompt_tokens=100, max_tokens=400), now=T0)
    assert paid.source == "wallet" and paid.max_tokens == 400
    event = await engine.settle(paid, Usage(100, 400), now=T0)
    assert event.source == "wallet" and event.credits == 250_000 + 4_000_000
    status = await status_of(engine, "alice")
    assert status["role user allowance / day"].used == 1_000  # unchanged by the paid call
    assert status["wallet of alice / lifetime"].used == 4_250_000
    assert status["wallet of alice / lifetime"].remaining == 750_000
    assert status["wallet of alice / lifetime"].resets_at is None

    # 750,000 left: 100 prompt tokens (250,000) and 50 output tokens; then the wallet is dry
    assert (await run(engine, ctx(prompt_tokens=100, max_tokens=400))).max_tokens == 50
    error = await refused(engine, ctx(prompt_tokens=100, max_tokens=400))
    assert error.limit == "role user allowance"  # the periodic allowance is what ran out

    cat.top_up("alice", 1 * MICRO, "more")
    assert (await engine.admit(ctx(prompt_tokens=100, max_tokens=400), now=T0)).source == "wallet"
    # tomorrow the allowance is fresh and is used first again
    assert (await engine.admit(ctx(prompt_tokens=100, max_tokens=400), now=NEXT_DAY)).source == (
        "allowance"
    )


# -- prices ------------------------------------------------------------------------------


async def test_a_price_change_applies_from_its_effective_time_and_never_reprices(
    engine: Engine,
) -> None:
    change = T0 + timedelta(hours=1)
    engine.catalog.add_price(gpt4o_price(output=10_000))
    engine.catalog.add_price(gpt4o_price(output=20_000, effective=change))

    before = await engine.settle(await engine.admit(ctx(), now=T0), Usage(100, 100), now=T0)
    in_flight = await engine.admit(ctx(), now=change - timedelta(seconds=1))
    after = await engine.settle(await engine.admit(ctx(), now=change), Usage(100, 100), now=change)
    late = await engine.settle(in_flight, Usage(100, 100), now=change + timedelta(minutes=5))

    assert before.credits == 250_000 + 1_000_000
    assert after.credits == 250_000 + 2_000_000
    assert late.credits == before.credits  # priced when it was admitted
    # a later price change rewrites nothing already in the ledger
    engine.catalog.add_price(gpt4o_price(output=99_000, effective=T0 - timedelta(days=1)))
    rows = {e.ticket_id: e.credits for e in await ledger(engine)}
    assert rows == {
        before.ticket_id: 1_250_000,
        after.ticket_id: 2_250_000,
        late.ticket_id: 1_250_000,
    }


async def test_a_provider_prefix_finds_the_price(engine: Engine) -> None:
    engine.catalog.add_price(gpt4o_price())
    event = await engine.settle(
        await engine.admit(ctx(model="openai/gpt-4o"), now=T0), Usage(100, 100), now=T0
    )
    assert event.credits == 1_250_000


async def test_unknown_models_are_priced_by_the_default_never_free(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "credits", "day", 10 * MICRO)
    ticket = await engine.admit(ctx(model="mystery-model"), now=T0)
    assert ticket.holds[0].reserved > 0
    event = await engine.settle(ticket, Usage(1_000, 1_000), now=T0)
    # defaults: 10,000 / 30,000 credits per 1M tokens
    assert event.credits == 1_000 * 10_000 + 1_000 * 30_000


async def test_unknown_models_can_be_refused(make_engine: Any) -> None:
    engine = make_engine(unknown_models="refuse")
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    engine.catalog.add_price(gpt4o_price())
    with pytest.raises(UnknownModel, match="mystery-model"):
        await engine.admit(ctx(model="mystery-model"), now=T0)
    assert await ledger(engine) == []
    [status] = await engine.status("alice", now=T0)
    assert (status.used, status.reserved) == (0, 0)
    await run(engine, ctx(model="gpt-4o"))


# -- settle / cancel / sweep -------------------------------------------------------------


async def test_settle_twice_writes_one_ledger_row(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    ticket = await engine.admit(ctx(), now=T0)
    first = await engine.settle(ticket, Usage(100, 50), now=T0)
    again = await engine.settle(ticket, Usage(100, 99), now=T0)
    by_id = await engine.settle(ticket.id, {"prompt_tokens": 1, "completion_tokens": 1}, now=T0)
    assert first.id == again.id == by_id.id
    assert again.completion_tokens == 50 and by_id.completion_tokens == 50
    assert len(await ledger(engine)) == 1
    [status] = await engine.status("alice", now=T0)
    assert (status.used, status.reserved) == (150, 0)


async def test_settle_accepts_the_ticket_or_its_id(engine: Engine) -> None:
    engine.catalog.add_price(gpt4o_price())
    engine.catalog.set_limit("role", "user", "credits", "day", 10 * MICRO)
    as_object = await engine.admit(ctx(), now=T0)
    as_id = await engine.admit(ctx(), now=T0)
    one = await engine.settle(as_object, Usage(100, 80), now=T0)
    two = await engine.settle(as_id.id, Usage(100, 80), now=T0)
    assert one.credits == two.credits == 1_050_000
    assert one.charges[0][1] == two.charges[0][1] == 1_050_000
    with pytest.raises(UnknownTicket):
        await engine.settle("no-such-ticket", Usage(1, 1), now=T0)


async def test_cancel_charges_nothing(engine: Engine) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 1_000)
    engine.catalog.set_limit("role", "user", "requests", "day", 10)
    ticket = await engine.admit(ctx(max_tokens=5_000), now=T0)
    assert await engine.cancel(ticket)
    assert not await engine.cancel(ticket.id)
    assert await ledger(engine) == []
    assert all((s.used, s.reserved) == (0, 0) for s in await engine.status("alice", now=T0))
    with pytest.raises(UnknownTicket):
        await engine.settle(ticket, Usage(100, 100), now=T0)
    with pytest.raises(UnknownTicket):
        await engine.settle(ticket.id, Usage(100, 100), now=T0)
    assert await ledger(engine) == []


async def test_sweep_charges_expired_tickets_at_their_reservation(make_engine: Any) -> None:
    engine = make_engine(lease_seconds=60)
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    engine.catalog.set_limit("role", "user", "requests", "day", 10)
    ticket = await engine.admit(ctx(prompt_tokens=100, max_tokens=200), now=T0)
    settled = await engine.admit(ctx(), now=T0)
    await engine.settle(settled, Usage(10, 10), now=T0)

    assert await engine.sweep(now=T0 + timedelta(seconds=59)) == []
    [event] = await engine.sweep(now=T0 + timedelta(seconds=60))
    assert (event.ticket_id, event.status, event.estimated) == (ticket.id, "expired", True)
    assert (event.prompt_tokens, event.completion_tokens) == (100, 200)
    tokens = (await status_of(engine, "alice"))["role user allowance / day"]
    assert (tokens.metric, tokens.used, tokens.reserved) == (Metric.TOKENS, 320, 0)
    assert await engine.sweep(now=T0 + timedelta(hours=1)) == []

    # the real usage arriving after the sweeper charged the ticket changes nothing
    late = await engine.settle(ticket, Usage(100, 5), now=T0 + timedelta(minutes=2))
    late_by_id = await engine.settle(ticket.id, Usage(100, 5), now=T0 + timedelta(minutes=2))
    assert late.id == late_by_id.id == event.id and late.status == "expired"
    assert len(await ledger(engine)) == 2
    status = await status_of(engine, "alice")
    assert status["role user allowance / day"].used == 320
    assert not await engine.cancel(ticket)


async def test_sweep_can_release_instead(make_engine: Any) -> None:
    engine = make_engine(lease_seconds=60, on_expiry="release")
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    engine.catalog.set_limit("role", "user", "requests", "day", 10)
    engine.catalog.add_price(gpt4o_price())
    ticket = await engine.admit(ctx(prompt_tokens=100, max_tokens=200), now=T0)
    [event] = await engine.sweep(now=T0 + timedelta(minutes=5))
    assert (event.ticket_id, event.status, event.estimated) == (ticket.id, "released", True)
    assert (event.total_tokens, event.credits) == (0, 0)
    assert all(amount == 0 for _, amount in event.charges)
    assert all((s.used, s.reserved) == (0, 0) for s in await engine.status("alice", now=T0))


class _OthersActDuringSweep:
    """The real store, with one interleaving forced: right after the sweeper has listed the
    expired tickets, another client cancels the first and settles the second (what another
    process may do between the sweeper's two steps)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.real = engine.store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def expired(self, now: float, limit: int = 500) -> list:
        due = await self.real.expired(now, limit)
        assert len(due) == 3
        assert await self.real.release(due[0].id)
        await self.engine.settle(due[1].id, Usage(10, 10))
        return due


async def test_sweep_survives_tickets_ended_by_others_meanwhile(make_engine: Any) -> None:
    engine = make_engine(lease_seconds=60)
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    tickets = [await engine.admit(ctx(), now=T0 + timedelta(seconds=n)) for n in range(3)]
    engine.store = _OthersActDuringSweep(engine)
    [event] = await engine.sweep(now=T0 + timedelta(minutes=5))
    assert (event.ticket_id, event.status) == (tickets[2].id, "expired")
    rows = {e.ticket_id: e.status for e in await ledger(engine)}
    assert rows == {tickets[1].id: "settled", tickets[2].id: "expired"}
    assert await engine.reconcile(repair=False) == []


# -- refusals and status -----------------------------------------------------------------


async def test_quota_exceeded_names_the_limit_what_is_left_and_the_exact_reset(
    make_engine: Any,
) -> None:
    engine = make_engine(timezone="Europe/Berlin")
    engine.catalog.set_limit("role", "user", "tokens", "day", 1_000, reset_hour=4)
    berlin = ZoneInfo("Europe/Berlin")
    # Saturday before the spring change; the window runs to Sunday 04:00 CEST (02:00 UTC)
    at = datetime(2025, 3, 29, 22, 0, tzinfo=berlin)
    await run(engine, ctx(prompt_tokens=100, max_tokens=800), (100, 800), at)
    error = await refused(engine, ctx(prompt_tokens=101, max_tokens=1), at)
    assert error.limit == "role user allowance"
    assert error.remaining == 100
    assert error.resets_at == datetime(2025, 3, 30, 4, 0, tzinfo=berlin)
    assert error.resets_at == datetime(2025, 3, 30, 2, 0, tzinfo=UTC)
    assert error.refusal.requested == 102
    assert "100 left" in str(error) and "2025-03-30T02:00:00+00:00" in str(error)
    # 03:59 local on Sunday is still the same window; 04:00 is a new one
    await refused(engine, ctx(prompt_tokens=101), datetime(2025, 3, 30, 3, 59, tzinfo=berlin))
    await run(engine, ctx(prompt_tokens=101), at=datetime(2025, 3, 30, 4, 0, tzinfo=berlin))


async def test_status_lists_used_reserved_left_and_resets(engine: Engine) -> None:
    cat = engine.catalog
    cat.add_price(gpt4o_price())
    cat.set_limit("role", "user", "tokens", "day", 10_000)
    cat.set_limit("role", "user", "credits", "month", 50 * MICRO)
    cat.set_limit("model", "gpt-4o", "requests", "hour", 30)
    await run(engine, ctx(prompt_tokens=100, max_tokens=400), (100, 300))
    await engine.admit(ctx(prompt_tokens=100, max_tokens=400), now=T0)

    status = await status_of(engine, "alice")
    tokens = status["role user allowance / day"]
    assert (tokens.amount, tokens.used, tokens.reserved, tokens.remaining) == (
        10_000,
        400,
        500,
        9_100,
    )
    assert tokens.resets_at == NEXT_DAY
    credits = status["role user allowance / month"]
    assert credits.used == 250_000 + 3_000_000
    assert credits.reserved == 250_000 + 4_000_000
    assert credits.resets_at == datetime(2025, 7, 1, tzinfo=UTC)
    model = status["model gpt-4o per user / hour"]
    assert (model.used, model.reserved, model.remaining) == (1, 1, 28)
    assert model.resets_at == T0 + timedelta(hours=1)
    # unlimited allowances are listed too, with nothing to compute as left
    cat.set_limit("role", "user", "requests", "day", None)
    [unlimited] = [
        s
        for s in await engine.status("alice", now=T0)
        if s.metric is Metric.REQUESTS and s.label == "role user allowance"
    ]
    assert (unlimited.amount, unlimited.remaining) == (None, None)


# -- bad input ---------------------------------------------------------------------------


async def _snapshot(engine: Engine) -> tuple:
    return (
        [(e.ticket_id, e.charges) for e in await ledger(engine)],
        [
            (s.label, s.window.spec, s.used, s.reserved)
            for s in await engine.status("alice", now=T0)
        ],
        await engine.store.reconcile(repair=False),
    )


BAD_CONTEXTS = {
    "negative prompt": {"prompt_tokens": -1},
    "fractional prompt": {"prompt_tokens": 1.5},
    "bool prompt": {"prompt_tokens": True},
    "string prompt": {"prompt_tokens": "100"},
    "absurd prompt": {"prompt_tokens": 10**16},
    "negative max_tokens": {"max_tokens": -5},
    "fractional max_tokens": {"max_tokens": 2.5},
    "bool max_tokens": {"max_tokens": False},
    "absurd max_tokens": {"max_tokens": 10**18},
    "messages as text": {"prompt_tokens": None, "messages": "hello"},
    "message not an object": {"prompt_tokens": None, "messages": ["hello"]},
    "message content a number": {
        "prompt_tokens": None,
        "messages": [{"role": "user", "content": 5}],
    },
    "message without role": {"prompt_tokens": None, "messages": [{"content": "hi"}]},
    "prompt not text": {"prompt_tokens": None, "prompt": 42},
    "empty user": {"user": ""},
    "empty model": {"model": ""},
}


@pytest.mark.parametrize("bad", BAD_CONTEXTS.values(), ids=BAD_CONTEXTS.keys())
async def test_bad_admit_input_is_refused_and_changes_nothing(
    engine: Engine, bad: dict[str, Any]
) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    await run(engine, ctx(), (100, 50))
    pending = await engine.admit(ctx(), now=T0)
    before = await _snapshot(engine)
    fields = {"user": "alice", "model": "gpt-4o", "prompt_tokens": 100, "max_tokens": 100, **bad}
    with pytest.raises(InvalidInput):
        await engine.admit(AdmitContext(**fields), now=T0)
    assert await _snapshot(engine) == before
    await engine.settle(pending, Usage(100, 100), now=T0)


BAD_USAGE = {
    "negative": {"prompt_tokens": -1, "completion_tokens": 5},
    "fractional": {"prompt_tokens": 10, "completion_tokens": 5.5},
    "bool": {"prompt_tokens": True, "completion_tokens": 5},
    "text": {"prompt_tokens": "10", "completion_tokens": 5},
    "absurd": {"prompt_tokens": 10, "completion_tokens": 10**16},
    "not a mapping": ["prompt_tokens", 10],
}


@pytest.mark.parametrize("usage", BAD_USAGE.values(), ids=BAD_USAGE.keys())
async def test_bad_usage_is_refused_and_the_ticket_stays_open(engine: Engine, usage: Any) -> None:
    engine.catalog.set_limit("role", "user", "tokens", "day", 10_000)
    ticket = await engine.admit(ctx(), now=T0)
    before = await _snapshot(engine)
    with pytest.raises(InvalidInput):
        await engine.settle(ticket, usage, now=T0)
    with pytest.raises(InvalidInput):
        await engine.settle(ticket.id, usage, now=T0)
    assert await _snapshot(engine) == before
    event = await engine.settle(ticket, Usage(100, 10), now=T0)
    assert event.total_tokens == 110


async def test_bad_limits_and_prices_are_refused(engine: Engine) -> None:
    cat = engine.catalog
    with pytest.raises(InvalidInput, match="unknown window"):
        cat.set_limit("role", "user", "tokens", "fortnight", 10)
    with pytest.raises(InvalidInput, match="unknown metric"):
        cat.set_limit("role", "user", "words", "day", 10)
    with pytest.raises(InvalidInput, match="unknown scope"):
        cat.set_limit("planet", "earth", "tokens", "day", 10)
    for amount in (-1, 1.5, True, 10**16):
        with pytest.raises(InvalidInput):
            cat.set_limit("role", "user", "tokens", "day", amount)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        cat.set_limit("role", "user", "tokens", "day", 10, reset_hour=24)
    with pytest.raises(InvalidInput, match="timezone"):
        cat.set_limit("role", "user", "tokens", "day", 10, timezone="Mars/Olympus")
    with pytest.raises(InvalidInput):
        cat.top_up("alice", True)
    with pytest.raises(InvalidInput):
        cat.top_up("alice", 2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        price_from_record({"id": "m", "input_cost_credits": "cheap", "output_cost_credits": 1})
    assert cat.limits() == [] and cat.prices() == []
    assert cat.wallet_funded("alice") == 0


async def test_a_naive_now_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="timezone"):
        await engine.admit(ctx(), now=datetime(2025, 6, 2, 10, 0))
    assert await ledger(engine) == []
