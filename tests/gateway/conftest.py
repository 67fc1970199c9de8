"""Fixtures of the gateway tests: a demo upstream and the gateway, both real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.harness import RunningGateway, channel, drop_template, running_gateway
from tests.support.upstream import RunningUpstream, running_upstream


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Immune to the caller's QUOTAGATE_* variables and quotagate.toml."""
    for name in list(os.environ):
        if name.startswith("QUOTAGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QUOTAGATE_CONFIG", str(tmp_path / "no-such-config.toml"))


@pytest.fixture(scope="session", autouse=True)
def _drop_template() -> Iterator[None]:
    yield
    drop_template()


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with running_upstream() as up:
        yield up


@pytest.fixture
def gw(upstream: RunningUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    """The gateway with one channel, "main", serving the demo models."""
    models = ["demo-model", "demo-model-large", "demo-embedding"]
    with running_gateway(tmp_path, [channel("main", upstream, models)]) as gateway:
        yield gateway
