"""admit → settle / cancel: the one path every front door takes.

`admit` resolves every limit that applies to a request, turns each into a
:class:`~quotagate.core.decisions.Hold` and asks the store to reserve them all in one
atomic step. `settle` replaces the reservation by the usage the model reported and writes
exactly one ledger row; `cancel` releases it; `sweep` settles tickets whose lease ran out,
and `renew` (through :attr:`Engine.leases`) keeps the leases of running requests alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from pydantic import BaseModel

from quotagate.config import Settings
from quotagate.core.decisions import Decision, Hold, decide
from quotagate.core.errors import (
    InvalidInput,
    QuotaExceeded,
    Refusal,
    StoreUnavailable,
    UnknownModel,
    UnknownTicket,
)
from quotagate.core.limits import ABSURD, Limit, Metric, Scope, check_amount
from quotagate.core.messages import check_messages
from quotagate.core.policy import Policy, User
from quotagate.core.pricing import Price, Usage, price_from_record, price_to_record
from quotagate.core.text import check_name, shown, shown_repr
from quotagate.core.tokens import TokenCounter
from quotagate.core.windows import Window, parse_window
from quotagate.leases import LeaseKeeper
from quotagate.store.base import CounterDiff, CounterStore, StoredTicket, UsageEvent, summed
from quotagate.store.catalog import Catalog
from quotagate.store.catalog_calls import CatalogCalls

log = logging.getLogger("quotagate.engine")

LIFETIME = parse_window("lifetime")
#: counters deleted per store call when pruning: each call is one short write transaction
PRUNE_BATCH = 10_000
#: how many (user, model, key, channel, pool) resolutions an engine keeps; beyond that it
#: starts afresh, which costs one resolution per request until they are known again
_SPECS_REMEMBERED = 50_000


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
    #: left on the limit once this reservation is held (None: unlimited or not known)
    remaining: int | None = None
    #: epoch second the counter's window ends (None: lifetime)
    resets_at: float | None = None


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

    def filled(
        self,
        max_output: int,
        amounts: Sequence[int],
        available: Sequence[int | None] = (),
    ) -> Ticket:
        """This ticket with the store's decision: the clamped completion, what each
        counter holds and (when the store says) what each limit has left."""
        if available:
            holds = [
                h.model_copy(
                    update={"reserved": a, "remaining": None if v is None else max(0, v - a)}
                )
                for h, a, v in zip(self.holds, amounts, available)
            ]
        else:
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
    scope: str = "allowance"
    target: str | None = None
    per_user: bool = False
    #: the last window slots and the keys made of them (specs are reused across requests)
    _keys: tuple[object, tuple[str, tuple[str, ...], int | None]] | None = field(
        default=None, repr=False, compare=False
    )

    def keys(self, at: datetime) -> tuple[str, tuple[str, ...], int | None]:
        slots = self.window.slots(at)
        if self._keys is not None and self._keys[0] is slots:
            return self._keys[1]
        bucket, counted, expires = slots
        stem = f"{self.prefix}|{self.window.key}|"
        found = f"{stem}{bucket}", tuple(f"{stem}{b}" for b in counted), expires
        self._keys = (slots, found)
        return found


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
        #: runs catalog calls that may wait for the database (writes) off the event loop
        self.catalog_call = CatalogCalls(settings.store_timeout)
        self._policy: Policy | None = None
        self._version = -1
        self._checked = 0.0
        self._users: dict[str, User] = {}
        self._prices = _PriceRecords()
        self._specs: dict[tuple[Any, ...], tuple[list[_Spec], list[_Option]]] = {}
        self._releasing: set[asyncio.Future[bool]] = set()
        #: tickets of requests running in this process, renewed until settled or cancelled
        self.leases = LeaseKeeper(self)
        #: expired tickets that could not be settled nor released (see :meth:`sweep`)
        self._set_aside: set[str] = set()

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
                self._specs.clear()
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

    async def _user(self, ctx: AdmitContext) -> User:
        user = self._users.get(ctx.user)
        if user is None or (ctx.groups is not None and not user.in_step_with(ctx.groups)):
            user = self.catalog.user(ctx.user)
            if user is None or (ctx.groups is not None and not user.in_step_with(ctx.groups)):
                # the caller's groups join the admin's; its role applies to a new user only
                # (a catalog write: off the event loop, bounded by store_timeout)
                synced: tuple[User, bool] = await self.catalog_call(
                    self.catalog.sync_user, ctx.user, ctx.role, groups=ctx.groups
                )
                user = synced[0]
            self._users[ctx.user] = user
        return user

    # -- admit -----------------------------------------------------------------------
    def check(self, ctx: AdmitContext, *, now: datetime | None = None) -> int:
        """The prompt tokens of `ctx`, or the InvalidInput (UnknownModel) `admit` would
        raise for it; changes nothing. A front door that must update the user before
        admitting (Open WebUI's role and groups) checks first, so a refused request leaves
        the user alone."""
        return self._validated(ctx, _moment(now))[1]

    def _validated(self, ctx: AdmitContext, at: datetime) -> tuple[int, int, Policy, Price]:
        """(completion tokens wanted, prompt tokens, policy, price) of a valid request."""
        check_name(ctx.user, "user")
        check_name(ctx.model, "model", allow_bar=True)
        want = 0
        if ctx.produces_output:
            want = (
                self.settings.default_max_tokens
                if ctx.max_tokens is None
                else check_amount(ctx.max_tokens, "max_tokens")
            )
        prompt_tokens = self._prompt_tokens(ctx)
        policy = self.policy()
        price = policy.price(ctx.model, at) or policy.default_price
        if price is None:
            raise UnknownModel(f"model {ctx.model!r} has no price and unpriced models are refused")
        if ctx.pool and policy.pool(ctx.pool) is None:
            raise InvalidInput(f"unknown pool {ctx.pool!r}", "pool")
        return want, prompt_tokens, policy, price

    async def admit(self, ctx: AdmitContext, *, now: datetime | None = None) -> Ticket:
        at = _moment(now)
        # everything that can refuse the request is checked before the user is created
        want, prompt_tokens, policy, price = self._validated(ctx, at)
        user = await self._user(ctx)
        multiplier = policy.multiplier(user)

        common, options = self._specs_for(policy, user, ctx)
        strict = self.settings.mode == "strict"
        ticket_id = uuid.uuid4().hex
        expires = at.timestamp() + self.settings.lease_seconds
        first_refusal: tuple[list[_Spec], list[Hold], Decision, int] | None = None
        for option, min_output, reported in self._attempts(user, options, want, strict):
            specs = common + option.specs
            holds = [self._hold(spec, at, prompt_tokens, price, multiplier) for spec in specs]
            fits = _bounded_output(specs, holds, want)
            pool = option.source.partition(":")[2] or None
            # The ticket as plain data: it is stored as the payload, and becomes a validated
            # Ticket once, when admitted (building models per attempt was a hot-path cost).
            record: dict[str, Any] = {
                "id": ticket_id,
                "user_id": user.id,
                "model": ctx.model,
                "key_id": ctx.key_id,
                "channel": ctx.channel,
                "pool": pool,
                "source": option.source.partition(":")[0],
                "prompt_tokens": prompt_tokens,
                "max_tokens": fits,
                "requested_max_tokens": want,
                "started_at": at.timestamp(),
                "expires_at": expires,
                "holds": [
                    {
                        "key": h.key,
                        "metric": s.metric,
                        "reserved": 0,
                        "limit": s.amount,
                        "label": s.label,
                        "remaining": None,
                        "resets_at": h.expires_at,
                    }
                    for s, h in zip(specs, holds)
                ],
                "price": price_to_record(price, exact=True),
                "multiplier": str(multiplier),
            }
            try:
                decision = await self.store.reserve(
                    ticket_id,
                    holds,
                    fits,
                    strict=strict,
                    min_output=min_output,
                    expires_at=expires,
                    payload=orjson.dumps(record).decode(),
                )
            except asyncio.CancelledError:
                self._give_back(ticket_id)
                raise
            if decision.admitted:
                return _admitted(record, decision)
            if first_refusal is None and reported:
                first_refusal = (specs, holds, decision, min_output)
        assert first_refusal is not None
        raise QuotaExceeded(await self._last_to_free(*first_refusal, want, strict, at))

    async def _last_to_free(
        self,
        specs: list[_Spec],
        holds: list[Hold],
        decision: Decision,
        min_output: int,
        want: int,
        strict: bool,
        at: datetime,
    ) -> Refusal:
        """The refusal of the limit that frees up last among those refusing the request.

        The store's decision stops at the first limit that refuses; the request fits again
        only once every refusing one has room, so telling the first (an hourly allowance,
        a key's per-minute limit) would send the client back too early, and as a rate limit
        to retry, while a weekly or daily one is used up. Refusals only: one counter read.
        """
        assert decision.refused is not None
        first = decision.refused
        refusal = await self._refusal(
            specs[first], holds[first], decision.used, decision.reserved, want, at
        )
        others = [i for i, hold in enumerate(holds) if i != first and hold.limit is not None]
        if not others:
            return refusal
        states = await self.store.counters([k for i in others for k in holds[i].read_keys])
        for index in others:
            used, reserved = summed(states, holds[index].read_keys)
            alone = decide(
                [holds[index]], [(used, reserved)], want, strict=strict, min_output=min_output
            )
            if alone.admitted:
                continue
            other = await self._refusal(specs[index], holds[index], used, reserved, want, at)
            if refusal.resets_at is not None and (
                other.resets_at is None or other.resets_at > refusal.resets_at
            ):
                refusal = other
        return refusal

    def _give_back(self, ticket_id: str) -> None:
        """The caller was cancelled while the store reserved. If the reservation was made,
        nobody holds its ticket: release it now rather than let its lease charge for it."""
        task = asyncio.ensure_future(self.store.release(ticket_id))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[bool]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not release abandoned ticket: %s", task.exception())

    def _prompt_tokens(self, ctx: AdmitContext) -> int:
        if ctx.prompt_tokens is not None:
            return check_amount(ctx.prompt_tokens, "prompt_tokens")
        if ctx.messages is not None:
            return self.counter.messages(check_messages(ctx.messages), ctx.model)
        if ctx.prompt is not None:
            if not isinstance(ctx.prompt, str):
                raise InvalidInput("prompt must be a string")
            return self.counter.text(ctx.prompt, ctx.model)
        return 0

    def _specs_for(
        self, policy: Policy, user: User, ctx: AdmitContext
    ) -> tuple[list[_Spec], list[_Option]]:
        """The limits that apply whoever pays, and where the request may draw from.

        They are the same for every request of this user with this model, key, channel
        and pool, so they are remembered until the catalog snapshot changes.
        """
        key = (user, ctx.model, ctx.key_id, ctx.channel, ctx.pool)
        found = self._specs.get(key)
        if found is None:
            found = (
                self._common_specs(policy, user, ctx),
                self._funding_options(policy, user, ctx),
            )
            if len(self._specs) >= _SPECS_REMEMBERED:
                self._specs.clear()
            self._specs[key] = found
        return found

    def _common_specs(self, policy: Policy, user: User, ctx: AdmitContext) -> list[_Spec]:
        """Limits on the model, the key and the channel: they apply whoever pays."""
        found: list[Limit] = list(policy.scoped(Scope.MODEL, ctx.model))
        if ctx.key_id:
            found += policy.scoped(Scope.KEY, ctx.key_id)
        if ctx.channel:
            found += policy.scoped(Scope.CHANNEL, ctx.channel)
        return [self._limit_spec(limit, user) for limit in found]

    def _attempts(
        self, user: User, options: list[_Option], want: int, strict: bool
    ) -> Iterator[tuple[_Option, int, bool]]:
        """(source, min_output, whether a refusal there is the one reported), in order.

        The allowances (or the pool) come first, clamped like any limit. The wallet is
        drawn from only once the allowances are used up, that is when they cannot admit
        the request at all; only then is its balance read.
        """
        minimum = self.settings.min_output_tokens
        yield options[0], minimum, True
        if options[0].source == "allowance" and options[0].specs:
            funded = self.catalog.wallet_funded(user.id)
            if funded > 0:
                yield _Option("wallet", [self._wallet_spec(user, funded)]), minimum, False

    def _funding_options(self, policy: Policy, user: User, ctx: AdmitContext) -> list[_Option]:
        """Where the request may draw from: a pool, or the allowances (the wallet, drawn
        from after them, is added by :meth:`_attempts`)."""
        pool = policy.pool(ctx.pool) if ctx.pool else policy.pool_for_model(ctx.model)
        if ctx.pool and pool is None:
            raise InvalidInput(f"unknown pool {ctx.pool!r}")
        if pool is not None:
            if not pool.admits(user):
                raise InvalidInput(f"user {user.id!r} may not draw from pool {pool.name!r}")
            specs = [self._limit_spec(lim, user) for lim in policy.scoped(Scope.POOL, pool.name)]
            return [_Option(f"pool:{pool.name}", specs)]
        return [_Option("allowance", self._allowance_specs(policy, user))]

    @staticmethod
    def _allowance_specs(policy: Policy, user: User) -> list[_Spec]:
        """The user's allowances: one combined counter per metric and window."""
        return [
            _Spec(
                f"a|{a.metric.value}|{user.id}",
                a.metric,
                a.window,
                a.amount,
                f"{a.label} allowance",
            )
            for a in policy.allowances(user)
        ]

    @staticmethod
    def _wallet_spec(user: User, funded: int) -> _Spec:
        return _Spec(
            f"w|{user.id}", Metric.CREDITS, LIFETIME, funded, f"wallet of {user.id}", "wallet"
        )

    @staticmethod
    def _limit_spec(limit: Limit, user: User) -> _Spec:
        subject = user.id if limit.per_user else limit.target
        return _Spec(
            f"l{limit.id}|{subject}",
            limit.metric,
            limit.window,
            limit.amount,
            limit.describe(),
            limit.scope.value,
            limit.target,
            limit.per_user and not limit.scope.is_allowance,
        )

    @staticmethod
    def _hold(spec: _Spec, at: datetime, prompt: int, price: Price, multiplier: Decimal) -> Hold:
        key, counted, expires = spec.keys(at)
        base, per_output = _reservation(spec.metric, prompt, price, multiplier)
        return Hold(key, counted, spec.amount, base, per_output, expires)

    async def _refusal(
        self, spec: _Spec, hold: Hold, used: int, reserved: int, want: int, at: datetime
    ) -> Refusal:
        window = spec.window
        # what the decision refused: in strict mode the prompt and the least completion it
        # would have been admitted with (see decide), in optimistic mode any room at all
        if self.settings.mode == "strict":
            need = hold.base + hold.per_output * min(self.settings.min_output_tokens, want)
        else:
            need = 1
        amount = spec.amount or 0
        # rolling and lifetime windows have no timezone: told in the configured one
        local = self.settings.timezone if window.kind in ("rolling", "lifetime") else window.tz
        by_bucket = {}
        if window.kind == "rolling":
            states = await self.store.counters(hold.read_keys)
            by_bucket = {int(k.rsplit("|", 1)[1]): u + r for k, (u, r) in states.items()}
        return Refusal(
            limit=spec.label,
            metric=spec.metric.value,
            window=window.describe(),
            amount=amount,
            used=used,
            reserved=reserved,
            requested=need,
            resets_at=window.resets_at(at, by_bucket, amount=amount, need=need),
            scope=spec.scope,
            target=spec.target,
            window_kind=window.kind,
            window_seconds=window.length,
            rate_limit=window.is_rate_limit,
            timezone=local,
            per_user=spec.per_user,
        )

    # -- settle / cancel -------------------------------------------------------------
    async def settle(
        self,
        ticket: Ticket | str,
        usage: Usage | Mapping[str, Any],
        *,
        now: datetime | None = None,
        estimated: bool = False,
    ) -> UsageEvent:
        """Charge the real usage. Settling a ticket twice returns the first settlement.

        `estimated`: the usage was counted by QuotaGate (no upstream report), which the
        ledger row says."""
        real = parse_usage(usage)
        loaded = await self._load(ticket)
        if isinstance(loaded, UsageEvent):
            self.leases.drop(loaded.ticket_id)
            return _late(loaded, real)
        event = await self._commit(
            loaded, real, _moment(now), status="settled", estimated=estimated
        )
        self.leases.drop(loaded.id)
        return _late(event, real) if event.status != "settled" else event

    async def cancel(self, ticket: Ticket | str) -> bool:
        """Release the reservation; nothing is charged. False if it was not pending."""
        ticket_id = ticket if isinstance(ticket, str) else ticket.id
        released = await self.store.release(ticket_id)
        self.leases.drop(ticket_id)
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
        price = self._prices.get(ticket.price) if ticket.price else None
        multiplier = Decimal(ticket.multiplier)
        credits = price.cost(usage, multiplier) if price else 0
        charges, capped = self._charges(ticket, usage, credits, status)
        over_prompt = max(0, usage.prompt_tokens - ticket.prompt_tokens)
        over_completion = max(0, usage.completion_tokens - ticket.max_tokens)
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
            excess=over_prompt + over_completion if capped else 0,
            charges=charges,
        )
        stored = await self.store.commit(ticket.id, event)
        if stored is None:
            raise UnknownTicket(f"no open ticket {ticket.id!r} (never issued, or cancelled)")
        if stored.excess and status == "settled":
            over = " and ".join(
                part
                for part, extra in (("prompt", over_prompt), ("completion", over_completion))
                if extra
            )
            log.warning(
                "ticket %s: the upstream reported %d prompt + %d completion tokens, %d more "
                "than the %d + %d reserved (%s over); %s, the ledger records the real usage",
                ticket.id,
                usage.prompt_tokens,
                usage.completion_tokens,
                stored.excess,
                ticket.prompt_tokens,
                ticket.max_tokens,
                over,
                "each limit was charged what the ticket held on it"
                if self.settings.mode == "strict"
                else "the limits were charged in full (optimistic mode)",
            )
        return stored

    def _charges(
        self, ticket: Ticket, usage: Usage, credits: int, status: str
    ) -> tuple[list[tuple[str, int]], bool]:
        """What each counter is charged, and whether a limited counter was asked for more
        than the ticket held on it.

        In strict mode such a counter is charged what the ticket held, never more: the
        reservation fitted under its limit, so used + reserved ≤ amount holds whatever the
        upstream reports. The ledger row keeps the real usage and its excess; `reconcile`
        compares counters with the row's charges, so it stays exact.
        """
        strict = self.settings.mode == "strict"
        charges = []
        capped = False
        for hold in ticket.holds:
            # a released ticket charges nothing, not even the request it never made
            charge = 0 if status == "released" else _charge(hold.metric, usage, credits)
            if hold.limit is not None and charge > hold.reserved:
                capped = True
                if strict:
                    charge = hold.reserved
            charges.append((hold.key, charge))
        return charges, capped

    # -- leases, status, repair ------------------------------------------------------
    async def renew(
        self, tickets: Iterable[Ticket | str], *, now: datetime | None = None
    ) -> set[str]:
        """Extend the lease of each ticket still pending to a full lease from `now`, in one
        store write; the ids that were pending. :attr:`leases` calls it for the tickets of
        the requests running in this process, so only a dead process's tickets expire."""
        ids = [t if isinstance(t, str) else t.id for t in tickets]
        if not ids:
            return set()
        return await self.store.renew(ids, _moment(now).timestamp() + self.settings.lease_seconds)

    async def sweep(self, now: datetime | None = None) -> list[UsageEvent]:
        """Settle every ticket whose lease ran out: charged at its reservation, or released
        (by configuration); either way a ledger row flagged `estimated` says so. Tickets
        this process's running requests hold are left alone: they are alive."""
        at = _moment(now)
        events = []
        for stored in await self.store.expired(at.timestamp()):
            if self.leases.holds(stored.id):
                continue  # its request runs here: the renewal is late, not missing
            if stored.id in self._set_aside:
                continue
            try:
                event: UsageEvent | None = await self._expire(stored, at)
            except UnknownTicket:
                continue  # cancelled since `expired` listed it (another task or process)
            except StoreUnavailable:
                raise
            except Exception as exc:
                # one ticket that cannot be settled as recorded must not stop the sweeper
                event = await self._expire_as_held(stored, at, exc)
            if event is None or event.status == "settled":
                continue  # settled since `expired` listed it: not ours to report
            log.warning(
                "ticket %s of %s expired: %s",
                event.ticket_id,
                shown_repr(event.user_id),
                event.status,
            )
            events.append(event)
        return events

    async def _expire(self, stored: StoredTicket, at: datetime) -> UsageEvent:
        ticket = _restore(stored)
        if self.settings.on_expiry == "charge":
            usage = Usage(ticket.prompt_tokens, ticket.max_tokens)
            return await self._commit(ticket, usage, at, status="expired", estimated=True)
        return await self._commit(ticket, Usage(), at, status="released", estimated=True)

    async def _expire_as_held(
        self, stored: StoredTicket, at: datetime, error: Exception
    ) -> UsageEvent | None:
        """Expire a ticket whose record cannot be settled (unreadable, or priced absurdly)
        on what the store says it holds: charged exactly its reservation, or released. If
        even that fails it is released without a ledger row, and failing that left out of
        this engine's later sweeps; each step is logged."""
        log.error(
            "ticket %s cannot be settled as recorded (%s: %s); expiring it on its reservation",
            stored.id,
            type(error).__name__,
            shown(str(error)),
        )
        event = _held_event(stored, at, charge=self.settings.on_expiry == "charge")
        try:
            if event is not None:
                committed = await self.store.commit(stored.id, event)
                if committed is None:
                    return None  # settled or cancelled meanwhile
                return committed
            log.error("ticket %s names no user: released without a ledger row", stored.id)
            await self.store.release(stored.id)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.error("ticket %s cannot be expired (%s): left out of later sweeps", stored.id, exc)
            self._set_aside.add(stored.id)
        return None

    async def prune(self, now: datetime | None = None) -> int:
        """Delete counters of windows that ended more than a lease ago; how many.

        They can no longer refuse anything, and their usage stays in the ledger. A lease
        of grace means every ticket reserved on them has been settled or swept by then
        (a counter still holding a reservation is kept regardless).
        """
        horizon = _moment(now).timestamp() - self.settings.lease_seconds
        pruned = 0
        while True:
            deleted = await self.store.prune(horizon, PRUNE_BATCH)
            pruned += deleted
            if deleted < PRUNE_BATCH:
                break
        if pruned:
            log.info("pruned %d counters of windows that ended before %s", pruned, horizon)
        return pruned

    async def status(self, user_id: str, *, now: datetime | None = None) -> list[LimitStatus]:
        """Every limit that binds the user: used, reserved, left and when it resets."""
        at = _moment(now)
        policy = self.policy()
        user = self.catalog.user(user_id) or User(user_id)
        specs = self._allowance_specs(policy, user)
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
        await self.leases.stop()
        await self.store.close()
        self.catalog.db.dispose()
        self.catalog_call.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _moment(now: datetime | None) -> datetime:
    """`now`, or the current time; a naive datetime is refused rather than guessed at."""
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidInput(f"now must be a timezone-aware datetime, got {now!r}")
    return now


class _PriceRecords:
    """Prices rebuilt from tickets' price records, remembered: every settle needs one,
    rebuilding costs more than the rest of settle's arithmetic, and a process only ever
    sees as many distinct records as there are prices in use."""

    SIZE = 256

    def __init__(self) -> None:
        self._found: dict[bytes, Price] = {}

    def get(self, record: dict[str, Any]) -> Price:
        key = orjson.dumps(record)  # tells 1 from 1.0 from true, as price_from_record does
        price = self._found.get(key)
        if price is None:
            if len(self._found) >= self.SIZE:
                self._found.clear()
            price = self._found[key] = price_from_record(record)
        return price


def _admitted(record: dict[str, Any], decision: Decision) -> Ticket:
    """The Ticket of an admitted reservation: `record` (the ticket as stored) with the
    store's decision filled in, exactly as :meth:`Ticket.filled` would, in one validation."""
    holds = []
    for index, (stored, amount) in enumerate(zip(record["holds"], decision.amounts)):
        hold = {**stored, "reserved": amount}
        if decision.available:
            left = decision.available[index]
            hold["remaining"] = None if left is None else max(0, left - amount)
        holds.append(hold)
    return Ticket.model_validate({**record, "max_tokens": decision.max_output, "holds": holds})


def _late(event: UsageEvent, usage: Usage) -> UsageEvent:
    """A settle that came after the lease ran out: the sweeper's row stands (exactly once);
    say so, since the real usage differs from what was charged."""
    if event.status != "settled" and (
        (usage.prompt_tokens, usage.completion_tokens)
        != (event.prompt_tokens, event.completion_tokens)
    ):
        log.warning(
            "late settle of ticket %s ignored: its lease ran out and it was %s at %d+%d "
            "tokens; the upstream reported %d+%d",
            event.ticket_id,
            event.status,
            event.prompt_tokens,
            event.completion_tokens,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    return event


def _restore(stored: StoredTicket) -> Ticket:
    ticket = Ticket.model_validate_json(stored.payload)
    ticket.expires_at = stored.expires_at  # the payload has the first lease, not a renewed one
    return ticket.filled(stored.max_output, [amount for _, amount in stored.held])


def _bounded_output(specs: Sequence[_Spec], holds: Sequence[Hold], want: int) -> int:
    """The completion tokens `want` clamped so that no hold reserves more than ABSURD (an
    unlimited counter is not clamped by the store, and its sums must fit 64 bits)."""
    fits = want
    for spec, hold in zip(specs, holds):
        room = ABSURD - hold.base
        if room < 0 or (hold.per_output and want and room < hold.per_output):
            raise InvalidInput(
                f"this request would reserve an absurd amount of {spec.metric.value} on "
                f"{spec.label}: the prompt is too long for its price"
            )
        if hold.per_output:
            fits = min(fits, room // hold.per_output)
    return fits


def _held_event(stored: StoredTicket, at: datetime, *, charge: bool) -> UsageEvent | None:
    """The ledger row of an expired ticket built from what the store holds for it, reading
    from its record only what is well-formed; None if the record names no user and model."""
    try:
        record = orjson.loads(stored.payload)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        return None
    user, model = record.get("user_id"), record.get("model")
    if not isinstance(user, str) or not user or not isinstance(model, str) or not model:
        return None

    def text(name: str) -> str | None:
        value = record.get(name)
        return value if isinstance(value, str) else None

    def amount(value: object) -> int:
        try:
            return check_amount(value)
        except InvalidInput:
            return 0

    holds = record.get("holds")
    metrics = (
        {h.get("key"): h.get("metric") for h in holds if isinstance(h, dict)}
        if isinstance(holds, list)
        else {}
    )
    credits = max((a for k, a in stored.held if metrics.get(k) == Metric.CREDITS.value), default=0)
    started = record.get("started_at")
    return UsageEvent(
        ticket_id=stored.id,
        user_id=user,
        model=model,
        started_at=float(started) if isinstance(started, int | float) else at.timestamp(),
        settled_at=at.timestamp(),
        prompt_tokens=amount(record.get("prompt_tokens")) if charge else 0,
        completion_tokens=amount(stored.max_output) if charge else 0,
        credits=credits if charge else 0,
        key_id=text("key_id"),
        channel=text("channel"),
        pool=text("pool"),
        source=text("source") or "allowance",
        status="expired" if charge else "released",
        estimated=True,
        charges=[(key, held if charge else 0) for key, held in stored.held],
    )


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
