"""The Filter Function's logic without Open WebUI: its hooks called the way Open WebUI 0.12.4
calls them, against a real QuotaGate (gateway + quota API) on loopback.

The file is loaded the way Open WebUI loads it (its source executed as a fresh module), and
the bodies are those docs/../openwebui-facts.md recorded: the API path (`chat_id == ""`,
no message id, outlet body `id` a fresh `msg_...`), the UI path (chat, message and session
ids; outlet body = the whole chat branch from the database), stream chunks as OpenAI sends
them, and the deprecated ``/api/chat/completed`` outlet. Each request runs in its own
asyncio task, as in Open WebUI, because the filter watches that task to settle requests
that end without an outlet (the stop button, upstream errors).
"""

from __future__ import annotations

import ast
import asyncio
import re
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quotagate.core.limits import Metric, Scope
from quotagate.gateway.demo import REPLY_WORDS as WORDS
from quotagate.openwebui import FUNCTION_FILE, PIPELINE_FILE, function_source, pipeline_source
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import running_upstream

MODEL = "demo-model"


def load_function(source: str | None = None) -> types.ModuleType:
    """Execute the Function's source as Open WebUI does (utils/plugin.py)."""
    name = f"function_quotagate_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source or function_source(), name, "exec"), module.__dict__)
    return module


pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path, timezone="Europe/Berlin") as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        yield gateway


@pytest.fixture
def filt(gw: RunningGateway) -> Any:
    module = load_function()
    instance = module.Filter()
    instance.valves = module.Filter.Valves(
        quotagate_url=gw.root_url,
        service_key=gw.key("openwebui", trusted_openwebui=True),
        settle_grace_seconds=0.2,
        send_groups=False,
    )
    return instance


# -- Open WebUI, as the filter sees it ----------------------------------------------------------


@dataclass
class Url:
    path: str


@dataclass
class Request:
    url: Url


def user(uid: str = "u-alice", role: str = "user") -> dict[str, Any]:
    """`__user__`: the user row as a dict (valves left out: the filter has no UserValves)."""
    return {"id": uid, "email": f"{uid}@example.com", "name": uid, "role": role, "settings": {}}


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    }


def chunks(n: int, with_usage: dict[str, Any] | None, finish: str = "stop") -> list[dict]:
    """An OpenAI stream of `n` words: role chunk, one chunk per word, finish, usage."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": (" " if i else "") + WORDS[i % len(WORDS)]}) for i in range(n)]
    events.append(chunk({}, finish))
    if with_usage is not None:
        events.append({"id": "chatcmpl-1", "choices": [], "usage": with_usage})
    return events


def text_of(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


@dataclass
class Chat:
    """One request through the hooks, in Open WebUI's order (F1-F4 of the facts)."""

    filt: Any
    who: dict[str, Any] = field(default_factory=user)
    ui: bool = False
    stream: bool = False
    max_tokens: int | None = 50
    content: str = "hello there"
    client_usage: bool = False
    emitted: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.message_id = str(uuid.uuid4()) if self.ui else None
        self.chat_id = str(uuid.uuid4()) if self.ui else ""
        self.metadata: dict[str, Any] = {
            "user_id": self.who["id"],
            "chat_id": self.chat_id,
            "message_id": self.message_id,
            "session_id": "fake-socket-1" if self.ui else None,
            "filter_ids": [],
        }
        self.request = Request(Url("/api/chat/completions"))
        self.sent: dict[str, Any] | None = None  # the body that would go upstream
        self.delivered: list[dict[str, Any]] = []  # what the client received

    async def emitter(self, event: dict[str, Any]) -> None:
        self.emitted.append(event)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": self.content}],
            "stream": self.stream,
            "metadata": self.metadata,
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.client_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    async def inlet(self) -> dict[str, Any]:
        self.sent = await self.filt.inlet(
            self.body(),
            __user__=self.who,
            __metadata__=self.metadata,
            __event_emitter__=self.emitter,
        )
        return self.sent

    async def stream_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            out = await self.filt.stream(
                event, __metadata__=self.metadata, __event_emitter__=self.emitter
            )
            if out is not None:
                self.delivered.append(out)

    def outlet_body(
        self, text: str, reported: dict[str, Any] | None, history: list[dict] | None = None
    ) -> dict[str, Any]:
        message_id = self.message_id or f"msg_{uuid.uuid4().hex[:24]}"
        message: dict[str, Any] = {"id": message_id, "role": "assistant", "content": text}
        if reported is not None:
            # Open WebUI normalises usage, adding input/output names (F4)
            message["usage"] = {
                **reported,
                "input_tokens": reported["prompt_tokens"],
                "output_tokens": reported["completion_tokens"],
            }
        before = history or [{"role": "user", "content": self.content}]
        return {
            "model": MODEL,
            "messages": [*before, message],
            "filter_ids": [],
            "chat_id": self.chat_id,
            "session_id": self.metadata.get("session_id"),
            "id": message_id,
        }

    async def outlet(self, body: dict[str, Any], path: str = "/api/chat/completions") -> None:
        await self.filt.outlet(
            body,
            __metadata__=self.metadata,
            __request__=Request(Url(path)),
            __event_emitter__=self.emitter if self.ui else None,
        )

    def statuses(self) -> list[str]:
        return [e["data"]["description"] for e in self.emitted if e["type"] == "status"]


