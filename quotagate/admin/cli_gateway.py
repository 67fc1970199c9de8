"""`quotagate serve|keys|channels`: run the gateway, hand out API keys, manage upstreams.

Secrets never reach a listing: a key's secret is printed once, when it is created; a
channel shows where its upstream key comes from (``env:NAME`` or ``file:PATH``), never
the key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from quotagate.admin.common import (
    TableOrJson,
    done,
    note,
    opened,
    out,
    print_json,
    state,
    table,
    user_id,
)
from quotagate.config import ChannelConfig
from quotagate.core.errors import InvalidInput

keys_app = typer.Typer(no_args_is_help=True, help="API keys of the gateway.")
channels_app = typer.Typer(no_args_is_help=True, help="Upstream channels of the gateway.")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(keys_app, name="keys")
    app.add_typer(channels_app, name="channels")


# -- serve -------------------------------------------------------------------------------


def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="address to listen on [default: settings.host, 127.0.0.1]")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="port to listen on [default: settings.port, 8000]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="worker processes sharing the store [default: 1]")
    ] = None,
    quota_api_only: Annotated[
        bool,
        typer.Option(
            "--quota-api-only",
            help="only the quota API the Open WebUI filters call: no model routes, no demo "
            "upstream (setting quota_api_only)",
        ),
    ] = False,
) -> None:
    """Run the OpenAI-compatible gateway. With no channel configured it routes to a
    built-in demo model, on the embedded SQLite store (created on first use). With
    --quota-api-only it serves only the quota API of the Open WebUI filters."""
    from quotagate.gateway.server import serve as run

    settings = state(ctx).settings()
    if quota_api_only:
        settings = settings.model_copy(update={"quota_api_only": True})
    run(
        settings,
        host or settings.host,
        settings.port if port is None else port,
        workers or settings.workers,
    )


# -- keys --------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", "-u", help="the user the key charges")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="a model the key may use (repeat); default: all"),
    ] = None,
    name: Annotated[str, typer.Option("--name", "-n", help="a label to recognise it")] = "",
    trusted_openwebui: Annotated[
        bool,
        typer.Option(
            "--trusted-openwebui",
            help="charge the user Open WebUI names in X-OpenWebUI-User-Id (one key for an "
            "Open WebUI instance, quotas per person)",
        ),
    ] = False,
) -> None:
    """Create an API key. Its secret is printed once and stored only as a hash."""
    with opened(ctx, create=True) as engine:
        key, secret = engine.catalog.create_key(
            user_id(engine, user), name, model or None, trusted_openwebui=trusted_openwebui
        )
    done(f"created key {key.id} for {key.user_id}" + (f" ({name})" if name else ""))
    note("the secret is shown this once; store it now")
    print(secret)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", "-u", help="only this user's keys")] = None,
    output: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """List keys (id, user, name, models, created, revoked) — never their secrets."""
    with opened(ctx) as engine:
        keys = engine.catalog.keys(None if user is None else user_id(engine, user))
    records = [
        {
            "id": k.id,
            "user": k.user_id,
            "name": k.name,
            "models": list(k.models) if k.models is not None else None,
            "trusted_openwebui": k.trusted_openwebui,
            "created_at": _iso(k.created_at),
            "revoked_at": _iso(k.revoked_at),
        }
        for k in keys
    ]
    if output is TableOrJson.json:
        print_json(records)
        return
    rows = [
        [
            k.id,
            k.user_id,
            k.name,
            "all" if k.models is None else ", ".join(k.models),
            "yes" if k.trusted_openwebui else "",
            _iso(k.created_at),
            _iso(k.revoked_at) or "",
        ]
        for k in keys
    ]
    columns = ["id", "user", "name", "models", "open webui", "created", "revoked"]
    out.print(table(None, columns, rows))


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="key id")]) -> None:
    """Revoke a key: running gateways refuse it within a second."""
    with opened(ctx) as engine:
        revoked = engine.catalog.revoke_key(key_id)
    if not revoked:
        raise InvalidInput(f"no live key {key_id!r}")
    done(f"revoked key {key_id}")


# -- channels ----------------------------------------------------------------------------


@channels_app.command("add")
def channels_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="channel name")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. .../v1")],
    model: Annotated[
        list[str],
        typer.Option(
            "--model", "-m", help="a model it serves (repeat); PUBLIC=UPSTREAM renames it"
        ),
    ],
    api_key_env: Annotated[
        str | None, typer.Option(help="environment variable holding the upstream key")
    ] = None,
    api_key_file: Annotated[str | None, typer.Option(help="file holding the upstream key")] = None,
    priority: Annotated[int, typer.Option(help="higher is tried first")] = 0,
    weight: Annotated[int, typer.Option(min=1, help="share among equal priorities")] = 1,
    daily_token_cap: Annotated[
        int | None, typer.Option(min=0, help="tokens per day (configured timezone)")
    ] = None,
    rpm: Annotated[int | None, typer.Option(min=0, help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(min=0, help="tokens per minute")] = None,
) -> None:
    """Add (or replace) a channel in the database; running gateways pick it up."""
    from quotagate.gateway.channels import ChannelStore, read_key

    if api_key_env and api_key_file:
        raise InvalidInput("give --api-key-env or --api-key-file, not both")
    models = _models(model)
    config = _channel_config(
        name=name,
        base_url=base_url,
        api_key_env=api_key_env,
        api_key_file=api_key_file,
        models=models,
        priority=priority,
        weight=weight,
        daily_token_cap=daily_token_cap,
        rpm=rpm,
        tpm=tpm,
    )
    settings = state(ctx).settings()
    if any(c.name == name for c in settings.channels):
        raise InvalidInput(f"channel {name!r} is defined in the configuration file; edit it there")
    try:
        read_key(api_key_env, api_key_file, name)
    except Exception as exc:
        note(f"{exc} (the gateway needs it when it loads the channel)")
    with opened(ctx, create=True) as engine:
        ChannelStore(engine.catalog).add(config)
    done(f"channel {name}: {base_url}, {len(models)} models")


@channels_app.command("list")
def channels_list(
    ctx: typer.Context,
    output: Annotated[TableOrJson, typer.Option("--format", "-f")] = TableOrJson.table,
) -> None:
    """Channels of the configuration file and of the database, with their caps."""
    from quotagate.gateway.channels import ChannelStore, caps_of

    settings = state(ctx).settings()
    names = {c.name for c in settings.channels}
    with opened(ctx) as engine:
        stored = [c for c in ChannelStore(engine.catalog).list() if c.name not in names]
        limits = engine.catalog.limits()
        found = [(c, "config", caps_of(engine.catalog, c.name, limits)) for c in settings.channels]
        found += [(c, "database", caps_of(engine.catalog, c.name, limits)) for c in stored]
    if output is TableOrJson.json:
        print_json([_channel_record(c, source, caps) for c, source, caps in found])
        return
    if not found:
        note("no channel configured: `quotagate serve` routes to the built-in demo upstream")
        return
    rows = [
        [
            c.name,
            source,
            c.base_url,
            _key_source(c) or "",
            ", ".join(p if p == u else f"{p}={u}" for p, u in c.model_map.items()),
            c.priority,
            c.weight,
            _cap(caps.get("daily_token_cap")),
            _cap(caps.get("rpm")),
            _cap(caps.get("tpm")),
        ]
        for c, source, caps in found
    ]
    columns = ["name", "from", "base url", "key", "models", ">priority", ">weight"]
    out.print(table(None, [*columns, ">tokens/day", ">rpm", ">tpm"], rows))


def _channel_record(config: ChannelConfig, source: str, caps: dict[str, int]) -> dict[str, Any]:
    return {
        "name": config.name,
        "source": source,
        "base_url": config.base_url,
        "key": _key_source(config),
        "models": config.model_map,
        "priority": config.priority,
        "weight": config.weight,
        **{cap: caps.get(cap) for cap in ("daily_token_cap", "rpm", "tpm")},
    }


def _key_source(config: ChannelConfig) -> str | None:
    if config.api_key_env:
        return f"env:{config.api_key_env}"
    if config.api_key_file:
        return f"file:{config.api_key_file}"
    return None


@channels_app.command("remove")
def channels_remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Remove a channel added with `channels add` (and its caps)."""
    from quotagate.gateway.channels import ChannelStore

    settings = state(ctx).settings()
    if any(c.name == name for c in settings.channels):
        raise InvalidInput(f"channel {name!r} is defined in the configuration file; edit it there")
    with opened(ctx) as engine:
        removed = ChannelStore(engine.catalog).remove(name)
    if not removed:
        raise InvalidInput(f"no channel {name!r} in the database")
    done(f"removed channel {name}")


def _models(values: list[str]) -> list[str] | dict[str, str]:
    pairs = [v.partition("=") for v in values]
    for public, _, upstream in pairs:
        if not public.strip() or (upstream == "" and "=" in public):
            raise InvalidInput(f"bad --model value {public!r}: use NAME or PUBLIC=UPSTREAM")
    if any(sep for _, sep, _ in pairs):
        return {p.strip(): (u.strip() or p.strip()) for p, _, u in pairs}
    return [p.strip() for p, _, _ in pairs]


def _channel_config(**values: Any) -> ChannelConfig:
    import pydantic

    try:
        return ChannelConfig(**values)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInput(f"invalid channel: {problems}") from None


def _cap(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
