"""Fixtures of the gateway tests: a demo upstream and the gateway, both real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream, running_upstream


@pytest.fixture(autouse=True)
def _isolated(isolated_environment: None) -> None:
    """Every gateway test is immune to the caller's QUOTAGATE_* settings."""


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
