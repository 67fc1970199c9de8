"""Every table QuotaGate keeps in SQL, declared once for SQLite and PostgreSQL.

Instants are epoch seconds (floats): cheap to compare and free of timezone ambiguity.
Credit amounts are integers of micro-credits; prices are decimal strings so that a
price like 0.15 credits per 1M tokens round-trips exactly.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("role", String(64), nullable=False, server_default="user"),
    Column("email", String(255)),
    Column("name", String(255)),
    Column("created_at", Float, nullable=False),
    # set by `users set-role`: the role no longer follows what Open WebUI (or a library
    # caller) says; `users set-role ID --follow-openwebui` clears it
    Column("role_pinned", Boolean, nullable=False, server_default="0"),
)

groups = Table(
    "groups",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("multiplier", String(32), nullable=False, server_default="1"),
    Column("description", Text),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", String(255), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column(
        "group_name", String(255), ForeignKey("groups.name", ondelete="CASCADE"), primary_key=True
    ),
    # "admin" (users add-group) or "sync" (the groups Open WebUI's filter sends): a sync
    # adds and removes only its own memberships
    Column("source", String(16), nullable=False, server_default="admin"),
)

limits = Table(
    "limits",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("scope", String(16), nullable=False),
    Column("target", String(255), nullable=False),
    Column("metric", String(16), nullable=False),
    Column("window", String(32), nullable=False),
    Column("reset_hour", Integer, nullable=False, server_default="0"),
    Column("timezone", String(64)),
    Column("amount", BigInteger),
    Column("per_user", Boolean, nullable=False, server_default="1"),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("scope", "target", "metric", "window", "per_user", name="uq_limits_subject"),
)

prices = Table(
    "prices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(255), nullable=False),
    Column("provider", String(64), nullable=False, server_default=""),
    Column("name", String(255), nullable=False, server_default=""),
    Column("input_credits", String(32), nullable=False),
    Column("per_input_tokens", BigInteger, nullable=False),
    Column("output_credits", String(32), nullable=False),
    Column("per_output_tokens", BigInteger, nullable=False),
    Column("cached_credits", String(32)),
    Column("per_cached_tokens", BigInteger, nullable=False, server_default="1000000"),
    Column("effective_from", Float, nullable=False),
    Column("source", String(32), nullable=False, server_default="admin"),
    Index("ix_prices_model_effective", "model", "effective_from"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(255), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False, server_default=""),
    Column("secret_hash", String(128), nullable=False),
    Column("models", Text),  # JSON list, NULL: every model
    Column("trusted_openwebui", Boolean, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

channels = Table(
    "channels",
    metadata,
    # Upstreams added with `quotagate channels add` (those in quotagate.toml are not stored).
    # Only where the upstream key lives is kept, never the key; caps are channel limits.
    Column("name", String(255), primary_key=True),
    Column("base_url", Text, nullable=False),
    Column("api_key_env", String(255)),
    Column("api_key_file", Text),
    Column("models", Text, nullable=False),  # JSON list, or object public name -> upstream name
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("weight", Integer, nullable=False, server_default="1"),
    Column("created_at", Float, nullable=False),
)

pools = Table(
    "pools",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("models", Text, nullable=False, server_default="[]"),  # JSON list bound to the pool
    Column("groups", Text),  # JSON list of groups allowed, NULL: everyone
    Column("description", Text),
)

wallet_entries = Table(
    "wallet_entries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(255), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),  # micro-credits added (negative: taken back)
    Column("note", Text),
    Column("created_at", Float, nullable=False),
)

# -- hot tables: written on every request ------------------------------------------------

counters = Table(
    "counters",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("used", BigInteger, nullable=False, server_default="0"),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
    Column("expires_at", Float),
    Index("ix_counters_expires_at", "expires_at"),  # pruning finds ended windows by it
)

tickets = Table(
    "tickets",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
    Column("held", Text, nullable=False),  # JSON [[key, amount], ...]
    Column("max_output", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),  # JSON of the engine's ticket
)

usage_events = Table(
    "usage_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ticket_id", String(64), nullable=False, unique=True),
    Column("user_id", String(255), nullable=False),
    Column("key_id", String(32)),
    Column("model", String(255), nullable=False),
    Column("channel", String(255)),
    Column("pool", String(255)),
    Column("source", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("estimated", Boolean, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("settled_at", Float, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("excess", BigInteger, nullable=False, server_default="0"),
    Column("charges", Text, nullable=False),  # JSON [[counter key, amount], ...]
    Index("ix_usage_events_user_started", "user_id", "started_at"),
    Index("ix_usage_events_started", "started_at"),
)
