"""Settings, from environment variables (``QUOTAGATE_*``) and an optional TOML file.

The file is ``quotagate.toml`` in the working directory, or the path in
``QUOTAGATE_CONFIG``; environment variables win over it.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


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
    default_input_credits: Decimal = Field(Decimal(10_000), description="per 1M input tokens")
    default_output_credits: Decimal = Field(Decimal(30_000), description="per 1M output tokens")
    credits_per_usd: Decimal = Field(Decimal(1000), gt=0)
    default_daily_tokens: int = Field(100_000, ge=0, description="set by `quotagate init`")
    bytes_per_token: float = Field(3.0, gt=0, description="offline token estimate")
    catalog_refresh_seconds: float = Field(1.0, ge=0)

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
