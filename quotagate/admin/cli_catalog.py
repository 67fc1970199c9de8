"""`quotagate limits|users|groups|pools|wallet`: who may use how much.

Every argument is checked before the database is opened, so a typo is reported as bad
input (exit status 2) and changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from quotagate.admin.common import (
    TableOrJson,
    credits_number,
    done,
    opened,
    out,
    parse_amount,
    parse_credits,
    parse_decimal,
    print_json,
    state,
    table,
    user_id,
)
from quotagate.admin.common import note as notice
from quotagate.core.errors import InvalidInput
from quotagate.core.limits import Limit, Metric, Scope, format_amount
from quotagate.core.text import check_name
from quotagate.core.windows import parse_window
from quotagate.engine import Engine
from quotagate.store.catalog import KEY_PREFIX

limits_app = typer.Typer(no_args_is_help=True, help="Allowances and caps per window.")
users_app = typer.Typer(no_args_is_help=True, help="Users, their role and their groups.")
groups_app = typer.Typer(no_args_is_help=True, help="Credit groups and price multipliers.")
pools_app = typer.Typer(no_args_is_help=True, help="Sponsored pools: shared budgets.")
wallet_app = typer.Typer(no_args_is_help=True, help="Prepaid credit wallets.")


def register(app: typer.Typer) -> None:
    app.add_typer(limits_app, name="limits")
    app.add_typer(users_app, name="users")
    app.add_typer(groups_app, name="groups")
    app.add_typer(pools_app, name="pools")
    app.add_typer(wallet_app, name="wallet")


def describe_limit(limit: Limit) -> str:
    amount = format_amount(limit.metric, limit.amount)
    unit = limit.metric.value.replace("_", " ")
    return f"{limit.describe()}: {amount} {unit} per {limit.window.describe()}"


# -- limits ------------------------------------------------------------------------------


@limits_app.command("set")
def limits_set(
    ctx: typer.Context,
    amount: Annotated[
        str, typer.Argument(help="whole tokens or requests, credits (12.5), or 'unlimited'")
    ],
    everyone: Annotated[
        bool, typer.Option("--everyone", help="the base allowance of every user")
    ] = False,
    role: Annotated[
        str | None, typer.Option(help="default allowance of a role", show_default=False)
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="grant of a group, added to the base", show_default=False)
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            help="override that replaces the user's allowance (user id, or email)",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="cap on a model (applies on top)", show_default=False)
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="cap on an API key id (applies on top)", show_default=False)
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="cap of a sponsored pool", show_default=False)
    ] = None,
    channel: Annotated[
        str | None, typer.Option(help="cap on an upstream channel", show_default=False)
    ] = None,
    per_user: Annotated[
        bool,
        typer.Option("--per-user", help="with --model or --pool: each user has this much"),
    ] = False,
    metric: Annotated[
        str, typer.Option(help="tokens, input_tokens, output_tokens, requests or credits")
    ] = "tokens",
    window: Annotated[
        str,
        typer.Option(help="minute, hour, day, week, month, lifetime or rolling:<n><s|m|h|d|w>"),
    ] = "day",
    reset_hour: Annotated[
        int, typer.Option(help="hour (0-23) at which day, week and month windows start")
    ] = 0,
    timezone: Annotated[
        str | None,
        typer.Option(help="timezone of calendar windows (default: configured)", show_default=False),
    ] = None,
) -> None:
    """Create or change a limit (the same subject, metric and window is updated in place).

    Examples: `limits set --role user --metric tokens --window day 10000`,
    `limits set --role admin unlimited`, `limits set --model gpt-4o --per-user 20000`.
    """
    subjects = [
        (scope, target)
        for scope, target in (
            (Scope.EVERYONE, "*" if everyone else None),
            (Scope.ROLE, role),
            (Scope.GROUP, group),
            (Scope.USER, user),
            (Scope.MODEL, model),
            (Scope.KEY, key),
            (Scope.POOL, pool),
            (Scope.CHANNEL, channel),
        )
        if target is not None
    ]
    if len(subjects) != 1:
        raise InvalidInput(
            "say whom the limit binds with exactly one of --everyone, --role, --group, "
            f"--user, --model, --key, --pool, --channel (got {len(subjects)})"
        )
    scope, target = subjects[0]
    if per_user and scope not in (Scope.MODEL, Scope.POOL):
        raise InvalidInput("--per-user applies to --model and --pool limits only")
    parsed_metric = Metric.parse(metric)
    parse_window(window, timezone or state(ctx).settings().timezone, reset_hour)
    parsed_amount = parse_amount(amount, parsed_metric)
    with opened(ctx) as engine:
        if scope is Scope.USER:
            target = user_id(engine, target)
        _check_subject(ctx, engine, scope, target)
        if scope is Scope.USER:
            _note_if_unknown(engine, target, "the limit binds")
        limit = engine.catalog.set_limit(
            scope,
            target,
            parsed_metric,
            window,
            parsed_amount,
            per_user=per_user,
            reset_hour=reset_hour,
            timezone=timezone,
        )
    done(f"limit {limit.id}: {describe_limit(limit)}")


@limits_app.command("list")
def limits_list(
    ctx: typer.Context,
    format: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """Every limit, with the id `limits remove` takes."""
    with opened(ctx) as engine:
        limits = engine.catalog.limits()
    if format is TableOrJson.json:
        print_json([limit_record(limit) for limit in limits])
        return
    rows = [
        (
            limit.id,
            limit.describe(),
            limit.metric.value,
            limit.window.describe(),
            limit.window.tz
            if limit.window.kind in ("minute", "hour", "day", "week", "month")
            else "",
            format_amount(limit.metric, limit.amount),
        )
        for limit in limits
    ]
    out.print(table("Limits", (">id", "binds", "metric", "window", "timezone", ">amount"), rows))


def limit_record(limit: Limit) -> dict[str, Any]:
    calendar = limit.window.kind in ("minute", "hour", "day", "week", "month")
    return {
        "id": limit.id,
        "scope": limit.scope.value,
        "target": limit.target,
        "per_user": limit.per_user,
        "metric": limit.metric.value,
        "window": limit.window.spec,
        "reset_hour": limit.window.reset_hour,
        "timezone": limit.window.tz if calendar else None,
        "amount": credits_number(limit.amount)
        if limit.metric is Metric.CREDITS and limit.amount is not None
        else limit.amount,
        "description": describe_limit(limit),
    }


@limits_app.command("remove")
def limits_remove(
    ctx: typer.Context, limit_id: Annotated[int, typer.Argument(help="id from `limits list`")]
) -> None:
    """Remove a limit. Counters already charged stay in the ledger."""
    with opened(ctx) as engine:
        if not engine.catalog.remove_limit(limit_id):
            raise InvalidInput(f"no limit with id {limit_id} (see `quotagate limits list`)")
    done(f"removed limit {limit_id}")


# -- users and groups --------------------------------------------------------------------


@users_app.command("list")
def users_list(
    ctx: typer.Context,
    format: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """Every user QuotaGate has seen or an admin has set up. A role marked "(set here)" was
    given with `users set-role` and no longer follows Open WebUI; groups marked "(Open
    WebUI)" came from Open WebUI's groups and follow them."""
    with opened(ctx) as engine:
        users = engine.catalog.users()
    if format is TableOrJson.json:
        print_json(
            [
                {
                    "id": u.id,
                    "role": u.role,
                    "role_set_by_admin": u.role_pinned,
                    "groups": list(u.groups),
                    "groups_from_openwebui": list(u.synced_groups),
                    "email": u.email,
                    "name": u.name,
                }
                for u in users
            ]
        )
        return
    rows = [
        (
            u.id,
            u.role + (" (set here)" if u.role_pinned else ""),
            ", ".join(g + (" (Open WebUI)" if g in u.synced_groups else "") for g in u.groups),
            u.email or "",
        )
        for u in users
    ]
    out.print(table("Users", ("user", "role", "groups", "email"), rows))