async def run(coro: Any) -> Any:
    """Run a request in its own task (Open WebUI's request or background task)."""
    return await asyncio.ensure_future(coro)


async def settled_events(
    gw: RunningGateway, count: int, user_id: str | None = "u-alice", timeout: float = 5.0
) -> list[Any]:
    """The ledger once it holds `count` events (polling without blocking the loop, where
    the filter's own settling tasks run)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        events = await gw.events(user_id)
        if len(events) >= count or asyncio.get_running_loop().time() > deadline:
            return events
        await asyncio.sleep(0.02)


# -- the happy paths ---------------------------------------------------------------------------


async def test_non_streamed_chat_settles_the_reported_usage_once(
    filt: Any, gw: RunningGateway
) -> None:
    chat = Chat(filt, max_tokens=50)

    async def flow() -> None:
        sent = await chat.inlet()
        assert sent["max_tokens"] == 50
        assert "stream_options" not in sent
        assert "quotagate" in chat.metadata  # the link to the later hooks
        await chat.outlet(chat.outlet_body(text_of(5), usage(9, 5)))

    await run(flow())
    [event] = await settled_events(gw, 1)
    assert (event.prompt_tokens, event.completion_tokens, event.estimated) == (9, 5, False)
    await asyncio.sleep(0.5)  # the task-end watcher ran too: still one event, nothing held
    assert len(await gw.events()) == 1
    assert await gw.pending() == 0


async def test_streamed_chat_settles_at_the_usage_chunk(filt: Any, gw: RunningGateway) -> None:
    chat = Chat(filt, stream=True, max_tokens=8)

    async def flow() -> None:
        sent = await chat.inlet()
        assert sent["stream_options"] == {"include_usage": True}  # F4: ask for usage
        await chat.stream_events(chunks(8, usage(4, 8)))
        assert chat.metadata["quotagate"]["settled"] is True  # before the outlet
        await chat.outlet(chat.outlet_body(text_of(8), usage(4, 8)))

    await run(flow())
    [event] = await settled_events(gw, 1)
    assert (event.prompt_tokens, event.completion_tokens) == (4, 8)
    # the API client did not ask for the usage chunk, so it does not get one
    assert all(e["choices"] for e in chat.delivered)
    assert len(chat.delivered) == 10


async def test_a_client_that_asked_for_usage_keeps_its_chunk(filt: Any) -> None:
    chat = Chat(filt, stream=True, client_usage=True)
    await run(_stream_flow(chat, 3, usage(2, 3)))
    assert chat.delivered[-1]["usage"]["completion_tokens"] == 3


async def _stream_flow(chat: Chat, n: int, reported: dict[str, Any] | None) -> None:
    await chat.inlet()
    await chat.stream_events(chunks(n, reported))
    await chat.outlet(chat.outlet_body(text_of(n), reported))


async def test_ui_path_outlet_counts_only_this_message(filt: Any, gw: RunningGateway) -> None:
    """F4: the UI path's outlet carries the whole branch, earlier turns with their usage."""
    chat = Chat(filt, ui=True, stream=True)
    history = [
        {"id": "m1", "role": "user", "content": "first question"},
        {"id": "m2", "role": "assistant", "content": "old answer", "usage": usage(100, 900)},
        {"id": "m3", "role": "user", "content": chat.content},
    ]

    async def flow() -> None:
        await chat.inlet()
        # an upstream that ignores include_usage: no usage chunk, the outlet brings it
        await chat.stream_events(chunks(6, None))
        await chat.outlet(chat.outlet_body(text_of(6), usage(7, 6), history))

    await run(flow())
    [event] = await settled_events(gw, 1)
    assert (event.prompt_tokens, event.completion_tokens) == (7, 6)


