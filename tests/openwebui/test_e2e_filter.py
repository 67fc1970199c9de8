"""The Filter Function in a real Open WebUI 0.12.4, against a real QuotaGate.

One Open WebUI (installed from PyPI into the cached venv, started offline on loopback) for
the whole module, talking to the demo upstream; the QuotaGate filter is installed through
Open WebUI's functions API exactly as docs/openwebui.md tells an admin to, and calls a
QuotaGate gateway (quota API) on loopback. An admin and two users exist. Each test looks
only at what happened after it began: the upstream's records from an offset, the ledger's
events of one user from a count.

What is proven: a user over their daily limit gets Open WebUI's error carrying QuotaGate's
message (API path and UI path) and the upstream is never called; streamed and non-streamed
chats settle the upstream-reported usage exactly once; the UI's stop button and upstream
errors settle correctly (what was streamed, or nothing); the deprecated
``/api/chat/completed`` changes nothing; the status line reaches the chat; Open WebUI
groups become QuotaGate groups.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from quotagate.core.limits import Metric, Scope
from quotagate.gateway.demo import REPLY_WORDS, chat_prompt_tokens
from quotagate.openwebui import FUNCTION_ID, function_source
from quotagate.store.base import UsageEvent
from tests.gateway.harness import RunningGateway, drop_template, running_gateway
from tests.openwebui.harness import Account, OpenWebUIClient, OpenWebUIServer, run_openwebui
from tests.support.upstream import RunningUpstream, running_upstream

pytestmark = pytest.mark.openwebui

MODEL = "demo-model"


@dataclass
class World:
    server: OpenWebUIServer
    upstream: RunningUpstream
    quotagate: RunningGateway
    admin: Account
    alice: Account
    bob: Account
    admin_api: OpenWebUIClient
    alice_api: OpenWebUIClient
    bob_api: OpenWebUIClient

    def model_calls(self) -> list[Any]:
        """The chat completions the upstream received (model listings left out)."""
        return [c for c in self.upstream.log if c.path.endswith("/chat/completions")]

    async def events(self, who: Account) -> list[UsageEvent]:
        return await self.quotagate.events(who.id)

    async def wait_events(
        self, who: Account, count: int, timeout: float = 15.0
    ) -> list[UsageEvent]:
        """`who`'s ledger once it holds `count` events (the filter settles in Open WebUI's
        process, a moment after the client got its answer)."""
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(who)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.1)

    async def no_pending(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while await self.quotagate.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return await self.quotagate.pending()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("QUOTAGATE_"):
                env.delenv(name)
        qg_dir = tmp_path_factory.mktemp("quotagate")
        env.setenv("QUOTAGATE_CONFIG", str(qg_dir / "no-such-config.toml"))
        with (
            running_upstream() as up,
            running_gateway(qg_dir, timezone="Europe/Berlin") as qg,
            run_openwebui(up.base_url, tmp_path_factory.mktemp("openwebui")) as server,
        ):
            qg.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 100_000)
            anon = server.client()
            admin = anon.signup("Ada Admin", "admin@example.com", "admin-pass-1")
            admin_api = server.client(admin.token)
            alice = admin_api.add_user("Alice", "alice@example.com", "alice-pass-1")
            bob = admin_api.add_user("Bob", "bob@example.com", "bob-pass-1")
            admin_api.create_public_model(MODEL)
            # what docs/openwebui.md tells an admin to do
            admin_api.install_function(FUNCTION_ID, function_source(), "QuotaGate")
            admin_api.update_function_valves(
                FUNCTION_ID,
                {
                    "quotagate_url": qg.root_url,
                    "service_key": qg.key("openwebui", trusted_openwebui=True),
                    "settle_grace_seconds": 1.0,
                },
            )
            world = World(
                server,
                up,
                qg,
                admin,
                alice,
                bob,
                admin_api,
                server.client(alice.token),
                server.client(bob.token),
            )
            try:
                yield world
            finally:
                for client in (anon, admin_api, world.alice_api, world.bob_api):
                    client.close()
    drop_template()


def test_the_function_is_installed_global_and_active(world: World) -> None:
    f = world.admin_api.function(FUNCTION_ID)
    assert (f["type"], f["is_active"], f["is_global"]) == ("filter", True, True)


async def test_over_the_daily_limit_open_webui_shows_quotagates_message(world: World) -> None:
    world.quotagate.limit(Scope.USER, world.bob.id, Metric.TOKENS, "day", 10)
    calls = len(world.model_calls())
    r = world.bob_api.raw(
        "POST",
        "/api/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "stream": True},
    )
    assert r.status_code == 400, r.text  # F6: an inlet exception is Open WebUI's 400
    detail = r.json()["detail"]
    assert "your daily token allowance" in detail, detail
    assert "of 10 tokens used" in detail
    assert "It resets at 00:00 Europe/Berlin (in " in detail

    chat = world.bob_api.ui_chat_start(MODEL, "and in the web UI?")
    message = world.bob_api.ui_chat_wait(chat)
    shown = message["error"]["content"]
    assert "your daily token allowance" in shown
    # once: as the reply's error, not again in the reply's status history
    statuses = [s.get("description") for s in message.get("statusHistory") or []]
    assert not any("daily token allowance" in str(s) for s in statuses), statuses
    assert len(world.model_calls()) == calls  # the model was never asked
    assert await world.events(world.bob) == []
    assert await world.quotagate.pending() == 0


async def test_non_streamed_chat_settles_the_upstream_usage_once(world: World) -> None:
    before = len(await world.events(world.alice))
    calls = len(world.model_calls())
    reply = world.alice_api.chat(
        MODEL, [{"role": "user", "content": "count to five"}], max_tokens=5
    )
    events = await world.wait_events(world.alice, before + 1)
    new = events[before:]
    assert [(e.prompt_tokens, e.completion_tokens) for e in new] == [
        (reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"])
    ]
    assert new[0].estimated is False
    assert world.model_calls()[calls].body["max_tokens"] == 5
    await asyncio.sleep(1.5)  # past the filter's grace: still exactly one
    assert len(await world.events(world.alice)) == before + 1
    assert await world.no_pending() == 0


async def test_streamed_chat_settles_the_upstream_usage_once(world: World) -> None:
    before = len(await world.events(world.alice))
    calls = len(world.model_calls())
    events = world.alice_api.chat_stream(
        MODEL, [{"role": "user", "content": "stream four words"}], max_tokens=4
    )
    sent = world.model_calls()[calls].body
    assert sent["stream_options"] == {"include_usage": True}  # asked by the filter (F4)
    assert all(e.get("choices") for e in events)  # ...but not shown to this client
    ledger = await world.wait_events(world.alice, before + 1)
    [event] = ledger[before:]
    assert (event.prompt_tokens, event.completion_tokens) == (
        chat_prompt_tokens(sent["messages"]),
        4,
    )
    await asyncio.sleep(1.5)
    assert len(await world.events(world.alice)) == before + 1


async def test_ui_chat_settles_its_message_and_shows_the_status(world: World) -> None:
    before = len(await world.events(world.alice))
    calls = len(world.model_calls())
    chat = world.alice_api.ui_chat_start(
        MODEL, "hello from the web UI", background_tasks={"title_generation": True}
    )
    message = world.alice_api.ui_chat_wait(chat)
    [event] = (await world.wait_events(world.alice, before + 1))[before:]
    assert (event.prompt_tokens, event.completion_tokens) == (
        message["usage"]["prompt_tokens"],
        message["usage"]["completion_tokens"],
    )
    statuses = [s["description"] for s in message.get("statusHistory", [])]
    assert any(s.endswith("tokens left today, resets 00:00 Europe/Berlin") for s in statuses), (
        statuses
    )
    # the title was generated by a second model call, which no filter sees (F9): counted
    # only in gateway mode
    deadline = time.monotonic() + 10
    while len(world.model_calls()) - calls < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(world.model_calls()) - calls == 2
    await asyncio.sleep(1.5)
    assert len(await world.events(world.alice)) == before + 1


async def test_chat_completed_changes_nothing(world: World) -> None:
    before = await world.events(world.alice)
    counters = await world.quotagate.counters()
    resp = world.alice_api.chat_completed(
        MODEL,
        "msg-client-1",
        [
            {"role": "user", "content": "x"},
            {
                "id": "msg-client-1",
                "role": "assistant",
                "content": "w1 w2",
                "usage": {"prompt_tokens": 1, "completion_tokens": -500, "total_tokens": -499},
            },
        ],
    )
    assert resp.status_code == 200, resp.text
    await asyncio.sleep(2)
    assert await world.events(world.alice) == before
    assert await world.quotagate.counters() == counters


async def test_a_stopped_generation_is_charged_for_what_was_shown(world: World) -> None:
    """The stop button cancels the task mid-stream and no outlet runs (F9): the filter
    settles what its stream hook saw, once the task has ended."""
    before = len(await world.events(world.alice))
    knobs = world.upstream.knobs
    knobs.default_tokens, knobs.chunk_delay = 300, 0.05
    try:
        chat = world.alice_api.ui_chat_start(MODEL, "a long answer please")
        deadline = time.monotonic() + 30
        while True:
            saved = world.alice_api.get_chat(chat.chat_id)["chat"]["history"]["messages"]
            if len((saved.get(chat.assistant_id) or {}).get("content") or "") > 0:
                break
            assert time.monotonic() < deadline, "the answer never started"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        world.alice_api.ui_chat_stop(chat)
        message = world.alice_api.ui_chat_wait(chat)
    finally:
        knobs.default_tokens, knobs.chunk_delay = 20, 0.0
    shown = message["content"]
    assert 0 < len(shown.split()) < 300
    [event] = (await world.wait_events(world.alice, before + 1))[before:]
    assert event.estimated is True
    # the stream hook saw what the UI saved, or one word more (the chunk it had just passed
    # when the stop cancelled the task, before the UI appended it)
    count = world.quotagate.engine.counter.text
    following = REPLY_WORDS[len(shown.split()) % len(REPLY_WORDS)]
    assert event.completion_tokens in (
        count(shown, MODEL),
        count(f"{shown} {following}", MODEL),
    ), (event, shown)
    assert event.completion_tokens < 300
    assert await world.no_pending() == 0


async def test_an_upstream_error_charges_nothing(world: World) -> None:
    before = len(await world.events(world.alice))
    world.upstream.knobs.fail_status = 500
    try:
        for stream in (False, True):
            r = world.alice_api.raw(
                "POST",
                "/api/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": stream},
            )
            assert r.status_code == 500, r.text
        chat = world.alice_api.ui_chat_start(MODEL, "fail please")
        message = world.alice_api.ui_chat_wait(chat)
        assert message.get("error")
    finally:
        world.upstream.knobs.fail_status = None
    assert await world.no_pending() == 0  # the reservations were released
    await asyncio.sleep(1.5)
    assert len(await world.events(world.alice)) == before


async def test_open_webui_groups_become_quotagate_groups(world: World) -> None:
    """The filter sends the person's Open WebUI groups (read inside Open WebUI), and group
    grants set in QuotaGate follow Open WebUI's memberships."""
    api = world.admin_api
    created = api.raw("POST", "/api/v1/groups/create", {"name": "Research", "description": "x"})
    assert created.status_code == 200, created.text
    group_id = created.json()["id"]
    added = api.raw(
        "POST", f"/api/v1/groups/id/{group_id}/users/add", {"user_ids": [world.alice.id]}
    )
    assert added.status_code == 200, added.text
    world.quotagate.limit(Scope.GROUP, "Research", Metric.TOKENS, "day", 50_000)
    before = len(await world.events(world.alice))
    world.alice_api.chat(MODEL, [{"role": "user", "content": "as a researcher"}], max_tokens=2)
    await world.wait_events(world.alice, before + 1)
    person = world.quotagate.engine.catalog.user(world.alice.id)
    assert person is not None and person.groups == ("Research",)
    [limit] = await world.quotagate.engine.status(world.alice.id)
    assert (limit.label, limit.amount) == ("base + group Research allowance", 150_000)