def _note_if_unknown(engine: Engine, target: str, what: str) -> None:
    """Say so when `target` is nobody yet: an Open WebUI person is known by a UUID, and by
    their email only after their first chat, so an email nobody has becomes a user of
    that id, who is not the person the admin meant. (An id that cannot be one is refused
    first, without the note.)"""
    check_name(target, "user id")
    if engine.catalog.user(target) is None:
        notice(
            f"no user has the id or email {target!r} yet: {what} a user of that id once "
            "one appears (Open WebUI's users: their id, or their email after their first "
            "chat; see `quotagate users list`)"
        )


@users_app.command("set-role")
def users_set_role(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="user id, or the email of one user")],
    role: Annotated[str | None, typer.Argument(show_default=False)] = None,
    follow_openwebui: Annotated[
        bool,
        typer.Option(
            "--follow-openwebui",
            help="instead of a role: let the user's role follow Open WebUI's again",
        ),
    ] = False,
) -> None:
    """Give a user a role (creating the user if needed). It stays: Open WebUI's role no
    longer replaces it, until `users set-role USER --follow-openwebui`."""
    if (role is not None) == follow_openwebui:
        raise InvalidInput("give either a ROLE or --follow-openwebui")
    if role is not None:
        _check_name(role, "role")
    with opened(ctx) as engine:
        target = user_id(engine, user)
        _note_if_unknown(engine, target, "the role is given to")
        found = engine.catalog.set_role(target, role)
    if role is None:
        done(f"user {found.id} has role {found.role}; it follows Open WebUI's from their next chat")
    else:
        done(f"user {found.id} has role {found.role} (Open WebUI's role no longer changes it)")