async def test_streamed_text_is_counted_when_no_usage_comes(filt: Any, gw: RunningGateway) -> None:
    chat = Chat(filt, stream=True)
    await run(_stream_flow(chat, 12, None))
    [event] = await settled_events(gw, 1)
    assert event.estimated is True
    assert event.completion_tokens == gw.engine.counter.text(text_of(12), MODEL)
    assert event.prompt_tokens == chat.metadata["quotagate"]["prompt_tokens"]


async def test_a_chat_streaming_longer_than_the_lease_keeps_its_reservation(
    tmp_path: Path,
) -> None:
    """The filter renews the ticket from its stream hook, so QuotaGate never sweeps a chat
    that is still streaming: the reservation holds, the real usage is settled once."""
    lease = 1.5
    with running_gateway(
        tmp_path, lease_seconds=lease, sweep_seconds=0.2, on_expiry="release"
    ) as gw:
        gw.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        module = load_function()
        filt = module.Filter()
        filt.valves = module.Filter.Valves(
            quotagate_url=gw.root_url,
            service_key=gw.key("openwebui", trusted_openwebui=True),
            settle_grace_seconds=0.2,
            send_groups=False,
        )
        chat = Chat(filt, stream=True, max_tokens=200)
        events = chunks(12, usage(4, 12))
        held = []

        async def flow() -> None:
            await chat.inlet()
            for event in events:
                await asyncio.sleep(4 * lease / len(events))  # a slow model: four leases
                await chat.stream_events([event])
                held.append(sum(r for _, r in (await gw.counters()).values()))
            await chat.outlet(chat.outlet_body(text_of(12), usage(4, 12)))

        await run(flow())
        assert all(held[:-1]), held  # reserved all along (the last chunk settled it)
        [event] = await settled_events(gw, 1)
        assert (event.status, event.estimated) == ("settled", False)
        assert (event.prompt_tokens, event.completion_tokens) == (4, 12)
        assert await gw.pending() == 0


async def test_tool_call_rounds_add_up(filt: Any, gw: RunningGateway) -> None:
    """A model that calls a tool is called again: both calls' usage is charged, once."""
    chat = Chat(filt, stream=True)

    async def flow() -> None:
        await chat.inlet()
        await chat.stream_events(chunks(2, usage(10, 2), finish="tool_calls"))
        assert chat.metadata["quotagate"]["settled"] is False
        await chat.stream_events(chunks(4, usage(30, 4)))
        await chat.outlet(chat.outlet_body(text_of(4), usage(30, 4)))

    await run(flow())
    [event] = await settled_events(gw, 1)
    assert (event.prompt_tokens, event.completion_tokens) == (40, 6)


# -- refusals and clamping ---------------------------------------------------------------------


async def test_refusal_raises_a_message_a_person_understands(filt: Any, gw: RunningGateway) -> None:
    gw.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 40)
    used = Chat(filt, who=user("u-bob"), max_tokens=30)
    await run(_api_flow(used, 30))
    chat = Chat(filt, who=user("u-bob"), max_tokens=50, ui=True)
    with pytest.raises(Exception) as refused:
        await run(chat.inlet())
    message = str(refused.value)
    assert message.startswith("Your daily token allowance is used up: "), message
    assert "override" not in message  # words, not the catalog's label
    assert "of 40 tokens used, 0 left." in message
    assert "It resets at 00:00 Europe/Berlin (in " in message
    assert "quotagate" not in chat.metadata
    # Open WebUI shows the raised text as the reply's error and keeps every status emitted
    # before the raise: the refusal is the error only, or the person reads it twice
    assert chat.statuses() == []
    assert await gw.pending() == 0


