"""A store in this process's memory: for tests and for library users who need no persistence.

Every operation runs without awaiting, so on one event loop each is atomic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from quotagate.core.decisions import Decision, Hold, decide
from quotagate.core.windows import counter_expires_at
from quotagate.store.base import (
    CounterDiff,
    EventQuery,
    StoredTicket,
    UsageEvent,
    UsageSum,
    diff_counters,
    expected_counters,
    summed,
    usage_of,
)


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._counters: dict[str, list[int]] = {}
        self._tickets: dict[str, StoredTicket] = {}
        self._events: dict[str, UsageEvent] = {}
        self._pruned_before: float | None = None

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
        if ticket_id in self._tickets or ticket_id in self._events:
            raise ValueError(f"ticket {ticket_id} exists already")
        states = [summed(self._counters, hold.read_keys) for hold in holds]
        decision = decide(holds, states, want_output, strict=strict, min_output=min_output)
        if decision.admitted:
            held = tuple((hold.key, amount) for hold, amount in zip(holds, decision.amounts))
            for key, amount in held:
                self._counters.setdefault(key, [0, 0])[1] += amount
            self._tickets[ticket_id] = StoredTicket(
                ticket_id, expires_at, held, decision.max_output, payload
            )
        return decision

    async def commit(self, ticket_id: str, event: UsageEvent) -> UsageEvent | None:
        if ticket_id in self._events:
            return self._events[ticket_id]
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None:
            return None
        for key, amount in ticket.held:
            self._counters[key][1] -= amount
        for key, amount in event.charges:
            self._counters.setdefault(key, [0, 0])[0] += amount
        stored = replace(event, id=len(self._events) + 1)
        self._events[ticket_id] = stored
        return stored

    async def release(self, ticket_id: str) -> bool:
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None:
            return False
        for key, amount in ticket.held:
            self._counters[key][1] -= amount
        return True

    async def renew(self, ticket_ids: Sequence[str], expires_at: float) -> set[str]:
        pending = set()
        for ticket_id in ticket_ids:
            ticket = self._tickets.get(ticket_id)
            if ticket is not None:
                pending.add(ticket_id)
                if ticket.expires_at < expires_at:
                    self._tickets[ticket_id] = replace(ticket, expires_at=expires_at)
        return pending

    async def ticket(self, ticket_id: str) -> StoredTicket | None:
        return self._tickets.get(ticket_id)

    async def expired(self, now: float, limit: int = 500) -> list[StoredTicket]:
        due = [t for t in self._tickets.values() if t.expires_at <= now]
        return sorted(due, key=lambda t: t.expires_at)[:limit]

    async def counters(self, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        return {k: (c[0], c[1]) for k in keys if (c := self._counters.get(k)) is not None}

    async def event(self, ticket_id: str) -> UsageEvent | None:
        return self._events.get(ticket_id)

    async def events(self, query: EventQuery) -> list[UsageEvent]:
        rows = [
            e
            for e in self._events.values()
            if (query.user_id is None or e.user_id == query.user_id)
            and (query.model is None or e.model == query.model)
            and (query.since is None or e.started_at >= query.since)
            and (query.until is None or e.started_at < query.until)
        ]
        return rows[: query.limit] if query.limit else rows

    async def usage(self, query: EventQuery, by: str) -> list[UsageSum]:
        return usage_of(await self.events(query), by)

    async def reconcile(self, repair: bool) -> list[CounterDiff]:
        actual = {k: (c[0], c[1]) for k, c in self._counters.items() if c != [0, 0]}
        expected = expected_counters(list(self._events.values()), list(self._tickets.values()))
        diffs = diff_counters(actual, expected, self._pruned_before)
        if repair:
            for diff in diffs:
                self._counters[diff.key] = [diff.expected_used, diff.expected_reserved]
        return diffs

    async def prune(self, before: float, limit: int = 10_000) -> int:
        due = [
            key
            for key, (_, reserved) in self._counters.items()
            if not reserved and (ends := counter_expires_at(key)) is not None and ends < before
        ][:limit]
        for key in due:
            del self._counters[key]
        self._pruned_before = max(before, self._pruned_before or before)
        return len(due)

    async def close(self) -> None:
        return None
