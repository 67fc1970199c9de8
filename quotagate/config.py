"""Settings, from environment variables (``QUOTAGATE_*``) and an optional TOML file.

The file is ``quotagate.toml`` in the working directory, or the path in
``QUOTAGATE_CONFIG``; environment variables win over it.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: seconds a request waits for the counter store before it is answered 503
DEFAULT_STORE_TIMEOUT = 5.0


class ChannelConfig(BaseModel):
    """An upstream the gateway routes to (a ``[[channels]]`` table of quotagate.toml).

    The upstream key is never written here: name the environment variable or the file
    that holds it. Caps become channel limits of the engine, so they are exact and reset
    with their window (the day in the configured timezone, the minute).
    """

    name: str = Field(min_length=1, max_length=255, pattern=r"^[^|\s]+$")
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    api_key_env: str | None = None
    api_key_file: str | None = None
    models: list[str] | dict[str, str] = Field(
        description="public model names, or a table public name -> upstream name"
    )
    priority: int = 0
    weight: int = Field(1, ge=1)
    daily_token_cap: int | None = Field(None, ge=0)
    rpm: int | None = Field(None, ge=0, description="requests per minute")
    tpm: int | None = Field(None, ge=0, description="tokens per minute")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @property
    def model_map(self) -> dict[str, str]:
        """public name -> name sent upstream"""
        if isinstance(self.models, dict):
            return dict(self.models)
        return {m: m for m in self.models}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUOTAGATE_", extra="ignore")

    database_url: str = Field(
        "sqlite:///quotagate.db", description="memory://, sqlite:///path or a SQLAlchemy URL"
    )
    timezone: str = Field("UTC", description="where calendar windows start and end")
    mode: Literal["strict", "optimistic"] = "strict"
    default_max_tokens: int = Field(
        2048, ge=1, description="completion budget reserved when a request names none"
    )
    min_output_tokens: int = Field(1, ge=1, description="refuse if fewer would be left")
    lease_seconds: float = Field(600.0, gt=0, description="how long a ticket may stay open")
    on_expiry: Literal["charge", "release"] = "charge"
    unknown_models: Literal["default_price", "refuse"] = "default_price"
    # at most a billion credits per token, the bound of every price (core.pricing)
    default_input_credits: Decimal = Field(
        Decimal(10_000), ge=0, le=10**15, allow_inf_nan=False, description="per 1M input tokens"
    )
    default_output_credits: Decimal = Field(
        Decimal(30_000), ge=0, le=10**15, allow_inf_nan=False, description="per 1M output tokens"
    )
    credits_per_usd: Decimal = Field(Decimal(1000), gt=0)
    default_daily_tokens: int = Field(100_000, ge=0, description="set by `quotagate init`")
    bytes_per_token: float = Field(3.0, gt=0, description="offline token estimate")
    catalog_refresh_seconds: float = Field(1.0, ge=0)
    store_timeout: float = Field(
        DEFAULT_STORE_TIMEOUT,
        gt=0,
        description="seconds a call waits for the store (another process holding SQLite's "
        "write lock, say) before it fails with StoreUnavailable: HTTP 503 store_unavailable",
    )

    # -- shared stores (PostgreSQL, Redis) ----------------------------------------------
    counter_url: str | None = Field(
        None,
        description="redis://, rediss:// or redis+sentinel://host:port[,host:port]/service: "
        "counters and tickets in Redis, the ledger and catalog in database_url (PostgreSQL); "
        "unset: counters live in database_url too",
    )
    counter_prefix: str = Field(
        "qg",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of every Redis key; also its Cluster hash tag",
    )
    store_down: Literal["refuse", "local"] = Field(
        "refuse",
        description="with Redis unreachable: refuse (503 store_unavailable) or count in this "
        "process (seeded from the last known values, merged back when Redis returns)",
    )
    spool_dir: str = Field(
        "quotagate-spool",
        description="where ledger rows wait on local disk until PostgreSQL has them",
    )
    spool_fsync: bool = Field(
        False,
        description="fsync the spool before a settle returns: survives a machine crash, "
        "not only a process crash, at the cost of one fsync per batch",
    )
    ledger_batch_rows: int = Field(1000, ge=1, description="ledger rows per PostgreSQL write")
    ledger_flush_seconds: float = Field(
        0.05, gt=0, description="longest a settled row waits in the spool before it is sent"
    )

    @field_validator("counter_url")
    @classmethod
    def _counter_store_built(cls, value: str | None) -> str | None:
        # The Redis counter store is not built yet (issue 9): refuse the setting loudly
        # rather than keep counters in database_url while the operator believes otherwise.
        if value is not None:
            raise ValueError(
                "counters in Redis are not available in this version yet; "
                "unset counter_url (counters live in database_url)"
            )
        return value

    # -- gateway (`quotagate serve`) ---------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    channels: list[ChannelConfig] = Field(
        default_factory=list, description="upstreams; none anywhere: the built-in demo"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # what a client connection may take (quotagate/gateway/protocol.py)
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds to send a request's line and headers, from connecting (or from "
        "its first byte on a kept-alive connection): a silent connection is closed, a slow "
        "one gets 408",
    )
    body_timeout: float = Field(
        60.0, gt=0, description="seconds to send a request's body after its headers, else 408"
    )
    keep_alive_timeout: int = Field(
        30, ge=1, description="seconds an idle kept-alive connection stays open between requests"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="request line and headers; larger get 431"
    )
    max_headers: int = Field(100, ge=8, description="header fields of a request; more get 431")
    max_connections: int = Field(
        1000,
        ge=1,
        description="open client connections per worker process; beyond it the longest-idle "
        "connection is closed, or the new one gets 503 when all are busy (lowered to fit "
        "the process's descriptor limit)",
    )
    auth_cache_seconds: float = Field(10.0, ge=0, description="how long a key lookup is reused")
    channel_failures: int = Field(3, ge=1, description="consecutive failures before cool-down")
    channel_cooldown_seconds: float = Field(30.0, ge=0)
    upstream_connect_timeout: float = Field(10.0, gt=0)
    upstream_timeout: float = Field(600.0, gt=0, description="per read from the upstream")
    max_upstream_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="an upstream answer larger than this, decoded: 502"
    )
    sweep_seconds: float = Field(30.0, gt=0, description="how often expired tickets are settled")
    access_log: bool = True
    graceful_shutdown_seconds: float = Field(30.0, ge=0)
    quota_api_only: bool = Field(
        False,
        description="serve only the quota API the Open WebUI filters call (and health, "
        "metrics): no model routes, no channels, no demo upstream",
    )

    # -- Open WebUI (gateway mode, and the engine API the filters call) ------------------
    openwebui_roles: dict[str, str] = Field(
        default_factory=lambda: {"admin": "admin", "user": "user", "pending": "pending"},
        description="Open WebUI role -> QuotaGate role of a user first seen through Open WebUI",
    )
    openwebui_default_role: str = Field(
        "user", min_length=1, description="QuotaGate role for an Open WebUI role not mapped"
    )
    openwebui_sync_roles: bool = Field(
        True,
        description="a known user's role follows their Open WebUI role (mapped), unless an "
        "admin set it with `users set-role`",
    )
    openwebui_groups: Literal["sync", "ignore"] = Field(
        "sync",
        description="sync: the Open WebUI groups a filter sends are a user's groups, besides "
        "those an admin gave with `users add-group`",
    )
    openwebui_cache_seconds: float = Field(
        60.0,
        ge=0,
        description="how long what Open WebUI said about a person (role, email, groups) is "
        "trusted before the catalog is compared with it again",
    )
    openwebui_tasks: Literal["user", "key"] = Field(
        "user",
        description="who pays for Open WebUI's background tasks (titles, tags, follow-ups): "
        "the person, or the connection key's own user (exempting the person)",
    )
    openwebui_task_header: str = Field(
        "x-openwebui-task",
        description="request header naming an Open WebUI task (a connection header "
        "set to {{TASK}} in Open WebUI)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get("QUOTAGATE_CONFIG", "quotagate.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
