"""The protocol every counter-and-ledger store implements, and the records it exchanges.

A store has five atomic operations. `reserve` applies :func:`~quotagate.core.decisions.decide`
to the counters of a request and, if admitted, adds the reservation and records the
ticket, all in one step. `commit` turns a ticket's reservation into the charged usage and
writes its ledger row, at most once per ticket. `release` drops a reservation. `renew`
extends the leases of pending tickets whose requests are still running. `repair` sets
counters to given values. Everything else reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from quotagate.core.decisions import Decision, Hold
from quotagate.core.windows import counter_expires_at


@dataclass
class UsageEvent:
    """One settled request: the immutable ledger row counters are derived from."""

    ticket_id: str
    user_id: str
    model: str
    started_at: float
    settled_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    credits: int = 0  # micro-credits charged
    key_id: str | None = None
    channel: str | None = None
    pool: str | None = None
    source: str = "allowance"  # allowance | wallet | pool
    status: str = "settled"  # settled | expired
    estimated: bool = False
    #: tokens the upstream reported beyond the ticket's reservation (prompt and completion)
    #: when that asked a limited counter for more than it held; strict mode charged such a
    #: counter only what it held, so the row's charges can be less than its usage
    excess: int = 0
    charges: list[tuple[str, int]] = field(default_factory=list)
    id: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StoredTicket:
    """A pending reservation as the store keeps it; `payload` is the engine's own record."""

    id: str
    expires_at: float
    held: tuple[tuple[str, int], ...]
    max_output: int
    payload: str


@dataclass(frozen=True)
class CounterDiff:
    key: str
    used: int
    reserved: int
    expected_used: int
    expected_reserved: int


@dataclass(frozen=True)
class EventQuery:
    """Filters for reading the ledger; None means any."""

    user_id: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None


#: the ledger columns a usage summary may group by; "slot" is the quarter hour a request
#: started in (epoch seconds // SLOT_SECONDS): every timezone's offset is a whole number
#: of quarter hours, so slots add up exactly into local days in any timezone
USAGE_GROUPS = ("user", "model", "slot")
SLOT_SECONDS = 900


@dataclass
class UsageSum:
    """Sums over the ledger rows of one group. `credits` in micro-credits."""

    key: str | int
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    credits: int = 0
    estimated: int = 0
    excess: int = 0  # tokens beyond the reservations, not charged to strict limits

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: UsageSum) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.credits += other.credits
        self.estimated += other.estimated
        self.excess += other.excess


class CounterStore(Protocol):
    url: str

    async def reserve(
        self,
        ticket_id: str,
        holds: Sequence[Hold],
        want_output: int,
        *,
        strict: bool,
        min_output: int,
        expires_at: float,
        payload: str,
    ) -> Decision:
        """Decide and, if admitted, reserve on every hold and store the ticket, atomically."""
        ...

    async def commit(self, ticket_id: str, event: UsageEvent) -> UsageEvent | None:
        """Replace the ticket's reservation by `event.charges` and write `event`.

        Idempotent: if the ticket was already committed, return the event written then
        and change nothing. Return None if no such ticket was ever reserved (or it was
        released).
        """
        ...

    async def release(self, ticket_id: str) -> bool:
        """Drop the ticket's reservation. False if it was not pending."""
        ...

    async def renew(self, ticket_ids: Sequence[str], expires_at: float) -> set[str]:
        """Extend the lease of every pending ticket among `ticket_ids` to `expires_at`
        (a lease is never shortened); the ids that were still pending. One write for
        them all: a process renews every ticket it holds at once."""
        ...

    async def ticket(self, ticket_id: str) -> StoredTicket | None: ...

    async def expired(self, now: float, limit: int = 500) -> list[StoredTicket]: ...

    async def counters(self, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(used, reserved) of each key; keys never written are absent."""
        ...

    async def event(self, ticket_id: str) -> UsageEvent | None: ...

    async def events(self, query: EventQuery) -> list[UsageEvent]: ...

    async def usage(self, query: EventQuery, by: str) -> list[UsageSum]:
        """The ledger rows matching `query` summed per user, model or slot (see
        USAGE_GROUPS), in no particular order; the store does the work, so a report on
        millions of rows reads no rows into memory."""
        ...

    async def reconcile(self, repair: bool) -> list[CounterDiff]:
        """Compare every counter with the ledger's charges and the pending reservations
        (but those of windows that ended before the last prune's horizon)."""
        ...

    async def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` counters whose window ended before `before` and that hold no
        reservation; how many. Their usage stays in the ledger, and `reconcile` no longer
        compares counters of windows that ended before the latest such horizon."""
        ...

    async def close(self) -> None: ...


def summed(counters: Mapping[str, Sequence[int]], keys: Sequence[str]) -> tuple[int, int]:
    """(used, reserved) summed over `keys` of a key → [used, reserved] mapping; keys never
    written count as zero. What a store hands :func:`~quotagate.core.decisions.decide`."""
    used = reserved = 0
    for key in keys:
        state = counters.get(key)
        if state is not None:
            used += state[0]
            reserved += state[1]
    return used, reserved


def check_usage_group(by: str) -> None:
    if by not in USAGE_GROUPS:
        raise ValueError(f"usage is grouped by one of {USAGE_GROUPS}, not {by!r}")


def usage_of(events: Sequence[UsageEvent], by: str) -> list[UsageSum]:
    """:meth:`CounterStore.usage` over events in memory."""
    check_usage_group(by)
    sums: dict[str | int, UsageSum] = {}
    for event in events:
        key: str | int
        if by == "user":
            key = event.user_id
        elif by == "model":
            key = event.model
        else:
            key = int(event.started_at // SLOT_SECONDS)
        found = sums.get(key)
        if found is None:
            found = sums[key] = UsageSum(key)
        found.add(
            UsageSum(
                key,
                1,
                event.prompt_tokens,
                event.completion_tokens,
                event.cached_tokens,
                event.credits,
                int(event.estimated),
                event.excess,
            )
        )
    return list(sums.values())


def expected_counters(
    events: Sequence[UsageEvent], tickets: Sequence[StoredTicket]
) -> dict[str, tuple[int, int]]:
    """What the counters must hold: the ledger's charges as used, pending tickets as reserved."""
    expected: dict[str, list[int]] = {}
    for event in events:
        for key, amount in event.charges:
            expected.setdefault(key, [0, 0])[0] += amount
    for ticket in tickets:
        for key, amount in ticket.held:
            expected.setdefault(key, [0, 0])[1] += amount
    return {key: (used, reserved) for key, (used, reserved) in expected.items()}


def diff_counters(
    actual: dict[str, tuple[int, int]],
    expected: dict[str, tuple[int, int]],
    pruned_before: float | None = None,
) -> list[CounterDiff]:
    """The counters that differ from what the ledger says, leaving out those of windows
    that ended before `pruned_before` (they may have been pruned)."""
    diffs = []
    for key in sorted(actual.keys() | expected.keys()):
        if pruned_before is not None:
            ends = counter_expires_at(key)
            if ends is not None and ends < pruned_before:
                continue
        used, reserved = actual.get(key, (0, 0))
        want_used, want_reserved = expected.get(key, (0, 0))
        if (used, reserved) != (want_used, want_reserved):
            diffs.append(CounterDiff(key, used, reserved, want_used, want_reserved))
    return diffs