@users_app.command("add-group")
def users_add_group(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="user id, or the email of one user")],
    group: str,
) -> None:
    """Add a user to a credit group: its grants add to the user's allowance. The
    membership stays whatever Open WebUI's groups say."""
    with opened(ctx) as engine:
        target = user_id(engine, user)
        _note_if_unknown(engine, target, "the group is given to")
        found = engine.catalog.add_member(target, group)
    done(f"user {found.id} is in {', '.join(found.groups)}")


@users_app.command("remove-group")
def users_remove_group(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="user id, or the email of one user")],
    group: str,
) -> None:
    """Take a user out of a group."""
    with opened(ctx) as engine:
        found = engine.catalog.user(user_id(engine, user))
        if found is None:
            raise InvalidInput(f"no user {user!r}")
        if group not in found.groups:
            raise InvalidInput(f"user {user!r} is not in group {group!r}")
        synced = group in found.synced_groups
        found = engine.catalog.remove_member(found.id, group)
    groups = ", ".join(found.groups) or "no group"
    done(f"user {found.id} left {group}; now in {groups}")
    if synced:
        notice(
            f"{group!r} came from Open WebUI's groups: it comes back with the user's next chat "
            "while Open WebUI has them in it (remove them there, or set openwebui_groups = "
            '"ignore")'
        )


@groups_app.command("multiplier")
def groups_multiplier(
    ctx: typer.Context,
    group: str,
    multiplier: Annotated[str, typer.Argument(help="e.g. 0.5: members pay half the price")],
) -> None:
    """Scale the credit price of a group's members (their most favourable group counts)."""
    value = parse_decimal(multiplier, "multiplier")
    with opened(ctx) as engine:
        engine.catalog.set_multiplier(group, value)
    done(f"group {group} pays {value}x the price")


@groups_app.command("list")
def groups_list(
    ctx: typer.Context,
    format: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """Every group with its multiplier and number of members."""
    with opened(ctx) as engine:
        groups = engine.catalog.groups()
        members: dict[str, int] = {}
        for user in engine.catalog.users():
            for group in user.groups:
                members[group] = members.get(group, 0) + 1
    if format is TableOrJson.json:
        print_json(
            [
                {"group": g, "multiplier": str(m), "members": members.get(g, 0)}
                for g, m in sorted(groups.items())
            ]
        )
        return
    rows = [(g, m, members.get(g, 0)) for g, m in sorted(groups.items())]
    out.print(table("Groups", ("group", ">multiplier", ">members"), rows))


# -- pools and wallets -------------------------------------------------------------------


@pools_app.command("set")
def pools_set(
    ctx: typer.Context,
    name: str,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="model bound to the pool (repeat)", show_default=False),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", help="group allowed to draw (repeat); none: everyone"),
    ] = None,
) -> None:
    """Create or change a pool. Set its caps with `limits set --pool NAME [--per-user]`."""
    with opened(ctx) as engine:
        found = engine.catalog.set_pool(name, model or [], group or None)
    models = ", ".join(found.models) or "none (requests name the pool)"
    groups = ", ".join(found.groups) if found.groups is not None else "everyone"
    done(f"pool {found.name}: models {models}; open to {groups}")