async def test_the_filter_says_what_the_gateway_says(tmp_path: Path) -> None:
    """One wording: the Function shows the sentence a gateway-mode 429 carries, word for
    word (the wait aside, which is counted at each call)."""
    with (
        running_upstream() as up,
        running_gateway(tmp_path, [channel("main", up, [MODEL])], timezone="Europe/Berlin") as gw,
    ):
        gw.limit(Scope.USER, "u-dora", Metric.TOKENS, "day", 40)
        module = load_function()
        filt = module.Filter()
        filt.valves = module.Filter.Valves(
            quotagate_url=gw.root_url,
            service_key=gw.key("openwebui", trusted_openwebui=True),
            send_groups=False,
        )
        await run(_api_flow(Chat(filt, who=user("u-dora"), max_tokens=30), 30))
        with pytest.raises(Exception) as refused:
            await run(Chat(filt, who=user("u-dora"), max_tokens=50).inlet())
        answer = gw.http.post(
            f"{gw.base_url}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]},
            headers={"Authorization": f"Bearer {gw.key('u-dora')}"},
        )
        assert answer.status_code == 429

    def sentence(text: str) -> str:
        return re.sub(r" \(in [^)]*\)", "", text)

    gateway_says = answer.json()["error"]["message"]
    assert sentence(str(refused.value)) == sentence(gateway_says), gateway_says
    assert "00:00 Europe/Berlin" in gateway_says


async def _api_flow(chat: Chat, completion: int) -> None:
    await chat.inlet()
    prompt = chat.metadata["quotagate"]["prompt_tokens"]
    await chat.outlet(chat.outlet_body(text_of(completion), usage(prompt, completion)))


async def test_max_tokens_is_clamped_to_what_is_left(filt: Any, gw: RunningGateway) -> None:
    gw.limit(Scope.USER, "u-carol", Metric.TOKENS, "day", 30)
    chat = Chat(filt, who=user("u-carol"), max_tokens=None)
    sent = await run(chat.inlet())
    state = chat.metadata["quotagate"]
    assert sent["max_tokens"] == 30 - state["prompt_tokens"]
    assert sent["max_tokens"] == state["max_tokens"]


async def test_max_completion_tokens_is_clamped_too(filt: Any, gw: RunningGateway) -> None:
    gw.limit(Scope.USER, "u-carol", Metric.TOKENS, "day", 30)
    chat = Chat(filt, who=user("u-carol"), max_tokens=None)
    body = chat.body()
    body["max_completion_tokens"] = 500
    sent = await run(filt.inlet(body, __user__=chat.who, __metadata__=chat.metadata))
    assert sent["max_completion_tokens"] == sent["max_tokens"] < 30


# -- what the deprecated route may not do ------------------------------------------------------


async def test_chat_completed_outlet_never_counts(filt: Any, gw: RunningGateway) -> None:
    """F1: /api/chat/completed runs outlet again on a client-written body."""
    chat = Chat(filt)
    await run(_api_flow(chat, 5))
    [before] = await settled_events(gw, 1)
    # the same request's metadata (as if it were linked) and a fresh one, both with usage
    forged = chat.outlet_body("w1 w2", {"prompt_tokens": -1000, "completion_tokens": 0})
    await chat.outlet(forged, path="/api/chat/completed")
    fresh = Chat(filt)
    fresh.metadata = {"chat_id": "", "message_id": "msg-client-1", "session_id": None}
    await fresh.outlet(fresh.outlet_body("w1 w2", usage(1, 2)), path="/api/chat/completed")
    await asyncio.sleep(0.5)
    assert [e.ticket_id for e in await gw.events()] == [before.ticket_id]

    # a request still in flight cannot be settled cheaply through it either
    running = Chat(filt, stream=True)

    async def flow() -> None:
        await running.inlet()
        await running.outlet(running.outlet_body("", usage(0, 0)), path="/api/chat/completed")
        assert running.metadata["quotagate"]["settled"] is False
        await running.stream_events(chunks(3, usage(5, 3)))

    await run(flow())
    events = await settled_events(gw, 2)
    assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (5, 3)


