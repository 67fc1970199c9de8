"""What an admin sets in QuotaGate outlives what Open WebUI forwards.

The README's recipe — `quotagate users set-role ID premium`, `users add-group ID research` —
used to hold for about a minute: once the gateway's memory of the person expired
(`openwebui_cache_seconds`), their next chat synced Open WebUI's role (`user`) and groups
(`[]`) over it. Here the real gateway runs on loopback, the CLI changes the same SQLite
file as an admin's shell would, and chats come in through the quota API (the Filter
Function's and the Pipelines filter's path) and as gateway-mode calls with Open WebUI's
forwarded headers, on both sides of the cache's expiry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from quotagate.admin.cli import app
from quotagate.core.limits import Metric, Scope
from quotagate.engine import AdmitContext
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import running_upstream

#: the gateway's memory of a person: short, so that the tests can outlive it
CACHE = 0.3
PERSON = "7d4c8e2a-0000-4000-8000-000000000001"

pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with (
        running_upstream() as upstream,
        running_gateway(
            tmp_path,
            [channel("main", upstream, ["demo-model"])],
            auth_cache_seconds=CACHE,
            openwebui_cache_seconds=CACHE,
        ) as gateway,
    ):
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        gateway.limit(Scope.ROLE, "premium", Metric.TOKENS, "day", 50_000)
        gateway.limit(Scope.GROUP, "research", Metric.TOKENS, "day", 5_000)
        yield gateway


def admin(gw: RunningGateway, *args: str) -> str:
    """A `quotagate` command on the gateway's database, as an admin runs it."""
    database = gw.engine.catalog.db.url.database
    assert database is not None
    result = CliRunner().invoke(app, ["--database", database, *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout + result.stderr


class QuotaApi:
    """The calls the Filter Function makes (POST /v1/quota/admit, settle)."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.key = gw.key("openwebui", trusted_openwebui=True)

    def chat(self, groups: list[str] | None = None, role: str = "user") -> dict[str, Any]:
        """One chat: admit (with the person as Open WebUI describes them), then settle."""
        person: dict[str, Any] = {"id": PERSON, "email": "alice@example.org", "role": role}
        if groups is not None:
            person["groups"] = groups
        body = {"user": person, "model": "demo-model", "prompt_tokens": 5, "max_tokens": 5}
        headers = {"Authorization": f"Bearer {self.key}"}
        r = self.gw.http.post(f"{self.gw.root_url}/v1/quota/admit", json=body, headers=headers)
        assert r.status_code == 200, r.text
        admitted = r.json()
        usage = {"prompt_tokens": 5, "completion_tokens": 5}
        settle = {"ticket": admitted["ticket"], "usage": usage, "status": True}
        r = self.gw.http.post(f"{self.gw.root_url}/v1/quota/settle", json=settle, headers=headers)
        assert r.status_code == 200, r.text
        return {**admitted, "limits": r.json()["limits"]}


def allowance(answer: dict[str, Any]) -> tuple[str, int]:
    [limit] = answer["limits"]
    return limit["label"], limit["amount"]


def outlive_the_cache() -> None:
    time.sleep(CACHE * 2)


def test_an_admins_role_and_group_survive_the_next_chats(gw: RunningGateway) -> None:
    api = QuotaApi(gw)
    assert allowance(api.chat(groups=[])) == ("base allowance", 10_000)

    admin(gw, "users", "set-role", PERSON, "premium")
    admin(gw, "users", "add-group", PERSON, "research")
    outlive_the_cache()
    for _ in range(2):  # the first chat after the expiry synced over them before the fix
        answer = api.chat(groups=[])
        assert answer["role"] == "premium"
        assert allowance(answer) == ("role premium + group research allowance", 55_000)
        outlive_the_cache()
    user = gw.engine.catalog.user(PERSON)
    assert user is not None
    assert (user.role, user.groups, user.role_pinned) == ("premium", ("research",), True)


def test_open_webui_groups_join_the_admins_and_follow_open_webui(gw: RunningGateway) -> None:
    api = QuotaApi(gw)
    api.chat(groups=["Staff"])
    admin(gw, "users", "add-group", PERSON, "research")
    outlive_the_cache()
    api.chat(groups=["Staff", "Lab"])
    assert gw.engine.catalog.user(PERSON).groups == ("Lab", "Staff", "research")  # type: ignore[union-attr]
    outlive_the_cache()
    api.chat(groups=[])  # removed from both groups in Open WebUI
    assert gw.engine.catalog.user(PERSON).groups == ("research",)  # type: ignore[union-attr]
    listed = admin(gw, "users", "list", "--format", "json")
    assert '"groups_from_openwebui": []' in listed


def test_an_admin_can_hand_the_role_back_to_open_webui(gw: RunningGateway) -> None:
    api = QuotaApi(gw)
    admin(gw, "users", "set-role", PERSON, "premium")
    outlive_the_cache()
    assert api.chat(role="admin")["role"] == "premium"  # not the mapped "admin"
    said = admin(gw, "users", "set-role", PERSON, "--follow-openwebui")
    assert "follows Open WebUI" in said
    outlive_the_cache()
    assert api.chat(role="admin")["role"] == "admin"
    assert not gw.engine.catalog.user(PERSON).role_pinned  # type: ignore[union-attr]


def test_gateway_mode_keeps_the_admins_role(gw: RunningGateway) -> None:
    """Open WebUI's connection with forwarded X-OpenWebUI-User-* headers: the same sync."""
    key = gw.key("openwebui", trusted_openwebui=True)
    headers = {
        "x-openwebui-user-id": PERSON,
        "x-openwebui-user-email": "alice@example.org",
        "x-openwebui-user-role": "user",
    }
    client = gw.client(key, default_headers=headers)

    def chat() -> httpx.Headers:
        raw = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        return raw.headers

    assert chat()["x-ratelimit-limit-tokens"] == "10000"
    admin(gw, "users", "set-role", PERSON, "premium")
    admin(gw, "users", "add-group", PERSON, "research")
    outlive_the_cache()
    for _ in range(2):
        assert chat()["x-ratelimit-limit-tokens"] == "55000"
        outlive_the_cache()
    assert gw.engine.catalog.user(PERSON).role == "premium"  # type: ignore[union-attr]


async def test_library_callers_groups_join_the_admins(gw: RunningGateway) -> None:
    """`AdmitContext(groups=...)`: the caller's groups are synced like Open WebUI's."""
    gw.engine.catalog.add_member("lib-user", "research")  # what the CLI commands call
    gw.engine.catalog.set_role("lib-user", "premium")
    ticket = await gw.engine.admit(
        AdmitContext(user="lib-user", model="demo-model", prompt_tokens=1, groups=["Staff"])
    )
    await gw.engine.cancel(ticket)
    user = gw.engine.catalog.user("lib-user")
    assert user is not None
    assert (user.role, user.groups, user.synced_groups) == (
        "premium",
        ("Staff", "research"),
        ("Staff",),
    )
