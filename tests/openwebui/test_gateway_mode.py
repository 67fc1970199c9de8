"""Gateway mode without Open WebUI: the headers Open WebUI 0.12.4 forwards, sent by hand.

The requests carry exactly what a real Open WebUI sends upstream with
``ENABLE_FORWARD_USER_INFO_HEADERS=true`` and a connection header ``X-OpenWebUI-Task:
{{TASK}}`` (observed: see test_e2e_gateway.py, which proves the same against the real
thing). Fast, so every rule is pinned here; the e2e module shows it end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from quotagate.core.limits import Metric, Scope
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream, running_upstream

MODEL = "demo-model"


pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with running_upstream() as up:
        yield up


@pytest.fixture
def gw(upstream: RunningUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(
        tmp_path, [channel("main", upstream, [MODEL])], openwebui_roles={"pending": "blocked"}
    ) as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        yield gateway


def forwarded(user_id: str, name: str, role: str = "user", task: str = "") -> dict[str, str]:
    """The headers Open WebUI adds to every upstream call (names URL-quoted, as it does)."""
    return {
        "X-OpenWebUI-User-Name": quote(name, safe=" "),
        "X-OpenWebUI-User-Id": user_id,
        "X-OpenWebUI-User-Email": f"{name.split()[0].lower()}@example.com",
        "X-OpenWebUI-User-Role": role,
        "X-OpenWebUI-Auth-Type": "jwt",
        "X-OpenWebUI-Chat-Id": "c0ffee",
        "X-OpenWebUI-Task": task,
    }


def chat(
    gw: RunningGateway, key: str, headers: dict[str, str], max_tokens: int = 5, **extra: Any
) -> httpx.Response:
    return gw.http.post(
        f"{gw.base_url}/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens,
            **extra,
        },
        headers={"Authorization": f"Bearer {key}", **headers},
    )


async def test_each_person_is_charged_not_the_connection_key(gw: RunningGateway) -> None:
    key = gw.key("openwebui", trusted_openwebui=True)
    assert chat(gw, key, forwarded("u-1", "Alice Ä")).status_code == 200
    assert chat(gw, key, forwarded("u-2", "Bob"), max_tokens=3).status_code == 200
    events = await gw.settled(2)
    assert sorted((e.user_id, e.completion_tokens) for e in events) == [("u-1", 5), ("u-2", 3)]
    alice = gw.engine.catalog.user("u-1")
    assert alice is not None
    assert (alice.name, alice.email, alice.role) == ("Alice Ä", "alice@example.com", "user")
    assert await gw.events("openwebui") == []


async def test_limits_bind_per_person(gw: RunningGateway, upstream: RunningUpstream) -> None:
    key = gw.key("openwebui", trusted_openwebui=True)
    gw.limit(Scope.USER, "u-2", Metric.TOKENS, "day", 3)
    calls = len(upstream.log)
    refused = chat(gw, key, forwarded("u-2", "Bob"))
    assert refused.status_code == 429
    assert "your daily token allowance" in refused.json()["error"]["message"]
    assert len(upstream.log) == calls  # the model was never asked
    assert chat(gw, key, forwarded("u-1", "Alice")).status_code == 200


async def test_headers_from_an_untrusted_key_are_ignored(gw: RunningGateway) -> None:
    plain = gw.key("mallory")
    assert chat(gw, plain, forwarded("u-1", "Alice")).status_code == 200
    [event] = await gw.settled(1)
    assert event.user_id == "mallory"
    assert gw.engine.catalog.user("u-1") is None


async def test_roles_are_mapped_and_synced(gw: RunningGateway) -> None:
    key = gw.key("openwebui", trusted_openwebui=True)
    gw.limit(Scope.ROLE, "blocked", Metric.TOKENS, "day", 0)
    refused = chat(gw, key, forwarded("u-3", "Carol", role="pending"))
    assert refused.status_code == 429
    assert gw.engine.catalog.user("u-3").role == "blocked"  # type: ignore[union-attr]
    # approved in Open WebUI: her next request carries role "user"
    gw.gateway.openwebui._seen.clear()  # (the remembered identity would hold for a minute)
    assert chat(gw, key, forwarded("u-3", "Carol", role="user")).status_code == 200
    assert gw.engine.catalog.user("u-3").role == "user"  # type: ignore[union-attr]


async def test_background_tasks_are_charged_to_the_person_by_default(gw: RunningGateway) -> None:
    key = gw.key("openwebui", trusted_openwebui=True)
    title = forwarded("u-1", "Alice", task="title_generation")
    assert chat(gw, key, title, max_tokens=4).status_code == 200
    [event] = await gw.settled(1)
    assert (event.user_id, event.completion_tokens) == ("u-1", 4)


async def test_background_tasks_can_be_charged_to_the_connection(gw: RunningGateway) -> None:
    gw.gateway.settings.openwebui_tasks = "key"
    key = gw.key("openwebui", trusted_openwebui=True)
    gw.limit(Scope.USER, "u-1", Metric.TOKENS, "day", 3)  # Alice is out of quota...
    title = forwarded("u-1", "Alice", task="title_generation")
    assert chat(gw, key, title, max_tokens=4).status_code == 200  # ...but titles still work
    assert chat(gw, key, forwarded("u-1", "Alice")).status_code == 429  # chats do not
    [event] = await gw.settled(1)
    assert (event.user_id, event.completion_tokens) == ("openwebui", 4)


def test_an_invalid_forwarded_id_is_refused(gw: RunningGateway) -> None:
    key = gw.key("openwebui", trusted_openwebui=True)
    r = chat(gw, key, forwarded("a|b", "Eve"))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_user"


async def test_without_forwarded_headers_the_key_user_pays(gw: RunningGateway) -> None:
    key = gw.key("openwebui", trusted_openwebui=True)
    assert chat(gw, key, {}).status_code == 200
    [event] = await gw.settled(1)
    assert event.user_id == "openwebui"
