"""Which limits bind a request: allowances combined per user, plus model, key, channel and
pool limits on top. Pure: the engine hands it a snapshot of the catalog."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from quotagate.core.limits import Limit, Metric, Scope
from quotagate.core.pricing import Price
from quotagate.core.windows import Window

_BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class User:
    """A user as the catalog holds them. `groups` are all memberships; `synced_groups` the
    part a caller's sync (Open WebUI's groups) added, which the next sync may take away;
    the rest an admin gave. `role_pinned`: an admin set the role, no sync changes it."""

    id: str
    role: str = "user"
    groups: tuple[str, ...] = ()
    email: str | None = None
    name: str | None = None
    role_pinned: bool = False
    synced_groups: tuple[str, ...] = ()

    def in_step_with(self, groups: Iterable[str]) -> bool:
        """True when syncing `groups` would change nothing: each is a membership already
        (the admin's or the sync's), and no synced membership is missing from them."""
        wanted = set(groups)
        return wanted <= set(self.groups) and set(self.synced_groups) <= wanted


@dataclass(frozen=True)
class Pool:
    """A sponsored allowance; its limits are `Scope.POOL` limits targeting `name`."""

    name: str
    models: tuple[str, ...] = ()
    groups: tuple[str, ...] | None = None  # None: open to everyone

    def admits(self, user: User) -> bool:
        return self.groups is None or bool(set(self.groups) & set(user.groups))


@dataclass(frozen=True)
class Allowance:
    """A user's combined allowance on one metric and window, and where it comes from."""

    metric: Metric
    window: Window
    amount: int | None
    label: str


@dataclass
class Policy:
    limits: Sequence[Limit] = ()
    prices: Sequence[Price] = ()
    multipliers: dict[str, Decimal] = field(default_factory=dict)
    pools: Sequence[Pool] = ()
    default_price: Price | None = None

    def __post_init__(self) -> None:
        self._by_scope: dict[tuple[Scope, str], list[Limit]] = defaultdict(list)
        for limit in self.limits:
            self._by_scope[(limit.scope, limit.target)].append(limit)
        self._prices: dict[str, list[Price]] = defaultdict(list)
        for price in sorted(self.prices, key=lambda p: p.effective_from or _BEGINNING):
            self._prices[price.model].append(price)
        self._pools = {pool.name: pool for pool in self.pools}
        # A policy is a snapshot, so a user's allowances stay the same for its lifetime;
        # admit asks for them on every request.
        self._allowances: dict[User, list[Allowance]] = {}

    def scoped(self, scope: Scope, target: str) -> list[Limit]:
        return self._by_scope.get((scope, target), [])

    # -- allowances ------------------------------------------------------------------
    def allowances(self, user: User) -> list[Allowance]:
        """The user's own override if set, else role (or the base for everyone) plus groups."""
        found = self._allowances.get(user)
        if found is None:
            found = self._allowances[user] = self._combine(user)
        return list(found)

    def _combine(self, user: User) -> list[Allowance]:
        parts: dict[tuple[Metric, str], dict[str, list[Limit]]] = defaultdict(
            lambda: defaultdict(list)
        )
        sources: list[tuple[str, Iterable[Limit]]] = [
            ("everyone", self.scoped(Scope.EVERYONE, "*")),
            ("role", self.scoped(Scope.ROLE, user.role)),
            ("user", self.scoped(Scope.USER, user.id)),
        ]
        sources += [("group", self.scoped(Scope.GROUP, g)) for g in sorted(set(user.groups))]
        windows: dict[tuple[Metric, str], Window] = {}
        for kind, limits in sources:
            for limit in limits:
                slot = (limit.metric, limit.window.key)
                parts[slot][kind].append(limit)
                windows[slot] = limit.window
        result = []
        for slot, found in parts.items():
            if found["user"]:
                chosen, label = found["user"], f"user {user.id} override"
            else:
                base = found["role"] or found["everyone"]
                chosen = base + found["group"]
                names = [f"role {user.role}"] if found["role"] else ["base"] if base else []
                names += [f"group {limit.target}" for limit in found["group"]]
                label = " + ".join(names)
            amounts = [limit.amount for limit in chosen]
            amount = None if any(a is None for a in amounts) else sum(a for a in amounts if a)
            result.append(Allowance(slot[0], windows[slot], amount, label))
        return sorted(result, key=lambda a: (a.metric, a.window.key))

    # -- pricing ---------------------------------------------------------------------
    def price(self, model: str, at: datetime) -> Price | None:
        """The price in effect for `model` at `at` (provider prefixes like `openai/` ignored)."""
        history = self._prices.get(model)
        if history is None and "/" in model:
            history = self._prices.get(model.split("/", 1)[1])
        if not history:
            return None
        starts = [p.effective_from or _BEGINNING for p in history]
        index = bisect.bisect_right(starts, at) - 1
        return history[index] if index >= 0 else None

    def multiplier(self, user: User) -> Decimal:
        """The most favourable multiplier among the user's groups (1 when none is set)."""
        found = [self.multipliers[g] for g in user.groups if g in self.multipliers]
        return min(found) if found else Decimal(1)

    # -- pools -----------------------------------------------------------------------
    def pool(self, name: str) -> Pool | None:
        return self._pools.get(name)

    def pool_for_model(self, model: str) -> Pool | None:
        for pool in self.pools:
            if model in pool.models:
                return pool
        return None