# -- when no outlet comes ----------------------------------------------------------------------


async def test_a_stopped_generation_is_charged_for_what_was_streamed(
    filt: Any, gw: RunningGateway
) -> None:
    """The UI's stop button cancels the task mid-stream; no outlet runs (F9)."""
    chat = Chat(filt, ui=True, stream=True, max_tokens=200)
    streamed = asyncio.Event()

    async def flow() -> None:
        await chat.inlet()
        await chat.stream_events(chunks(7, None)[:8])  # role chunk + 7 words
        streamed.set()
        await asyncio.sleep(60)  # the model keeps going... until the task is cancelled

    task = asyncio.ensure_future(flow())
    await streamed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [event] = await settled_events(gw, 1)
    assert event.estimated is True
    assert event.completion_tokens == gw.engine.counter.text(text_of(7), MODEL)
    assert await gw.pending() == 0


async def test_an_upstream_error_releases_the_reservation(filt: Any, gw: RunningGateway) -> None:
    """The upstream answers 500: inlet ran, then nothing (no stream, no outlet)."""
    chat = Chat(filt, stream=True, max_tokens=500)

    async def flow() -> None:
        await chat.inlet()
        raise RuntimeError("upstream answered 500")  # Open WebUI ends the request

    with pytest.raises(RuntimeError):
        await run(flow())
    assert await gw.pending() == 1
    deadline = asyncio.get_running_loop().time() + 5
    while await gw.pending() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert await gw.pending() == 0
    assert await gw.events() == []
    assert all(held == 0 for _, held in (await gw.counters()).values())


async def test_a_late_outlet_after_the_watcher_changes_nothing(
    filt: Any, gw: RunningGateway
) -> None:
    chat = Chat(filt, stream=True)

    async def flow() -> None:
        await chat.inlet()
        await chat.stream_events(chunks(3, None))

    await run(flow())
    [event] = await settled_events(gw, 1)
    await chat.outlet(chat.outlet_body(text_of(3), usage(2, 300)))
    assert [e.completion_tokens for e in await gw.events()] == [event.completion_tokens]


# -- QuotaGate down, exemptions, status lines --------------------------------------------------


async def test_unreachable_quotagate_fails_closed_by_default(filt: Any) -> None:
    filt.valves.quotagate_url = "http://127.0.0.1:9"
    chat = Chat(filt)
    with pytest.raises(Exception, match="cannot be reached"):
        await run(chat.inlet())


async def test_unreachable_quotagate_can_fail_open(filt: Any) -> None:
    filt.valves.quotagate_url = "http://127.0.0.1:9"
    filt.valves.fail_open = True
    chat = Chat(filt)
    sent = await run(chat.inlet())
    assert sent["max_tokens"] == 50 and "quotagate" not in chat.metadata


async def test_a_wrong_service_key_is_not_a_refusal(filt: Any) -> None:
    filt.valves.service_key = "qg-wrong-key"
    with pytest.raises(Exception, match="cannot be reached"):
        await run(Chat(filt).inlet())


async def test_exempt_roles_are_neither_limited_nor_counted(filt: Any, gw: RunningGateway) -> None:
    filt.valves.exempt_roles = "admin, owner"
    gw.limit(Scope.USER, "u-root", Metric.TOKENS, "day", 0)
    chat = Chat(filt, who=user("u-root", role="admin"))
    await run(_api_flow_unlinked(chat))
    assert await gw.events() == []
    assert gw.engine.catalog.user("u-root") is None  # QuotaGate was never asked


async def _api_flow_unlinked(chat: Chat) -> None:
    await chat.inlet()
    assert "quotagate" not in chat.metadata
    await chat.outlet(chat.outlet_body(text_of(5), usage(3, 5)))


