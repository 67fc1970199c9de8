"""Gateway mode with a real Open WebUI 0.12.4: QuotaGate as Open WebUI's OpenAI connection.

One Open WebUI for the module, whose only OpenAI connection is a QuotaGate gateway on
loopback (in front of the demo upstream), with the key marked ``--trusted-openwebui``,
``ENABLE_FORWARD_USER_INFO_HEADERS=true`` and the connection header ``X-OpenWebUI-Task:
{{TASK}}`` — the set-up docs/openwebui.md describes. No filter is installed: the gateway
sees every model call Open WebUI makes, background tasks and the raw ``/openai/*`` proxy
routes included.

What is proven: every person is charged separately (not the connection key), each chat
settles the upstream's usage exactly once, a person over their limit gets QuotaGate's
message and the upstream is never called, a title-generation call is charged to the
person whose chat it titles (or, by configuration, to the connection), the filter-bypassing
``/openai/chat/completions`` route is charged too, a stopped generation is charged for
what was delivered, an upstream error charges nothing, and ``/api/chat/completed`` changes
nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from quotagate.core.limits import Metric, Scope
from quotagate.gateway.demo import chat_prompt_tokens
from quotagate.store.base import UsageEvent
from tests.gateway.harness import RunningGateway, channel, drop_template, running_gateway
from tests.openwebui.harness import Account, OpenWebUIClient, OpenWebUIServer, run_openwebui
from tests.support.upstream import RunningUpstream, running_upstream

pytestmark = pytest.mark.openwebui

MODEL = "demo-model"
KEY_USER = "openwebui"


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
        return [c for c in self.upstream.log if c.path.endswith("/chat/completions")]

    async def events(self, user: str) -> list[UsageEvent]:
        return await self.quotagate.events(user)

    async def wait_events(self, user: str, count: int, timeout: float = 15.0) -> list[UsageEvent]:
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(user)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.1)

    async def wait_calls(self, count: int, timeout: float = 15.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.model_calls()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.model_calls()


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
            running_gateway(qg_dir, [channel("main", up, [MODEL])], timezone="Europe/Berlin") as qg,
        ):
            qg.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 100_000)
            key = qg.key(KEY_USER, trusted_openwebui=True)
            task_header = {"0": {"headers": {"X-OpenWebUI-Task": "{{TASK}}"}}}
            with run_openwebui(
                qg.base_url,
                tmp_path_factory.mktemp("openwebui"),
                api_key=key,
                extra_env={"OPENAI_API_CONFIGS": json.dumps(task_header)},
            ) as server:
                anon = server.client()
                admin = anon.signup("Ada Admin", "admin@example.com", "admin-pass-1")
                admin_api = server.client(admin.token)
                alice = admin_api.add_user("Alice", "alice@example.com", "alice-pass-1")
                bob = admin_api.add_user("Bob", "bob@example.com", "bob-pass-1")
                admin_api.create_public_model(MODEL)
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


async def test_each_person_is_charged_once_with_the_upstream_usage(world: World) -> None:
    calls = len(world.model_calls())
    reply = world.alice_api.chat(MODEL, [{"role": "user", "content": "hello"}], max_tokens=5)
    events = world.bob_api.chat_stream(MODEL, [{"role": "user", "content": "hi"}], max_tokens=3)
    assert events
    [alice] = await world.wait_events(world.alice.id, 1)
    [bob] = await world.wait_events(world.bob.id, 1)
    assert (alice.prompt_tokens, alice.completion_tokens) == (
        reply["usage"]["prompt_tokens"],
        reply["usage"]["completion_tokens"],
    )
    streamed = world.model_calls()[calls + 1].body
    assert (bob.prompt_tokens, bob.completion_tokens) == (
        chat_prompt_tokens(streamed["messages"]),
        3,
    )
    assert await world.events(KEY_USER) == []
    person = world.quotagate.engine.catalog.user(world.alice.id)
    assert person is not None
    assert (person.email, person.name, person.role) == ("alice@example.com", "Alice", "user")
    await asyncio.sleep(1)
    assert len(await world.events(world.alice.id)) == 1
    assert len(await world.events(world.bob.id)) == 1


async def test_over_the_limit_open_webui_shows_quotagates_message(world: World) -> None:
    world.quotagate.limit(Scope.USER, world.bob.id, Metric.TOKENS, "day", 10)
    try:
        calls = len(world.upstream.requests)
        r = world.bob_api.raw(
            "POST",
            "/api/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi again"}]},
        )
        assert r.status_code == 429, r.text  # Open WebUI passes the upstream's status on
        assert "your daily token allowance" in r.text and "override" not in r.text
        assert "It resets at 00:00 Europe/Berlin" in r.text  # the configured timezone
        chat = world.bob_api.ui_chat_start(MODEL, "and in the web UI?")
        message = world.bob_api.ui_chat_wait(chat)
        assert "your daily token allowance" in json.dumps(message.get("error")), message
        assert len(world.upstream.requests) == calls  # the model was never asked
    finally:
        world.quotagate.limit(Scope.USER, world.bob.id, Metric.TOKENS, "day", 100_000)


async def test_title_generation_is_charged_to_the_person(world: World) -> None:
    before = len(await world.events(world.alice.id))
    calls = len(world.model_calls())
    chat = world.alice_api.ui_chat_start(
        MODEL, "a chat that gets a title", background_tasks={"title_generation": True}
    )
    world.alice_api.ui_chat_wait(chat)
    made = (await world.wait_calls(calls + 2))[calls:]
    prompts = [c.body["messages"][-1]["content"] for c in made]
    assert sum("Generate a concise title" in p for p in prompts) == 1, prompts
    events = (await world.wait_events(world.alice.id, before + 2))[before:]
    assert sorted(e.prompt_tokens for e in events) == sorted(
        chat_prompt_tokens(c.body["messages"]) for c in made
    )
    assert await world.events(KEY_USER) == []


async def test_title_generation_can_be_charged_to_the_connection(world: World) -> None:
    settings = world.quotagate.gateway.settings
    settings.openwebui_tasks = "key"
    try:
        before = len(await world.events(world.alice.id))
        calls = len(world.model_calls())
        chat = world.alice_api.ui_chat_start(
            MODEL, "another chat to title", background_tasks={"title_generation": True}
        )
        world.alice_api.ui_chat_wait(chat)
        made = (await world.wait_calls(calls + 2))[calls:]
        title = next(c for c in made if "concise title" in c.body["messages"][-1]["content"])
        [charged] = await world.wait_events(KEY_USER, 1)
        assert charged.prompt_tokens == chat_prompt_tokens(title.body["messages"])
        assert len((await world.wait_events(world.alice.id, before + 1))[before:]) == 1
    finally:
        settings.openwebui_tasks = "user"


async def test_the_raw_proxy_route_that_bypasses_filters_is_charged(world: World) -> None:
    """F9: /openai/chat/completions runs no filter at all; the gateway still sees it."""
    before = len(await world.events(world.alice.id))
    r = world.alice_api.raw(
        "POST",
        "/openai/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "bypass?"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    [event] = (await world.wait_events(world.alice.id, before + 1))[before:]
    assert event.completion_tokens == 2


async def test_a_stopped_generation_is_charged_for_what_was_delivered(world: World) -> None:
    before = len(await world.events(world.alice.id))
    knobs = world.upstream.knobs
    knobs.default_tokens, knobs.chunk_delay = 300, 0.05
    try:
        chat = world.alice_api.ui_chat_start(MODEL, "a long answer please")
        deadline = time.monotonic() + 30
        while True:
            saved = world.alice_api.get_chat(chat.chat_id)["chat"]["history"]["messages"]
            if (saved.get(chat.assistant_id) or {}).get("content"):
                break
            assert time.monotonic() < deadline, "the answer never started"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        world.alice_api.ui_chat_stop(chat)
        message = world.alice_api.ui_chat_wait(chat)
    finally:
        knobs.default_tokens, knobs.chunk_delay = 20, 0.0
    shown = len(message["content"].split())
    assert 0 < shown < 300
    [event] = (await world.wait_events(world.alice.id, before + 1))[before:]
    # the gateway counts what it delivered before Open WebUI hung up (a chunk or two more
    # than Open WebUI saved may have been in flight)
    counter = world.quotagate.engine.counter
    assert event.completion_tokens >= counter.text(message["content"], MODEL) - 4
    assert event.completion_tokens < counter.text(" word" * 300, MODEL)
    assert await world.quotagate.pending() == 0


async def test_an_upstream_error_charges_nothing(world: World) -> None:
    before = len(await world.events(world.alice.id))
    world.upstream.knobs.fail_status = 500
    try:
        r = world.alice_api.raw(
            "POST",
            "/api/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        assert r.status_code >= 500, r.text
    finally:
        world.upstream.knobs.fail_status = None
    await asyncio.sleep(1)
    assert len(await world.events(world.alice.id)) == before
    assert await world.quotagate.pending() == 0


async def test_chat_completed_changes_nothing(world: World) -> None:
    calls = len(world.model_calls())
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
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            },
        ],
    )
    assert resp.status_code == 200, resp.text
    await asyncio.sleep(1)
    assert len(world.model_calls()) == calls
    assert await world.quotagate.counters() == counters
