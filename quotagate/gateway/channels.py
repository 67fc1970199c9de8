"""Upstream channels: where they come from (config file, database, the demo) and their caps.

A channel's caps are ordinary engine limits of scope ``channel`` that count for everyone
(``per_user`` false): a daily token cap in the configured timezone, requests per minute
and tokens per minute. Being engine limits, they are reserved atomically with the user's
own limits, so a channel never goes over its cap under concurrency, and they reset with
their window. The upstream key is read from an environment variable or a file when the
channel is loaded; it lives only in memory and never appears in a repr, log or listing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from quotagate.config import ChannelConfig, Settings
from quotagate.core.errors import ConfigError, InvalidInput
from quotagate.core.limits import Limit, Metric, Scope
from quotagate.store import schema as t
from quotagate.store.catalog import Catalog

#: (metric, window) of each cap a channel may have, by its name in the configuration
CAPS: dict[str, tuple[Metric, str]] = {
    "daily_token_cap": (Metric.TOKENS, "day"),
    "rpm": (Metric.REQUESTS, "minute"),
    "tpm": (Metric.TOKENS, "minute"),
}

DEMO = "demo"


@dataclass(frozen=True)
class Channel:
    name: str
    base_url: str
    models: Mapping[str, str]  # public name -> upstream name
    priority: int = 0
    weight: int = 1
    source: str = "config"  # config | database | demo
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key: str | None = field(default=None, repr=False, compare=False)

    def upstream_model(self, model: str) -> str:
        return self.models.get(model, model)

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def key_source(self) -> str:
        """Where the key comes from, for listings (the key itself is never shown)."""
        if self.api_key_env:
            return f"env:{self.api_key_env}"
        if self.api_key_file:
            return f"file:{self.api_key_file}"
        return "none"


def read_key(env: str | None, file: str | None, name: str) -> str | None:
    """The upstream key from its environment variable or secrets file (stripped)."""
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"channel {name}: environment variable {env} is not set")
        return value.strip()
    if file:
        try:
            return Path(file).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"channel {name}: cannot read key file {file}: {exc}") from None
    return None


def from_config(config: ChannelConfig, source: str = "config") -> Channel:
    return Channel(
        name=config.name,
        base_url=config.base_url,
        models=config.model_map,
        priority=config.priority,
        weight=config.weight,
        source=source,
        api_key_env=config.api_key_env,
        api_key_file=config.api_key_file,
        api_key=read_key(config.api_key_env, config.api_key_file, config.name),
    )


def demo_channel(base_url: str, models: Iterable[str]) -> Channel:
    return Channel(DEMO, base_url.rstrip("/"), {m: m for m in models}, source=DEMO)


# -- channels stored in the database (`quotagate channels add`) ----------------------------


class ChannelStore:
    """Channels added from the CLI, in the ``channels`` table of the catalog's database."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def add(self, config: ChannelConfig) -> ChannelConfig:
        """Create or replace the channel and set its caps (a cap left out is removed)."""
        values = dict(
            base_url=config.base_url,
            api_key_env=config.api_key_env,
            api_key_file=config.api_key_file,
            models=json.dumps(config.models),
            priority=config.priority,
            weight=config.weight,
        )
        with self.catalog.db.begin() as conn:
            updated = conn.execute(
                sa.update(t.channels).where(t.channels.c.name == config.name).values(**values)
            ).rowcount
            if not updated:
                conn.execute(
                    sa.insert(t.channels).values(name=config.name, created_at=time.time(), **values)
                )
            self.catalog._bump(conn)
        apply_caps(self.catalog, config)
        return config

    def remove(self, name: str) -> bool:
        with self.catalog.db.begin() as conn:
            removed = conn.execute(sa.delete(t.channels).where(t.channels.c.name == name)).rowcount
            if removed:
                self.catalog._bump(conn)
        if removed:
            for limit in channel_limits(self.catalog, name):
                self.catalog.remove_limit(limit.id)
        return bool(removed)

    def list(self) -> list[ChannelConfig]:
        with self.catalog.db.connect() as conn:
            rows = conn.execute(sa.select(t.channels).order_by(t.channels.c.name)).all()
        found = []
        for row in rows:
            caps = caps_of(self.catalog, row.name)
            found.append(
                ChannelConfig(
                    name=row.name,
                    base_url=row.base_url,
                    api_key_env=row.api_key_env,
                    api_key_file=row.api_key_file,
                    models=json.loads(row.models),
                    priority=row.priority,
                    weight=row.weight,
                    **caps,
                )
            )
        return found


def channel_limits(catalog: Catalog, name: str) -> list[Limit]:
    return [
        limit for limit in catalog.limits() if limit.scope is Scope.CHANNEL and limit.target == name
    ]


def caps_of(catalog: Catalog, name: str, limits: list[Limit] | None = None) -> dict[str, int]:
    """The caps a channel has in the catalog, by configuration name."""
    found = {}
    for limit in limits if limits is not None else channel_limits(catalog, name):
        if limit.target != name or limit.scope is not Scope.CHANNEL:
            continue
        for cap, (metric, window) in CAPS.items():
            if limit.metric is metric and limit.window.kind == window and limit.amount is not None:
                found[cap] = limit.amount
    return found


def apply_caps(catalog: Catalog, config: ChannelConfig, limits: list[Limit] | None = None) -> bool:
    """Make the channel's cap limits match `config`; True if anything changed.

    Only the three caps are managed here; other channel limits an admin set with
    ``quotagate limits set --channel`` are left alone.
    """
    existing = [
        limit
        for limit in (limits if limits is not None else catalog.limits())
        if limit.scope is Scope.CHANNEL and limit.target == config.name
    ]
    changed = False
    for cap, (metric, window) in CAPS.items():
        wanted = getattr(config, cap)
        current = [
            limit for limit in existing if limit.metric is metric and limit.window.kind == window
        ]
        if wanted is None:
            for limit in current:
                catalog.remove_limit(limit.id)
                changed = True
        elif len(current) != 1 or current[0].amount != wanted:
            for limit in current[1:]:
                catalog.remove_limit(limit.id)
            catalog.set_limit(Scope.CHANNEL, config.name, metric, window, wanted, per_user=False)
            changed = True
    return changed


def load_channels(settings: Settings, catalog: Catalog) -> list[Channel]:
    """Channels of the configuration file and of the database (the file wins on a name)."""
    channels = {c.name: from_config(c) for c in settings.channels}
    for config in ChannelStore(catalog).list():
        if config.name not in channels:
            channels[config.name] = from_config(config, "database")
    return list(channels.values())


def sync_config_caps(settings: Settings, catalog: Catalog) -> None:
    """Bring the caps of the configuration file's channels into the catalog."""
    if not settings.channels:
        return
    limits = catalog.limits()
    for config in settings.channels:
        apply_caps(catalog, config, limits)


def check_name(name: str) -> str:
    if not name or "|" in name or any(c.isspace() for c in name) or len(name) > 255:
        raise InvalidInput(f"channel name must be 1-255 characters without spaces or '|': {name!r}")
    return name