async def test_status_line_and_threshold_warning(filt: Any, gw: RunningGateway) -> None:
    gw.limit(Scope.USER, "u-dora", Metric.TOKENS, "day", 1_000)
    # each chat's max_tokens covers what it reports: over-reported usage would be capped
    chat = Chat(filt, who=user("u-dora"), ui=True, stream=True, max_tokens=100)

    async def flow(c: Chat, completion: int) -> None:
        await c.inlet()
        prompt = c.metadata["quotagate"]["prompt_tokens"]
        await c.stream_events(chunks(3, usage(prompt, completion)))
        await c.outlet(c.outlet_body(text_of(3), usage(prompt, completion)))

    await run(flow(chat, 100))
    statuses = chat.statuses()
    assert statuses[0] == "1,000 of 1,000 tokens left today, resets 00:00 Europe/Berlin"
    prompt = chat.metadata["quotagate"]["prompt_tokens"]
    left = 1_000 - prompt - 100
    assert statuses[-1] == f"{left:,} of 1,000 tokens left today, resets 00:00 Europe/Berlin"
    done = [e["data"]["done"] for e in chat.emitted if e["type"] == "status"]
    assert done == [False, True]

    heavy = Chat(filt, who=user("u-dora"), ui=True, stream=True, max_tokens=750)
    await run(flow(heavy, 750))  # crosses 80 %
    warnings = [e for e in heavy.emitted if e["type"] == "notification"]
    [warning] = warnings
    assert warning["data"]["type"] == "warning"
    assert warning["data"]["content"].startswith("You have used 8")
    assert "of your daily tokens quota" in warning["data"]["content"]
    assert heavy.statuses()[-1].startswith("⚠ You have used")


async def test_many_people_at_once_through_one_filter_instance(
    filt: Any, gw: RunningGateway
) -> None:
    """One Filter instance serves every user and request of an Open WebUI process (F3)."""
    people = [f"u-{i}" for i in range(6)]

    async def one(uid: str, n: int) -> None:
        chat = Chat(filt, who=user(uid), stream=True, ui=n % 2 == 0)
        await chat.inlet()
        for event in chunks(n, usage(n, n)):
            await chat.stream_events([event])
            await asyncio.sleep(0)  # interleave with the others
        await chat.outlet(chat.outlet_body(text_of(n), usage(n, n)))

    jobs = [asyncio.ensure_future(one(uid, k + 1)) for k in range(4) for uid in people]
    await asyncio.gather(*jobs)
    events = await settled_events(gw, len(jobs), None, timeout=10)
    assert len(events) == len(jobs)
    for uid in people:
        mine = [e for e in events if e.user_id == uid]
        assert sorted(e.completion_tokens for e in mine) == [1, 2, 3, 4]
        assert all(e.prompt_tokens == e.completion_tokens for e in mine)
    assert await gw.pending() == 0


# -- the file itself ---------------------------------------------------------------------------


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("source", [function_source(), pipeline_source()], ids=["fn", "pipe"])
def test_the_files_are_self_contained(source: str) -> None:
    """Standard library and pydantic only (Open WebUI in offline mode installs nothing),
    never quotagate; no `requirements:` line; Open WebUI's own modules, and the starlette
    the Pipelines server runs on, only where guarded."""
    allowed = set(sys.stdlib_module_names) | {"pydantic", "open_webui", "starlette"}
    assert _imports(source) <= allowed
    assert "quotagate" not in _imports(source)
    frontmatter = source.split('"""')[1]
    assert "requirements:" not in frontmatter
    assert "title:" in frontmatter


def test_the_function_is_never_a_toggle() -> None:
    """F1: a `toggle = True` filter runs only when the request names it: a quota hole."""
    module = load_function()
    instance = module.Filter()
    assert not getattr(instance, "toggle", False)
    assert not hasattr(module.Filter, "UserValves")  # users may not set their own limits


def test_both_files_share_one_core() -> None:
    def core(source: str) -> str:
        start = source.index("# ==== BEGIN QUOTAGATE CORE")
        return source[start : source.index("# ==== END QUOTAGATE CORE ====")]

    assert core(function_source()) == core(pipeline_source()), (
        f"the core of {FUNCTION_FILE} and {PIPELINE_FILE} differ: copy it over"
    )