@pools_app.command("list")
def pools_list(ctx: typer.Context) -> None:
    """Every pool with its models, groups and caps."""
    with opened(ctx) as engine:
        pools = engine.catalog.pools()
        limits = engine.catalog.limits()
    rows = []
    for pool in pools:
        caps = [
            describe_limit(lim)
            for lim in limits
            if lim.scope is Scope.POOL and lim.target == pool.name
        ]
        rows.append(
            (
                pool.name,
                ", ".join(pool.models),
                ", ".join(pool.groups) if pool.groups is not None else "everyone",
                "; ".join(caps) or "no cap: unlimited",
            )
        )
    out.print(table("Pools", ("pool", "models", "open to", "caps"), rows))


@wallet_app.command("top-up")
def wallet_top_up(
    ctx: typer.Context,
    user: str,
    credits: Annotated[
        str, typer.Argument(help="credits to add (after `--`, negative takes back)")
    ],
    note: Annotated[str, typer.Option(help="why, for the record")] = "",
) -> None:
    """Add credits to a user's prepaid wallet, drawn from after their allowances run out."""
    amount = parse_credits(credits, "credits", allow_negative=True)
    if amount == 0:
        raise InvalidInput("credits to add must not be zero")
    with opened(ctx) as engine:
        user = user_id(engine, user)
        funded = engine.catalog.top_up(user, amount, note)
    done(f"wallet of {user}: {format_amount(Metric.CREDITS, funded)} credits put in so far")


@wallet_app.command("show")
def wallet_show(
    ctx: typer.Context,
    user: str,
    format: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """What a user's wallet received, spent, holds for requests in flight, and has left."""
    import asyncio

    with opened(ctx) as engine:
        user = user_id(engine, user)
        funded = engine.catalog.wallet_funded(user)
        statuses = asyncio.run(engine.status(user))
    wallet = next((s for s in statuses if s.label.startswith("wallet of")), None)
    used = wallet.used if wallet else 0
    reserved = wallet.reserved if wallet else 0
    left = max(0, funded - used - reserved)
    if format is TableOrJson.json:
        print_json(
            {
                "user": user,
                "funded": credits_number(funded),
                "spent": credits_number(used),
                "reserved": credits_number(reserved),
                "left": credits_number(left),
            }
        )
        return
    cells = [format_amount(Metric.CREDITS, v) for v in (funded, used, reserved, left)]
    out.print(
        table(
            f"Wallet of {user} (credits)",
            (">put in", ">spent", ">reserved", ">left"),
            [cells],
        )
    )


def _check_subject(ctx: typer.Context, engine: Engine, scope: Scope, target: str) -> None:
    """A cap on a key, channel or pool that does not exist would silently bind nothing
    (a typo, or a key named by its secret instead of its id): refuse it. A user need not
    exist yet, but their id must be usable."""
    if scope is Scope.USER:
        check_name(target, "user name")
    if scope is Scope.KEY and target.startswith(KEY_PREFIX):
        key_id = target.removeprefix(KEY_PREFIX).split("-")[0]
        raise InvalidInput(f"--key takes a key's id, not its secret: use {key_id!r}")
    api_keys = engine.catalog.keys() if scope is Scope.KEY else []
    if scope is Scope.KEY and target not in {k.id for k in api_keys}:
        raise InvalidInput(
            f"no API key with id {target!r}: name a key by the id `quotagate keys list` "
            "shows (in a secret qg-ID-..., the part after qg-)"
        )
    if scope is Scope.CHANNEL:
        from quotagate.gateway.channels import ChannelStore

        known = {c.name for c in state(ctx).settings().channels}
        known |= {c.name for c in ChannelStore(engine.catalog).list()}
        if target not in known:
            raise InvalidInput(
                f"no channel {target!r}: add it with `quotagate channels add` or in "
                "quotagate.toml first (`quotagate channels list` shows them)"
            )
    if scope is Scope.POOL and target not in {p.name for p in engine.catalog.pools()}:
        raise InvalidInput(f"no pool {target!r}: create it first with `quotagate pools set`")


def _check_name(value: str, what: str) -> None:
    check_name(value, what, max_length=64)
