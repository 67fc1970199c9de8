"""The quota API the Open WebUI filters call (``/v1/quota/*``), over real HTTP.

The gateway runs in uvicorn on loopback over its own SQLite file (tests.gateway.harness);
the test reads the ledger through a second connection, as another process would. What a
filter relies on is asserted the way it would see it: status codes, JSON fields, the
ledger and the counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from quotagate.core.limits import Metric, Scope
from tests.gateway.harness import RunningGateway, running_gateway

MESSAGES = [{"role": "user", "content": "hello there, how are you"}]


pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path, timezone="Europe/Berlin") as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        yield gateway


class Api:
    """The calls a filter makes, with a trusted key."""

    def __init__(self, gw: RunningGateway, key: str | None = None) -> None:
        self.gw = gw
        self.key = key or gw.key("openwebui", trusted_openwebui=True)
        self.http = gw.http

    def post(self, name: str, body: Any, key: str | None = None) -> httpx.Response:
        return self.http.post(
            f"{self.gw.root_url}/v1/quota/{name}",
            json=body,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    def admit(self, user: str = "u-alice", **extra: Any) -> httpx.Response:
        body = {
            "user": {"id": user, "email": f"{user}@example.com", "name": user, "role": "user"},
            "model": "demo-model",
            "messages": MESSAGES,
            "max_tokens": 100,
            **extra,
        }
        return self.post("admit", body)

    def status(self, user: str) -> httpx.Response:
        return self.http.get(
            f"{self.gw.root_url}/v1/quota/status",
            params={"user": user},
            headers={"Authorization": f"Bearer {self.key}"},
        )


@pytest.fixture
def api(gw: RunningGateway) -> Api:
    return Api(gw)


async def test_admit_answers_a_ticket_and_creates_the_user(api: Api, gw: RunningGateway) -> None:
    r = api.admit(status=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["max_tokens"] == 100 and not body["clamped"]
    assert body["prompt_tokens"] > 0
    assert body["user"] == "u-alice" and body["role"] == "user"
    # the limits before this request: nothing used yet
    [limit] = body["limits"]
    assert (limit["amount"], limit["used"], limit["reserved"]) == (10_000, 0, 0)
    assert limit["timezone"] == "Europe/Berlin"
    assert limit["resets_at"].endswith(("+01:00", "+02:00"))
    user = gw.engine.catalog.user("u-alice")
    assert user is not None
    assert (user.role, user.email, user.name) == ("user", "u-alice@example.com", "u-alice")
    assert await gw.pending() == 1


async def test_admit_clamps_to_what_is_left(api: Api, gw: RunningGateway) -> None:
    gw.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 60)
    r = api.admit("u-bob", max_tokens=500)
    body = r.json()
    assert r.status_code == 200, r.text
    assert body["clamped"] is True
    assert body["max_tokens"] == 60 - body["prompt_tokens"]
    assert body["requested_max_tokens"] == 500


async def test_refusal_is_429_with_the_limit_the_numbers_and_the_reset(
    api: Api, gw: RunningGateway
) -> None:
    gw.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 5)
    r = api.admit("u-bob")
    assert r.status_code == 429, r.text
    refusal = r.json()["refusal"]
    assert refusal["limit"] == "user u-bob override allowance"
    assert (refusal["metric"], refusal["window"], refusal["amount"]) == ("tokens", "day", 5)
    assert refusal["used"] == 0 and refusal["remaining"] == 5
    assert refusal["requested"] > 5
    assert refusal["timezone"] == "Europe/Berlin"
    resets = datetime.fromisoformat(refusal["resets_at"])
    assert (resets.hour, resets.minute) == (0, 0)  # midnight in Berlin
    assert refusal["message"].startswith("This request does not fit in your daily token allowance")
    assert "It resets at 00:00 Europe/Berlin (in " in refusal["message"]
    assert int(r.headers["retry-after"]) > 0
    assert await gw.pending() == 0


async def test_settle_is_exactly_once(api: Api, gw: RunningGateway) -> None:
    ticket = api.admit().json()["ticket"]
    usage = {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}
    first = api.post("settle", {"ticket": ticket, "usage": usage, "status": True})
    assert first.status_code == 200, first.text
    assert (first.json()["prompt_tokens"], first.json()["completion_tokens"]) == (7, 11)
    assert first.json()["estimated"] is False
    [limit] = first.json()["limits"]
    assert (limit["used"], limit["reserved"], limit["remaining"]) == (18, 0, 10_000 - 18)
    # again, with other numbers: the first settlement stands, nothing more is charged
    again = api.post("settle", {"ticket": ticket, "usage": {"prompt_tokens": 1000}})
    assert again.status_code == 200
    assert again.json()["total_tokens"] == 18
    again_text = api.post("settle", {"ticket": ticket, "completion_text": "x " * 500})
    assert again_text.json()["total_tokens"] == 18
    events = await gw.events("u-alice")
    assert [(e.prompt_tokens, e.completion_tokens) for e in events] == [(7, 11)]
    assert sum(used for used, _ in (await gw.counters()).values()) == 18


async def test_settle_counts_the_text_when_no_usage_came(api: Api, gw: RunningGateway) -> None:
    admitted = api.admit().json()
    text = "The quick brown fox jumps over the lazy dog. " * 3
    r = api.post("settle", {"ticket": admitted["ticket"], "completion_text": text})
    assert r.status_code == 200, r.text
    settled = r.json()
    assert settled["estimated"] is True
    assert settled["prompt_tokens"] == admitted["prompt_tokens"]
    assert settled["completion_tokens"] == gw.engine.counter.text(text, "demo-model")
    [event] = await gw.events("u-alice")
    assert event.estimated


async def test_usage_without_prompt_tokens_keeps_the_estimate(api: Api, gw: RunningGateway) -> None:
    admitted = api.admit().json()
    r = api.post("settle", {"ticket": admitted["ticket"], "usage": {"completion_tokens": 3}})
    assert r.json()["prompt_tokens"] == admitted["prompt_tokens"]
    assert r.json()["completion_tokens"] == 3


async def test_cancel_releases_and_a_cancelled_ticket_cannot_be_settled(
    api: Api, gw: RunningGateway
) -> None:
    ticket = api.admit().json()["ticket"]
    assert api.post("cancel", {"ticket": ticket}).json() == {"ticket": ticket, "cancelled": True}
    assert api.post("cancel", {"ticket": ticket}).json()["cancelled"] is False
    settle = api.post("settle", {"ticket": ticket, "usage": {"completion_tokens": 3}})
    assert settle.status_code == 404
    assert settle.json()["error"]["code"] == "unknown_ticket"
    assert await gw.events() == []
    assert all(reserved == 0 for _, reserved in (await gw.counters()).values())


async def test_renew_extends_a_pending_tickets_lease(api: Api, gw: RunningGateway) -> None:
    """A filter renews the ticket while its chat streams (its holder is another process)."""
    admitted = api.admit().json()
    [before] = await gw.reader.expired(float("inf"))
    gw.clock.advance(seconds=100)  # as if the chat had been streaming for 100 s
    r = api.post("renew", {"ticket": admitted["ticket"]})
    assert r.status_code == 200, r.text
    assert r.json()["renewed"] is True
    [after] = await gw.reader.expired(float("inf"))
    assert after.expires_at == pytest.approx(before.expires_at + 100, abs=1)
    renewed = datetime.fromisoformat(r.json()["expires_at"]).timestamp()
    assert renewed == pytest.approx(after.expires_at, abs=1)
    # not pending any more (settled, cancelled, swept, never issued): not renewed
    api.post("settle", {"ticket": admitted["ticket"], "usage": {"completion_tokens": 3}})
    again = api.post("renew", {"ticket": admitted["ticket"]}).json()
    assert again == {"ticket": admitted["ticket"], "renewed": False, "expires_at": None}
    assert api.post("renew", {"ticket": "nope"}).json()["renewed"] is False
    assert api.post("renew", {}).status_code == 400
    # a ticket belongs to the key that admitted it
    other = Api(gw, gw.key("other-openwebui", trusted_openwebui=True))
    ticket = api.admit().json()["ticket"]
    assert other.post("renew", {"ticket": ticket}).status_code == 403


def test_only_trusted_keys_may_use_the_api(api: Api, gw: RunningGateway) -> None:
    plain = gw.key("alice")
    r = api.post("admit", {"user": {"id": "x"}, "model": "demo-model"}, key=plain)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "key_not_trusted"
    r = gw.http.post(f"{gw.root_url}/v1/quota/admit", json={})
    assert r.status_code == 401
    r = api.post("admit", {"user": {"id": "x"}, "model": "demo-model"}, key="qg-nope-nope")
    assert r.status_code == 401


def test_a_ticket_belongs_to_the_key_that_admitted_it(api: Api, gw: RunningGateway) -> None:
    ticket = api.admit().json()["ticket"]
    other = Api(gw, gw.key("openwebui-2", trusted_openwebui=True))
    r = other.post("settle", {"ticket": ticket, "usage": {"completion_tokens": 1}})
    assert r.status_code == 403
    assert other.post("cancel", {"ticket": ticket}).status_code == 403


def test_a_key_limited_to_models_is_held_to_them(gw: RunningGateway) -> None:
    api = Api(gw, gw.key("openwebui", models=["other-model"], trusted_openwebui=True))
    r = api.admit()
    assert r.status_code == 403
    assert r.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "demo-model"}, "user"),
        ({"user": {"id": ""}, "model": "demo-model"}, "user.id"),
        ({"user": {"id": "a|b"}, "model": "demo-model"}, None),
        ({"user": {"id": "a"}, "model": "demo-model", "max_tokens": 0}, "max_tokens"),
        ({"user": {"id": "a"}, "model": "demo-model", "messages": [{"content": "x"}]}, None),
    ],
)
def test_bad_admit_requests_are_400(api: Api, body: dict[str, Any], param: str | None) -> None:
    r = api.post("admit", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    if param:
        assert r.json()["error"]["param"] == param


def test_bad_settle_requests(api: Api) -> None:
    assert api.post("settle", {"ticket": "abc"}).status_code == 400
    r = api.post("settle", {"ticket": "0" * 32, "usage": {"completion_tokens": 1}})
    assert r.status_code == 404
    ticket = api.admit().json()["ticket"]
    r = api.post("settle", {"ticket": ticket, "usage": {"completion_tokens": -4}})
    assert r.status_code == 400
    assert api.http.get(f"{api.gw.root_url}/v1/quota/admit").status_code == 405
    assert api.http.post(f"{api.gw.root_url}/v1/quota/nothing").status_code == 404


async def test_status_lists_the_users_limits(api: Api, gw: RunningGateway) -> None:
    unknown = api.status("u-nobody").json()
    assert unknown["known"] is False
    assert [lim["remaining"] for lim in unknown["limits"]] == [10_000]
    ticket = api.admit().json()["ticket"]
    api.post("settle", {"ticket": ticket, "usage": {"prompt_tokens": 5, "completion_tokens": 5}})
    status = api.status("u-alice").json()
    assert status["known"] is True
    [limit] = status["limits"]
    assert (limit["used"], limit["remaining"], limit["window_kind"]) == (10, 9_990, "day")
    assert (
        api.http.get(
            f"{gw.root_url}/v1/quota/status", headers={"Authorization": f"Bearer {api.key}"}
        ).status_code
        == 400
    )


async def test_roles_are_mapped_and_follow_open_webui(tmp_path: Path) -> None:
    roles = {"admin": "staff", "user": "user", "pending": "blocked"}
    with running_gateway(tmp_path, openwebui_roles=roles) as gw:
        gw.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        gw.limit(Scope.ROLE, "blocked", Metric.TOKENS, "day", 0)
        api = Api(gw)
        pending = {"id": "u-new", "role": "pending"}
        r = api.post("admit", {"user": pending, "model": "demo-model", "messages": MESSAGES})
        assert r.status_code == 429, r.text
        assert r.json()["refusal"]["limit"] == "role blocked allowance"
        assert gw.engine.catalog.user("u-new").role == "blocked"  # type: ignore[union-attr]
        # the admin approves them in Open WebUI: the next request carries role "user"
        approved = {"id": "u-new", "role": "user"}
        r = api.post("admit", {"user": approved, "model": "demo-model", "messages": MESSAGES})
        assert r.status_code == 200, r.text
        assert r.json()["role"] == "user"
        r = api.post("admit", {"user": {"id": "u-boss", "role": "admin"}, "model": "demo-model"})
        assert r.json()["role"] == "staff"


async def test_roles_stay_as_set_in_quotagate_when_not_synced(tmp_path: Path) -> None:
    with running_gateway(tmp_path, openwebui_sync_roles=False) as gw:
        gw.engine.catalog.ensure_user("u-carol", "vip")
        api = Api(gw)
        r = api.post("admit", {"user": {"id": "u-carol", "role": "user"}, "model": "demo-model"})
        assert r.json()["role"] == "vip"
        assert gw.engine.catalog.user("u-carol").role == "vip"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["sync", "ignore"])
async def test_groups_sync_by_configuration(tmp_path: Path, mode: str) -> None:
    with running_gateway(tmp_path, openwebui_groups=mode) as gw:
        gw.engine.catalog.ensure_user("u-dan", groups=["from-cli"])
        api = Api(gw)
        person = {"id": "u-dan", "role": "user", "groups": ["Staff", "R|D"]}
        assert api.post("admit", {"user": person, "model": "demo-model"}).status_code == 200
        groups = gw.engine.catalog.user("u-dan").groups  # type: ignore[union-attr]
        # Open WebUI's groups join the one an admin gave; they never replace it
        assert groups == (("R/D", "Staff", "from-cli") if mode == "sync" else ("from-cli",))


async def test_group_grants_apply_to_synced_groups(api: Api, gw: RunningGateway) -> None:
    gw.limit(Scope.GROUP, "Staff", Metric.TOKENS, "day", 5_000)
    person = {"id": "u-erin", "role": "user", "groups": ["Staff"]}
    r = api.post("admit", {"user": person, "model": "demo-model", "status": True})
    [limit] = r.json()["limits"]
    assert limit["amount"] == 15_000
    assert limit["label"] == "base + group Staff allowance"


async def test_concurrent_admits_through_the_api_never_overspend(
    api: Api, gw: RunningGateway
) -> None:
    """Twenty filters asking at once for one person: the reservations fit the limit."""
    gw.limit(Scope.USER, "u-fay", Metric.TOKENS, "day", 1_000)
    async with httpx.AsyncClient(timeout=20) as client:

        async def one() -> httpx.Response:
            return await client.post(
                f"{gw.root_url}/v1/quota/admit",
                json={
                    "user": {"id": "u-fay"},
                    "model": "demo-model",
                    "max_tokens": 200,
                    "messages": MESSAGES,
                },
                headers={"Authorization": f"Bearer {api.key}"},
            )

        answers = await asyncio.gather(*(one() for _ in range(20)))
    admitted = [a.json() for a in answers if a.status_code == 200]
    assert {a.status_code for a in answers} <= {200, 429}
    assert admitted
    reserved = sum(a["prompt_tokens"] + a["max_tokens"] for a in admitted)
    assert reserved <= 1_000
    counters = await gw.counters()
    assert max(used + held for used, held in counters.values()) <= 1_000


def test_openapi_document_describes_every_route(api: Api, gw: RunningGateway) -> None:
    doc = gw.http.get(f"{gw.root_url}/v1/quota/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/v1/quota/admit",
        "/v1/quota/settle",
        "/v1/quota/cancel",
        "/v1/quota/renew",
        "/v1/quota/status",
    }
    schemas = doc["components"]["schemas"]
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs and all(ref in schemas for ref in refs)
    assert "ticket" in schemas["AdmitOut"]["properties"]
    assert "refusal" in schemas["ErrorOut"]["properties"]
