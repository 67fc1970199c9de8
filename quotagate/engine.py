"""admit → settle / cancel: the one path every front door takes.

`admit` resolves every limit that applies to a request, turns each into a
:class:`~quotagate.core.decisions.Hold` and asks the store to reserve them all in one
atomic step. `settle` replaces the reservation by the usage the model reported and writes
exactly one ledger row; `cancel` releases it; `sweep` settles tickets whose lease ran out.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from quotagate.config import Settings
from quotagate.core.decisions import Hold
from quotagate.core.errors import (
    InvalidInput,
    QuotaExceeded,
    Refusal,
    UnknownModel,
    UnknownTicket,
)
from quotagate.core.limits import Limit, Metric, Scope, check_amount
from quotagate.core.policy import Policy, User
from quotagate.core.pricing import Price, Usage, price_from_record, price_to_record
from quotagate.core.tokens import TokenCounter
from quotagate.core.windows import Window, parse_window
from quotagate.store.base import CounterDiff, CounterStore, StoredTicket, UsageEvent
from quotagate.store.catalog import Catalog

log = logging.getLogger("quotagate.engine")

LIFETIME = parse_window("lifetime")


@dataclass
class AdmitContext:
    """Who asks for what. Give `messages`, `prompt` or an already counted `prompt_tokens`."""

    user: str
    model: str
    messages: Sequence[Mapping[str, Any]] | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    key_id: str | None = None
    channel: str | None = None
    pool: str | None = None
    produces_output: bool = True  # False for embeddings
    role: str | None = None  # applied when the user is first seen
    groups: Sequence[str] | None = None


class TicketHold(BaseModel):
    key: str
    metric: Metric
    reserved: int
    limit: int | None
    label: str


class Ticket(BaseModel):
    """A reservation. Hand it (or its id) back to settle or cancel."""

    id: str
    user_id: str
    model: str
    key_id: str | None = None
    channel: str | None = None
    pool: str | None = None
    source: str = "allowance"
    prompt_tokens: int
    max_tokens: int
    requested_max_tokens: int
    started_at: float
    expires_at: float
    holds: list[TicketHold]
    price: dict[str, Any] | None = None
    multiplier: str = "1"

    @property
    def clamped(self) -> bool:
        return self.max_tokens < self.requested_max_tokens

    def filled(self, max_output: int, amounts: Sequence[int]) -> Ticket:
        """This ticket with the store's decision: the clamped completion and what each
        counter holds."""
        holds = [h.model_copy(update={"reserved": a}) for h, a in zip(self.holds, amounts)]
        return self.model_copy(update={"max_tokens": max_output, "holds": holds})


@dataclass
class LimitStatus:
    """One limit as it binds a user now."""

    label: str
    metric: Metric
    window: Window
    amount: int | None
    used: int
    reserved: int
    resets_at: datetime | None

    @property
    def remaining(self) -> int | None:
        if self.amount is None:
            return None
        return max(0, self.amount - self.used - self.reserved)


@dataclass
class _Spec:
    """A limit as it applies to one request: where it counts and how much it allows."""

    prefix: str
    metric: Metric
    window: Window
    amount: int | None
    label: str

    def keys(self, at: datetime) -> tuple[str, tuple[str, ...], int | None]:
        bucket, _ = self.window.bucket(at)
        counted = tuple(
            f"{self.prefix}|{self.window.key}|{b}" for b in self.window.counted_buckets(at)
        )
        return f"{self.prefix}|{self.window.key}|{bucket}", counted, self.window.expires_at(bucket)


@dataclass
class _Option:
    source: str
    specs: list[_Spec] = field(default_factory=list)


class Engine:
    def __init__(self, store: CounterStore, catalog: Catalog, settings: Settings) -> None:
        self.store = store
        self.catalog = catalog
        self.settings = settings
        self.counter = TokenCounter(settings.bytes_per_token)
        self._policy: Policy | None = None
        self._version = -1
        self._checked = 0.0
        self._users: dict[str, User] = {}

    @classmethod
    def from_url(cls, url: str | None = None, **settings: Any) -> Engine:
        """An engine on the store at `url` (default: the configured database), migrated."""
        from quotagate.store.factory import open_engine

        return open_engine(url, **settings)

    # -- catalog snapshot ------------------------------------------------------------
    def policy(self) -> Policy:
        now = time.monotonic()
        if self._policy is None or now - self._checked >= self.settings.catalog_refresh_seconds:
            self._checked = now
            version = self.catalog.version()
            if version != self._version or self._policy is None:
                self._version = version
                self._policy = self.catalog.policy(self._default_price())
                self._users.clear()
        return self._policy

    def refresh(self) -> None:
        """Forget the cached catalog snapshot (after changing the catalog in this process)."""
        self._policy = None

    def _default_price(self) -> Price | None:
        if self.settings.unknown_models == "refuse":
            return None
        return Price(
            model="*",
            name="default price for unpriced models",
            input_credits=self.settings.default_input_credits,
            per_input_tokens=1_000_000,
            output_credits=self.settings.default_output_credits,
            per_output_tokens=1_000_000,
        )

    def _user(self, ctx: AdmitContext) -> User:
        user = self._users.get(ctx.user)
        if user is None or (ctx.groups is not None and tuple(sorted(ctx.groups)) != user.groups):
            user = self.catalog.user(ctx.user)
            if user is None or (ctx.groups is not None and set(ctx.groups) != set(user.groups)):
                user = self.catalog.ensure_user(ctx.user, ctx.role, groups=ctx.groups)
            self._users[ctx.user] = user
        return user

    # -- admit -----------------------------------------------------------------------
    async def admit(self, ctx: AdmitContext, *, now: datetime | None = None) -> Ticket:
        at = now or datetime.now(UTC)
        if not isinstance(ctx.user, str) or not ctx.user:
            raise InvalidInput("user must be a non-empty string")
        if not isinstance(ctx.model, str) or not ctx.model:
            raise InvalidInput("model must be a non-empty string")
        want = 0
        if ctx.produces_output:
            want = (
                self.settings.default_max_tokens
                if ctx.max_tokens is None
                else check_amount(ctx.max_tokens, "max_tokens")
            )
        prompt_tokens = self._prompt_tokens(ctx)
        policy = self.policy()
        user = self._user(ctx)
        price = policy.price(ctx.model, at) or policy.default_price
        if price is None:
            raise UnknownModel(f"model {ctx.model!r} has no price and unpriced models are refused")
        multiplier = policy.multiplier(user)

        common = self._common_specs(policy, user, ctx)
        options = self._funding_options(policy, user, ctx)
        strict = self.settings.mode == "strict"
        ticket_id = uuid.uuid4().hex
        expires = at.timestamp() + self.settings.lease_seconds
        # First pass wants the whole request from one source; only when no source can take
        # it whole is the completion clamped to what the first source that can still leaves.
        passes = (
            [want, self.settings.min_output_tokens]
            if strict and len(options) > 1
            else [self.settings.min_output_tokens]
        )
        first_refusal: tuple[_Spec, Hold, int, int] | None = None
        for min_output in passes:
            for option in options:
                specs = common + option.specs
                holds = [self._hold(spec, at, prompt_tokens, price, multiplier) for spec in specs]
                pool = option.source.partition(":")[2] or None
                ticket = Ticket(
                    id=ticket_id,
                    user_id=user.id,
                    model=ctx.model,
                    key_id=ctx.key_id,
                    channel=ctx.channel,
                    pool=pool,
                    source=option.source.partition(":")[0],
                    prompt_tokens=prompt_tokens,
                    max_tokens=want,
                    requested_max_tokens=want,
                    started_at=at.timestamp(),
                    expires_at=expires,
                    holds=[
                        TicketHold(
                            key=h.key, metric=s.metric, reserved=0, limit=s.amount, label=s.label
                        )
                        for s, h in zip(specs, holds)
                    ],
                    price=price_to_record(price),
                    multiplier=str(multiplier),
                )
                decision = await self.store.reserve(
                    ticket_id,
                    holds,
                    want,
                    strict=strict,
                    min_output=min_output,
                    expires_at=expires,
                    payload=ticket.model_dump_json(),
                )
                if decision.admitted:
                    return ticket.filled(decision.max_output, decision.amounts)
                if first_refusal is None:
                    assert decision.refused is not None
                    index = decision.refused
                    first_refusal = (specs[index], holds[index], decision.used, decision.reserved)
        assert first_refusal is not None
        raise QuotaExceeded(await self._refusal(*first_refusal, want, at))

    def _prompt_tokens(self, ctx: AdmitContext) -> int:
        if ctx.prompt_tokens is not None:
            return check_amount(ctx.prompt_tokens, "prompt_tokens")
        if ctx.messages is not None:
            if not isinstance(ctx.messages, Sequence) or isinstance(ctx.messages, str | bytes):
                raise InvalidInput("messages must be a list of message objects")
            if not all(isinstance(m, Mapping) for m in ctx.messages):
                raise InvalidInput("every message must be an object with role and content")
            return self.counter.messages(ctx.messages, ctx.model)
        if ctx.prompt is not None:
            if not isinstance(ctx.prompt, str):
                raise InvalidInput("prompt must be a string")
            return self.counter.text(ctx.prompt, ctx.model)
        return 0

    def _common_specs(self, policy: Policy, user: User, ctx: AdmitContext) -> list[_Spec]:
        """Limits on the model, the key and the channel: they apply whoever pays."""
        found: list[Limit] = list(policy.scoped(Scope.MODEL, ctx.model))
        if ctx.key_id:
            found += policy.scoped(Scope.KEY, ctx.key_id)
        if ctx.channel:
            found += policy.scoped(Scope.CHANNEL, ctx.channel)
        return [self._limit_spec(limit, user) for limit in found]

    def _funding_options(self, policy: Policy, user: User, ctx: AdmitContext) -> list[_Option]:
        """Where the request may draw from: a pool, or the allowances then the wallet."""
        pool = policy.pool(ctx.pool) if ctx.pool else policy.pool_for_model(ctx.model)
        if ctx.pool and pool is None:
            raise InvalidInput(f"unknown pool {ctx.pool!r}")
        if pool is not None:
            if not pool.admits(user):
                raise InvalidInput(f"user {user.id!r} may not draw from pool {pool.name!r}")
            specs = [self._limit_spec(lim, user) for lim in policy.scoped(Scope.POOL, pool.name)]
            return [_Option(f"pool:{pool.name}", specs)]
        allowance = _Option(
            "allowance",
            [
                _Spec(
                    f"a|{a.metric.value}|{user.id}",
                    a.metric,
                    a.window,
                    a.amount,
                    f"{a.label} allowance",
                )
                for a in policy.allowances(user)
            ],
        )
        options = [allowance]
        funded = self.catalog.wallet_funded(user.id) if allowance.specs else 0
        if funded > 0:
            options.append(_Option("wallet", [self._wallet_spec(user, funded)]))
        return options

    @staticmethod
    def _wallet_spec(user: User, funded: int) -> _Spec:
        return _Spec(f"w|{user.id}", Metric.CREDITS, LIFETIME, funded, f"wallet of {user.id}")

    @staticmethod
    def _limit_spec(limit: Limit, user: User) -> _Spec:
        subject = user.id if limit.per_user else limit.target
        return _Spec(
            f"l{limit.id}|{subject}", limit.metric, limit.window, limit.amount, limit.describe()
        )

    @staticmethod
    def _hold(spec: _Spec, at: datetime, prompt: int, price: Price, multiplier: Decimal) -> Hold:
        key, counted, expires = spec.keys(at)
        base, per_output = _reservation(spec.metric, prompt, price, multiplier)
        return Hold(key, counted, spec.amount, base, per_output, expires)

    async def _refusal(
        self, spec: _Spec, hold: Hold, used: int, reserved: int, want: int, at: datetime
    ) -> Refusal:
        by_bucket = {}
        if spec.window.kind == "rolling":
            states = await self.store.counters(hold.read_keys)
            by_bucket = {int(k.rsplit("|", 1)[1]): u + r for k, (u, r) in states.items()}
        return Refusal(
            limit=spec.label,
            metric=spec.metric.value,
            window=spec.window.describe(),
            amount=spec.amount or 0,
            used=used,
            reserved=reserved,
            requested=hold.base + hold.per_output * min(want, max(1, want)),
            resets_at=spec.window.resets_at(at, by_bucket),
        )

    # -- settle / cancel -------------------------------------------------------------
    async def settle(
        self, ticket: Ticket | str, usage: Usage | Mapping[str, Any], *, now: datetime | None = None
    ) -> UsageEvent:
        """Charge the real usage. Settling a ticket twice returns the first settlement."""
        real = parse_usage(usage)
        loaded = await self._load(ticket)
        if isinstance(loaded, UsageEvent):
            return loaded
        return await self._commit(loaded, real, now or datetime.now(UTC), status="settled")

    async def cancel(self, ticket: Ticket | str) -> bool:
        """Release the reservation; nothing is charged. False if it was not pending."""
        ticket_id = ticket if isinstance(ticket, str) else ticket.id
        released = await self.store.release(ticket_id)
        if released:
            log.debug("cancelled %s", ticket_id)
        return released

    async def _load(self, ticket: Ticket | str) -> Ticket | UsageEvent:
        ticket_id = ticket if isinstance(ticket, str) else ticket.id
        if isinstance(ticket, Ticket):
            return ticket
        stored = await self.store.ticket(ticket_id)
        if stored is not None:
            return _restore(stored)
        event = await self.store.event(ticket_id)
        if event is None:
            raise UnknownTicket(f"no open ticket {ticket_id!r} (never issued, or cancelled)")
        return event

    async def _commit(
        self,
        ticket: Ticket,
        usage: Usage,
        at: datetime,
        *,
        status: str,
        estimated: bool = False,
    ) -> UsageEvent:
        price = price_from_record(ticket.price) if ticket.price else None
        multiplier = Decimal(ticket.multiplier)
        credits = price.cost(usage, multiplier) if price else 0
        charges = [(h.key, _charge(h.metric, usage, credits)) for h in ticket.holds]
        excess = max(
            (
                charge - h.reserved
                for h, (_, charge) in zip(ticket.holds, charges)
                if h.limit is not None
            ),
            default=0,
        )
        event = UsageEvent(
            ticket_id=ticket.id,
            user_id=ticket.user_id,
            model=ticket.model,
            started_at=ticket.started_at,
            settled_at=at.timestamp(),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            credits=credits,
            key_id=ticket.key_id,
            channel=ticket.channel,
            pool=ticket.pool,
            source=ticket.source,
            status=status,
            estimated=estimated,
            excess=max(0, excess),
            charges=charges,
        )
        stored = await self.store.commit(ticket.id, event)
        if stored is None:
            raise UnknownTicket(f"no open ticket {ticket.id!r} (never issued, or cancelled)")
        if stored.excess and status == "settled":
            log.warning(
                "ticket %s used %d more than it reserved on a limit (upstream counted more "
                "prompt tokens than estimated); the ledger records the real usage",
                ticket.id,
                stored.excess,
            )
        return stored

    # -- leases, status, repair ------------------------------------------------------
    async def sweep(self, now: datetime | None = None) -> list[UsageEvent]:
        """Settle every ticket whose lease ran out: charged at its reservation, or released
        (by configuration); either way a ledger row flagged `estimated` says so."""
        at = now or datetime.now(UTC)
        events = []
        for stored in await self.store.expired(at.timestamp()):
            ticket = _restore(stored)
            if self.settings.on_expiry == "charge":
                usage = Usage(ticket.prompt_tokens, ticket.max_tokens)
                event = await self._commit(ticket, usage, at, status="expired", estimated=True)
            else:
                event = await self._commit(ticket, Usage(), at, status="released", estimated=True)
            log.warning("ticket %s of %s expired: %s", ticket.id, ticket.user_id, event.status)
            events.append(event)
        return events

    async def status(self, user_id: str, *, now: datetime | None = None) -> list[LimitStatus]:
        """Every limit that binds the user: used, reserved, left and when it resets."""
        at = now or datetime.now(UTC)
        policy = self.policy()
        user = self.catalog.user(user_id) or User(user_id)
        specs = [
            _Spec(
                f"a|{a.metric.value}|{user.id}",
                a.metric,
                a.window,
                a.amount,
                f"{a.label} allowance",
            )
            for a in policy.allowances(user)
        ]
        specs += [
            self._limit_spec(limit, user)
            for limit in policy.limits
            if limit.scope is Scope.MODEL and limit.per_user
        ]
        for pool in policy.pools:
            if pool.admits(user):
                specs += [
                    self._limit_spec(lim, user) for lim in policy.scoped(Scope.POOL, pool.name)
                ]
        funded = self.catalog.wallet_funded(user.id)
        if funded:
            specs.append(self._wallet_spec(user, funded))
        result = []
        for spec in specs:
            _, counted, _ = spec.keys(at)
            states = await self.store.counters(counted)
            used = sum(u for u, _ in states.values())
            reserved = sum(r for _, r in states.values())
            by_bucket = {int(k.rsplit("|", 1)[1]): u + r for k, (u, r) in states.items()}
            result.append(
                LimitStatus(
                    spec.label,
                    spec.metric,
                    spec.window,
                    spec.amount,
                    used,
                    reserved,
                    spec.window.resets_at(at, by_bucket),
                )
            )
        return result

    async def reconcile(self, repair: bool = True) -> list[CounterDiff]:
        diffs = await self.store.reconcile(repair)
        for diff in diffs:
            log.warning(
                "counter %s was used=%d reserved=%d, ledger says used=%d reserved=%d%s",
                diff.key,
                diff.used,
                diff.reserved,
                diff.expected_used,
                diff.expected_reserved,
                " (repaired)" if repair else "",
            )
        return diffs

    async def close(self) -> None:
        await self.store.close()
        self.catalog.db.dispose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _restore(stored: StoredTicket) -> Ticket:
    ticket = Ticket.model_validate_json(stored.payload)
    return ticket.filled(stored.max_output, [amount for _, amount in stored.held])


def _reservation(metric: Metric, prompt: int, price: Price, multiplier: Decimal) -> tuple[int, int]:
    """(base, per completion token) that a request reserves on a counter of `metric`."""
    if metric is Metric.TOKENS:
        return prompt, 1
    if metric is Metric.INPUT_TOKENS:
        return prompt, 0
    if metric is Metric.OUTPUT_TOKENS:
        return 0, 1
    if metric is Metric.REQUESTS:
        return 1, 0
    return price.input_cost(prompt, multiplier), price.output_rate(multiplier)


def _charge(metric: Metric, usage: Usage, credits: int) -> int:
    if metric is Metric.TOKENS:
        return usage.total_tokens
    if metric is Metric.INPUT_TOKENS:
        return usage.prompt_tokens
    if metric is Metric.OUTPUT_TOKENS:
        return usage.completion_tokens
    if metric is Metric.REQUESTS:
        return 1
    return credits


def parse_usage(usage: Usage | Mapping[str, Any]) -> Usage:
    """A :class:`Usage` from our type or an OpenAI / Anthropic style usage object."""
    if isinstance(usage, Usage):
        values = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    elif isinstance(usage, Mapping):
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        values = (
            usage.get("prompt_tokens", usage.get("input_tokens", 0)),
            usage.get("completion_tokens", usage.get("output_tokens", 0)),
            details.get("cached_tokens", 0) if isinstance(details, Mapping) else 0,
        )
    else:
        raise InvalidInput(f"usage must be a Usage or a mapping, got {type(usage).__name__}")
    prompt, completion, cached = (
        check_amount(v if v is not None else 0, name)
        for v, name in zip(values, ("prompt_tokens", "completion_tokens", "cached_tokens"))
    )
    return Usage(prompt, completion, min(cached, prompt))
