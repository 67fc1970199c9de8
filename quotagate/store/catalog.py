"""The catalog: users, groups, limits, prices, API keys, pools and wallets, in SQL.

Every change bumps a version number so that engines in other processes notice it and
reload their snapshot (:meth:`Catalog.policy`) without reading the catalog per request.
API keys are stored as SHA-256 digests of high-entropy secrets and compared with
:func:`hmac.compare_digest`; the secret itself is returned once, at creation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TypeVar

import sqlalchemy as sa

from quotagate.core.errors import InvalidInput
from quotagate.core.limits import Limit, Metric, Scope, check_amount
from quotagate.core.policy import Policy, Pool, User
from quotagate.core.pricing import MAX_MULTIPLIER, PRICE_DIGITS, Price
from quotagate.core.text import check_name
from quotagate.core.windows import parse_window
from quotagate.store import schema as t

log = logging.getLogger("quotagate.catalog")

KEY_PREFIX = "qg-"
#: who made a membership (memberships.source)
ADMIN = "admin"
SYNC = "sync"
_T = TypeVar("_T")
#: how often to try creating a user that other processes may be creating at the same time
_CREATE_ATTEMPTS = 5


@dataclass(frozen=True)
class ApiKey:
    id: str
    user_id: str
    name: str
    models: tuple[str, ...] | None
    trusted_openwebui: bool
    created_at: float
    revoked_at: float | None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class Catalog:
    def __init__(self, engine: sa.Engine, timezone: str = "UTC") -> None:
        self.db = engine
        self.timezone = timezone

    # -- versioning ------------------------------------------------------------------
    def version(self) -> int:
        with self.db.connect() as conn:
            value = conn.execute(
                sa.select(t.meta.c.value).where(t.meta.c.key == "catalog_version")
            ).scalar()
        return int(value or 0)

    def _bump(self, conn: sa.Connection) -> None:
        updated = conn.execute(
            sa.update(t.meta)
            .where(t.meta.c.key == "catalog_version")
            .values(value=sa.cast(sa.cast(t.meta.c.value, sa.Integer) + 1, sa.Text))
        )
        if updated.rowcount == 0:
            conn.execute(sa.insert(t.meta).values(key="catalog_version", value="1"))

    def get_meta(self, key: str) -> str | None:
        with self.db.connect() as conn:
            return conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self.db.begin() as conn:
            if (
                conn.execute(
                    sa.update(t.meta).where(t.meta.c.key == key).values(value=value)
                ).rowcount
                == 0
            ):
                conn.execute(sa.insert(t.meta).values(key=key, value=value))

    # -- users and groups ------------------------------------------------------------
    # Two voices change a user: an admin (`users set-role`, `users add-group`) and a sync
    # (Open WebUI's role and groups, forwarded by the gateway or sent by the filters). The
    # admin wins: a role an admin set is pinned, and a sync only adds and removes the
    # memberships it made itself, so a user's groups are the admin's plus Open WebUI's.
    def user(self, user_id: str) -> User | None:
        with self.db.connect() as conn:
            return self._read_user(conn, user_id)

    def _read_user(self, conn: sa.Connection, user_id: str) -> User | None:
        row = conn.execute(sa.select(t.users).where(t.users.c.id == user_id)).first()
        if row is None:
            return None
        members = conn.execute(
            sa.select(t.memberships.c.group_name, t.memberships.c.source).where(
                t.memberships.c.user_id == user_id
            )
        ).all()
        return _user(row, [(m.group_name, m.source) for m in members])

    def users(self) -> list[User]:
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(t.users).order_by(t.users.c.id)).all()
            members: dict[str, list[tuple[str, str]]] = {}
            for m in conn.execute(sa.select(t.memberships)):
                members.setdefault(m.user_id, []).append((m.group_name, m.source))
        return [_user(r, members.get(r.id, [])) for r in rows]

    def find_users(self, text: str) -> list[User]:
        """The user whose id is `text`, else every user whose email is `text` (any case):
        admins name people by the email they sign in with, QuotaGate by Open WebUI's id."""
        found = self.user(text)
        if found is not None or "@" not in text:
            return [found] if found is not None else []
        with self.db.connect() as conn:
            ids = conn.execute(
                sa.select(t.users.c.id)
                .where(sa.func.lower(t.users.c.email) == text.strip().lower())
                .order_by(t.users.c.id)
            ).scalars()
            return [u for u in (self._read_user(conn, i) for i in list(ids)) if u is not None]

    def _write(self, change: Callable[[sa.Connection], _T]) -> _T:
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with self.db.begin() as conn:
                    return change(conn)
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
                # Another process created the same user, group or membership at this very
                # moment (several gateway workers seeing a new user at once): look again.
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def ensure_user(
        self,
        user_id: str,
        role: str | None = None,
        *,
        email: str | None = None,
        name: str | None = None,
        groups: Sequence[str] | None = None,
    ) -> User:
        """Create the user if unknown; update the fields given (`groups`: exactly these,
        as an admin's). Returns the stored user."""
        _check_name(user_id, "user id")

        def change(conn: sa.Connection) -> None:
            self._upsert_user(conn, user_id, role, email, name)
            if groups is not None:
                self._set_groups(conn, user_id, groups, ADMIN)

        self._write(change)
        user = self.user(user_id)
        assert user is not None
        return user

    def sync_user(
        self,
        user_id: str,
        role: str | None = None,
        *,
        follow_role: bool = False,
        email: str | None = None,
        name: str | None = None,
        groups: Sequence[str] | None = None,
    ) -> tuple[User, bool]:
        """What a caller (Open WebUI) says about a user. Unknown: created with `role`.
        Known: `role` replaces theirs if `follow_role` and no admin pinned it; `groups`
        replace the memberships earlier syncs made, never an admin's. Returns the user and
        whether their role or groups changed (what the engine's snapshot must learn)."""
        _check_name(user_id, "user id")

        def change(conn: sa.Connection) -> bool:
            known = self._read_user(conn, user_id)
            new_role = role if known is None or (follow_role and not known.role_pinned) else None
            self._upsert_user(conn, user_id, new_role, email, name)
            regrouped = groups is not None and self._set_groups(conn, user_id, groups, SYNC)
            # a new user is read from the catalog when first admitted; email and name bind
            # nothing
            return known is not None and (new_role not in (None, known.role) or regrouped)

        changed = self._write(change)
        user = self.user(user_id)
        assert user is not None
        return user, changed

    def set_role(self, user_id: str, role: str | None) -> User:
        """An admin's role for the user (created if unknown), pinned against syncs; None
        unpins it: the next sync sets Open WebUI's role again."""
        _check_name(user_id, "user id")

        def change(conn: sa.Connection) -> None:
            self._upsert_user(conn, user_id, role, None, None)
            conn.execute(
                sa.update(t.users)
                .where(t.users.c.id == user_id)
                .values(role_pinned=role is not None)
            )
            self._bump(conn)

        self._write(change)
        user = self.user(user_id)
        assert user is not None
        return user

    def _upsert_user(
        self,
        conn: sa.Connection,
        user_id: str,
        role: str | None,
        email: str | None,
        name: str | None,
    ) -> bool:
        """Insert or update the user row; True if anything changed."""
        row = conn.execute(sa.select(t.users).where(t.users.c.id == user_id)).first()
        changes = {
            k: v for k, v in (("role", role), ("email", email), ("name", name)) if v is not None
        }
        if row is None:
            conn.execute(
                sa.insert(t.users).values(
                    id=user_id,
                    role=role or "user",
                    email=email,
                    name=name,
                    created_at=time.time(),
                )
            )
        elif any(getattr(row, k) != v for k, v in changes.items()):
            conn.execute(sa.update(t.users).where(t.users.c.id == user_id).values(**changes))
        else:
            return False
        self._bump(conn)
        return True

    def _set_groups(
        self, conn: sa.Connection, user_id: str, groups: Sequence[str], source: str
    ) -> bool:
        """ADMIN: exactly these memberships, all the admin's. SYNC: these plus the admin's
        (a sync adds what is missing and removes only what an earlier sync added)."""
        current = dict(
            conn.execute(
                sa.select(t.memberships.c.group_name, t.memberships.c.source).where(
                    t.memberships.c.user_id == user_id
                )
            ).all()
        )
        wanted = set(groups)
        added = wanted - set(current)
        mine = set(current) if source == ADMIN else {g for g, s in current.items() if s == SYNC}
        removed = mine - wanted
        # an admin naming a group a sync made takes it over; a sync never takes the admin's
        claimed = {g for g in wanted & set(current) if current[g] == SYNC and source == ADMIN}
        if not (added or removed or claimed):
            return False
        for group in sorted(added):
            self._ensure_group(conn, group)
            conn.execute(
                sa.insert(t.memberships).values(user_id=user_id, group_name=group, source=source)
            )
        if removed:
            conn.execute(
                sa.delete(t.memberships).where(
                    t.memberships.c.user_id == user_id,
                    t.memberships.c.group_name.in_(removed),
                )
            )
        if claimed:
            conn.execute(
                sa.update(t.memberships)
                .where(
                    t.memberships.c.user_id == user_id,
                    t.memberships.c.group_name.in_(claimed),
                )
                .values(source=ADMIN)
            )
        self._bump(conn)
        return True

    def _ensure_group(self, conn: sa.Connection, name: str) -> None:
        _check_name(name, "group name")
        if conn.execute(sa.select(t.groups.c.name).where(t.groups.c.name == name)).first() is None:
            conn.execute(sa.insert(t.groups).values(name=name, multiplier="1"))

    def add_member(self, user_id: str, group: str) -> User:
        """An admin's membership (the user is created if unknown): kept whatever Open
        WebUI's groups say; a membership a sync made becomes the admin's."""
        _check_name(user_id, "user id")
        member = (t.memberships.c.user_id == user_id) & (t.memberships.c.group_name == group)

        def change(conn: sa.Connection) -> None:
            self._upsert_user(conn, user_id, None, None, None)
            self._ensure_group(conn, group)
            claimed = conn.execute(sa.update(t.memberships).where(member).values(source=ADMIN))
            if claimed.rowcount == 0:
                conn.execute(
                    sa.insert(t.memberships).values(user_id=user_id, group_name=group, source=ADMIN)
                )
            self._bump(conn)

        self._write(change)
        user = self.user(user_id)
        assert user is not None
        return user

    def remove_member(self, user_id: str, group: str) -> User:
        """Take the user out of the group, whoever put them in (a membership that came
        from Open WebUI comes back with the next sync while Open WebUI still has it)."""
        with self.db.begin() as conn:
            conn.execute(
                sa.delete(t.memberships).where(
                    t.memberships.c.user_id == user_id, t.memberships.c.group_name == group
                )
            )
            self._bump(conn)
        user = self.user(user_id)
        assert user is not None
        return user

    def set_multiplier(self, group: str, multiplier: Decimal | str | float) -> None:
        value = _decimal(multiplier, "multiplier")
        if value > MAX_MULTIPLIER or len(str(value)) > PRICE_DIGITS:
            raise InvalidInput(
                f"multiplier must be at most {MAX_MULTIPLIER:,} in {PRICE_DIGITS} characters, "
                f"got {value}"
            )
        with self.db.begin() as conn:
            self._ensure_group(conn, group)
            conn.execute(
                sa.update(t.groups).where(t.groups.c.name == group).values(multiplier=str(value))
            )
            self._bump(conn)

    def groups(self) -> dict[str, Decimal]:
        with self.db.connect() as conn:
            return {r.name: Decimal(r.multiplier) for r in conn.execute(sa.select(t.groups))}

    # -- limits ----------------------------------------------------------------------
    def set_limit(
        self,
        scope: Scope | str,
        target: str,
        metric: Metric | str,
        window: str,
        amount: int | None,
        *,
        per_user: bool = True,
        reset_hour: int = 0,
        timezone: str | None = None,
    ) -> Limit:
        """Create or change the limit on (scope, target, metric, window, per_user)."""
        scope = Scope.parse(scope) if isinstance(scope, str) else scope
        metric = Metric.parse(metric) if isinstance(metric, str) else metric
        parsed = parse_window(window, timezone or self.timezone, reset_hour)
        if amount is not None:
            check_amount(amount, "limit amount")
        if scope is Scope.EVERYONE:
            target = "*"
        _check_name(target, f"{scope.value} name")
        if scope.is_allowance or scope is Scope.KEY or scope is Scope.CHANNEL:
            per_user = scope.is_allowance
        values = dict(
            scope=scope.value,
            target=target,
            metric=metric.value,
            window=parsed.spec,
            reset_hour=parsed.reset_hour,
            timezone=timezone,
            amount=amount,
            per_user=per_user,
        )
        match = (
            (t.limits.c.scope == scope.value)
            & (t.limits.c.target == target)
            & (t.limits.c.metric == metric.value)
            & (t.limits.c.window == parsed.spec)
            & (t.limits.c.per_user == per_user)
        )
        with self.db.begin() as conn:
            if conn.execute(sa.update(t.limits).where(match).values(**values)).rowcount == 0:
                conn.execute(sa.insert(t.limits).values(created_at=time.time(), **values))
            row = conn.execute(sa.select(t.limits).where(match)).one()
            self._bump(conn)
        return self._limit(row)

    def remove_limit(self, limit_id: int) -> bool:
        with self.db.begin() as conn:
            removed = conn.execute(sa.delete(t.limits).where(t.limits.c.id == limit_id)).rowcount
            if removed:
                self._bump(conn)
        return bool(removed)

    def limits(self) -> list[Limit]:
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(t.limits).order_by(t.limits.c.id)).all()
        return [self._limit(r) for r in rows]

    def _limit(self, row: sa.Row) -> Limit:
        return Limit(
            id=row.id,
            scope=Scope(row.scope),
            target=row.target,
            metric=Metric(row.metric),
            window=parse_window(row.window, row.timezone or self.timezone, row.reset_hour),
            amount=row.amount,
            per_user=bool(row.per_user),
        )

    # -- prices ----------------------------------------------------------------------
    def add_price(self, price: Price, source: str = "admin") -> Price:
        """Record a price from its effective time on (now if unset). Old rows stay, so
        usage already charged is never repriced and history can be audited."""
        effective = price.effective_from or datetime.now(UTC)
        stored = dataclasses.replace(price, effective_from=effective)
        self.add_prices([stored], source)
        return stored

    def add_prices(self, prices: Sequence[Price], source: str) -> int:
        """Record several prices in one transaction (all or none)."""
        now = datetime.now(UTC)
        with self.db.begin() as conn:
            for price in prices:
                conn.execute(
                    sa.insert(t.prices).values(
                        model=price.model,
                        provider=price.provider,
                        name=price.name or price.model,
                        input_credits=str(price.input_credits),
                        per_input_tokens=price.per_input_tokens,
                        output_credits=str(price.output_credits),
                        per_output_tokens=price.per_output_tokens,
                        cached_credits=(
                            None if price.cached_credits is None else str(price.cached_credits)
                        ),
                        per_cached_tokens=price.per_cached_tokens,
                        effective_from=(price.effective_from or now).timestamp(),
                        source=source,
                    )
                )
            self._bump(conn)
        return len(prices)

    def prices(self) -> list[Price]:
        """Every price row, oldest first (the policy picks the one in effect)."""
        with self.db.connect() as conn:
            rows = conn.execute(
                sa.select(t.prices).order_by(t.prices.c.effective_from, t.prices.c.id)
            ).all()
        found = []
        for r in rows:
            try:
                found.append(
                    Price(
                        model=r.model,
                        provider=r.provider,
                        name=r.name,
                        input_credits=Decimal(r.input_credits),
                        per_input_tokens=r.per_input_tokens,
                        output_credits=Decimal(r.output_credits),
                        per_output_tokens=r.per_output_tokens,
                        cached_credits=(
                            None if r.cached_credits is None else Decimal(r.cached_credits)
                        ),
                        per_cached_tokens=r.per_cached_tokens,
                        effective_from=datetime.fromtimestamp(r.effective_from, UTC),
                    )
                )
            except (InvalidInput, ArithmeticError) as exc:
                # a row stored before prices were bounded (1e300 credits, say) must not
                # stop every request: it is left out, and said so, until an admin fixes it
                log.error("price row %s is unusable and ignored (%s); set it again", r.id, exc)
        return found

    def current_prices(self, at: datetime | None = None) -> list[Price]:
        moment = at or datetime.now(UTC)
        latest: dict[str, Price] = {}
        for price in self.prices():
            if price.effective_from and price.effective_from <= moment:
                latest[price.model] = price
        return sorted(latest.values(), key=lambda p: (p.provider, p.model))

    # -- API keys --------------------------------------------------------------------
    def create_key(
        self,
        user_id: str,
        name: str = "",
        models: Sequence[str] | None = None,
        *,
        trusted_openwebui: bool = False,
    ) -> tuple[ApiKey, str]:
        """Create a key; returns it with its secret, which is never stored nor shown again."""
        if name:
            check_name(name, "key name", allow_bar=True)
        self.ensure_user(user_id)
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(24)}"
        now = time.time()
        with self.db.begin() as conn:
            conn.execute(
                sa.insert(t.api_keys).values(
                    id=key_id,
                    user_id=user_id,
                    name=name,
                    secret_hash=_digest(secret),
                    models=None if models is None else json.dumps(list(models)),
                    trusted_openwebui=trusted_openwebui,
                    created_at=now,
                )
            )
            self._bump(conn)
        key = ApiKey(key_id, user_id, name, _tuple(models), trusted_openwebui, now, None)
        return key, secret

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, compared in constant time, else None."""
        if not secret.startswith(KEY_PREFIX) or "-" not in secret[len(KEY_PREFIX) :]:
            return None
        key_id = secret[len(KEY_PREFIX) :].split("-", 1)[0]
        with self.db.connect() as conn:
            row = conn.execute(sa.select(t.api_keys).where(t.api_keys.c.id == key_id)).first()
        if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
            return None
        if row.revoked_at is not None:
            return None
        return self._key(row)

    def keys(self, user_id: str | None = None) -> list[ApiKey]:
        query = sa.select(t.api_keys).order_by(t.api_keys.c.created_at)
        if user_id is not None:
            query = query.where(t.api_keys.c.user_id == user_id)
        with self.db.connect() as conn:
            return [self._key(r) for r in conn.execute(query)]

    def revoke_key(self, key_id: str) -> bool:
        with self.db.begin() as conn:
            done = conn.execute(
                sa.update(t.api_keys)
                .where(t.api_keys.c.id == key_id, t.api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            ).rowcount
            self._bump(conn)
        return bool(done)

    @staticmethod
    def _key(row: sa.Row) -> ApiKey:
        models = json.loads(row.models) if row.models else None
        return ApiKey(
            row.id,
            row.user_id,
            row.name,
            _tuple(models),
            bool(row.trusted_openwebui),
            row.created_at,
            row.revoked_at,
        )

    # -- pools and wallets -----------------------------------------------------------
    def set_pool(
        self, name: str, models: Sequence[str] = (), groups: Sequence[str] | None = None
    ) -> Pool:
        _check_name(name, "pool name")
        values = dict(
            models=json.dumps(list(models)),
            groups=None if groups is None else json.dumps(list(groups)),
        )
        with self.db.begin() as conn:
            if (
                conn.execute(
                    sa.update(t.pools).where(t.pools.c.name == name).values(**values)
                ).rowcount
                == 0
            ):
                conn.execute(sa.insert(t.pools).values(name=name, **values))
            self._bump(conn)
        return Pool(name, tuple(models), _tuple(groups))

    def pools(self) -> list[Pool]:
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(t.pools).order_by(t.pools.c.name)).all()
        return [
            Pool(
                r.name,
                tuple(json.loads(r.models)),
                _tuple(json.loads(r.groups) if r.groups else None),
            )
            for r in rows
        ]

    def top_up(self, user_id: str, amount: int, note: str = "") -> int:
        """Add micro-credits to a user's wallet; returns the new balance before spending."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount == 0:
            raise InvalidInput(
                f"top-up must be a non-zero whole number of micro-credits: {amount!r}"
            )
        check_amount(abs(amount), "top-up")
        self.ensure_user(user_id)
        with self.db.begin() as conn:
            conn.execute(
                sa.insert(t.wallet_entries).values(
                    user_id=user_id, amount=amount, note=note, created_at=time.time()
                )
            )
        return self.wallet_funded(user_id)

    def wallet_funded(self, user_id: str) -> int:
        """Everything ever put in the user's wallet (spending is counted by the store)."""
        with self.db.connect() as conn:
            total = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(t.wallet_entries.c.amount), 0)).where(
                    t.wallet_entries.c.user_id == user_id
                )
            ).scalar()
        return int(total or 0)

    # -- snapshot --------------------------------------------------------------------
    def policy(self, default_price: Price | None = None) -> Policy:
        return Policy(
            limits=self.limits(),
            prices=self.prices(),
            multipliers={g: m for g, m in self.groups().items() if m != 1},
            pools=self.pools(),
            default_price=default_price,
        )


def _user(row: sa.Row, members: Sequence[tuple[str, str]]) -> User:
    return User(
        row.id,
        row.role,
        tuple(sorted(g for g, _ in members)),
        row.email,
        row.name,
        role_pinned=bool(row.role_pinned),
        synced_groups=tuple(sorted(g for g, source in members if source == SYNC)),
    )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def _check_name(value: str, what: str) -> None:
    check_name(value, what)


def _decimal(value: object, what: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise InvalidInput(f"{what} must be a number, got {value!r}") from None
    if not result.is_finite() or result < 0:
        raise InvalidInput(f"{what} must be a non-negative number, got {value!r}")
    return result
