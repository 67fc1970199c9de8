"""The Open WebUI harness gives the e2e tests a real, offline Open WebUI 0.12.4 to work against.

One Open WebUI process (installed from PyPI into the cached venv, started on loopback against
the demo upstream) serves the whole module, because each start costs 20-40 s. Every test looks
only at what happened after it began (offsets into the upstream's and the probe's records).

What is proven: the server runs with no network access beyond loopback (an audit hook in the
Open WebUI process refuses and records anything else), an admin and a user exist, a Filter
Function installed through the REST API runs on every chat (its inlet marks the prompt, which
the upstream receives; its hooks are recorded to a file), and chats complete streamed and not,
on the API path, the UI path and with a personal API key.

If Open WebUI cannot be installed or started these tests fail (the fixture raises); they are
never skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from quotagate.gateway.demo import REPLY_WORDS
from tests.openwebui.harness import (
    OPENWEBUI_VERSION,
    Account,
    OpenWebUIClient,
    OpenWebUIServer,
    ensure_openwebui,
    install_info,
    run_openwebui,
    stream_text,
)
from tests.support.upstream import RunningUpstream, running_upstream

pytestmark = pytest.mark.openwebui

MODEL = "demo-model"
MARKER = "[qg-harness-probe]"
# TEST-NET-1 (RFC 5737): the address the network guard is checked with, never reached.
SENTINEL_HOST = "192.0.2.1"

# A trivial filter: its inlet appends MARKER to the last user message (so the upstream proves
# the filter ran before the model call) and every hook appends one JSON line to a file.
PROBE_FILTER = '''"""
title: QuotaGate harness probe
description: records every hook call to a file and marks the prompt
"""

import json
import socket

from pydantic import BaseModel

LOG_PATH = __LOG_PATH__


def _record(hook, **fields):
    with open(LOG_PATH, "a") as fh:
        fh.write(json.dumps({"hook": hook, **fields}, default=str) + "\\n")


def _netcheck():
    # Both calls stay on this machine even if nothing blocked them: a numeric getaddrinfo
    # does no DNS lookup and connecting a UDP socket sends no packet.
    out = {}
    try:
        socket.getaddrinfo(__SENTINEL__, 9, flags=socket.AI_NUMERICHOST)
        out["getaddrinfo"] = "allowed"
    except OSError as e:
        out["getaddrinfo"] = "blocked: " + str(e)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((__SENTINEL__, 9))
        out["connect"] = "allowed"
    except OSError as e:
        out["connect"] = "blocked: " + str(e)
    return out


class Filter:
    class Valves(BaseModel):
        marker: str = __MARKER__

    def __init__(self):
        self.valves = self.Valves()

    async def inlet(self, body: dict, __user__: dict = None, __metadata__: dict = None,
                    __request__=None) -> dict:
        messages = body.get("messages") or []
        if messages and isinstance(messages[-1].get("content"), str):
            messages[-1]["content"] += " " + self.valves.marker
        if messages and messages[-1].get("content", "").startswith("__netcheck__"):
            _record("netcheck", **_netcheck())
        meta = __metadata__ or {}
        _record("inlet", email=(__user__ or {}).get("email"), role=(__user__ or {}).get("role"),
                path=__request__.url.path if __request__ is not None else None,
                stream=body.get("stream"), chat_id=meta.get("chat_id"),
                message_id=meta.get("message_id"), session_id=meta.get("session_id"))
        return body

    async def stream(self, event: dict) -> dict:
        _record("stream")
        return event

    async def outlet(self, body: dict, __user__: dict = None, __request__=None) -> dict:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        _record("outlet", email=(__user__ or {}).get("email"),
                path=__request__.url.path if __request__ is not None else None,
                content=last.get("content"), usage=last.get("usage"), id=body.get("id"),
                chat_id=body.get("chat_id"))
        return body
'''


@dataclass
class World:
    """The module's one Open WebUI, its upstream, its accounts and the probe's record."""

    server: OpenWebUIServer
    upstream: RunningUpstream
    admin: Account
    alice: Account
    admin_api: OpenWebUIClient
    alice_api: OpenWebUIClient
    probe_log: Path

    def hooks(self, start: int = 0) -> list[dict[str, Any]]:
        if not self.probe_log.exists():
            return []
        lines = self.probe_log.read_text().splitlines()
        return [json.loads(x) for x in lines[start:] if x.strip()]

    def hooks_until_outlet(self, start: int, outlets: int = 1, timeout: float = 20.0) -> list[Any]:
        """The hooks since `start` once `outlets` outlet calls are recorded.

        Outlet may run just after the client got its last byte (stream: when [DONE] passes;
        UI path: after the message is saved), so tests wait for it instead of racing it.
        """
        deadline = time.monotonic() + timeout
        while True:
            hooks = self.hooks(start)
            if sum(h["hook"] == "outlet" for h in hooks) >= outlets:
                return hooks
            if time.monotonic() > deadline:
                raise AssertionError(f"no outlet after {timeout} s; hooks: {hooks}")
            time.sleep(0.1)

    def upstream_calls_since(self, start: int, count: int, timeout: float = 20.0) -> list[Any]:
        """The upstream's records since `start` once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        while len(self.upstream.log) - start < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return list(self.upstream.log[start:])

    def mark(self) -> tuple[int, int]:
        """Where the probe's and the upstream's records stand now."""
        return len(self.hooks()), len(self.upstream.log)


def _words(n: int) -> str:
    return " ".join(REPLY_WORDS[i % len(REPLY_WORDS)] for i in range(n))


def test_openwebui_installs_from_pypi() -> None:
    """The pinned release is installed in its cached venv (installs it on a fresh machine)."""
    venv = ensure_openwebui()
    assert (venv / "bin" / "open-webui").exists()
    info = install_info()
    assert info is not None
    assert info["open-webui"] == OPENWEBUI_VERSION
    assert str(info["torch_installed"]).startswith("2.13.0")  # the CPU build, not CUDA


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data_dir = tmp_path_factory.mktemp("openwebui")
    probe_log = data_dir / "probe.jsonl"
    source = (
        PROBE_FILTER.replace("__LOG_PATH__", repr(str(probe_log)))
        .replace("__MARKER__", repr(MARKER))
        .replace("__SENTINEL__", repr(SENTINEL_HOST))
    )
    with running_upstream() as up, run_openwebui(up.base_url, data_dir) as server:
        anon = server.client()
        admin = anon.signup("Ada Admin", "admin@example.com", "admin-pass-1")
        admin_api = server.client(admin.token)
        alice = admin_api.add_user("Alice", "alice@example.com", "alice-pass-1")
        admin_api.create_public_model(MODEL)
        admin_api.install_function("qg_probe", source, "QuotaGate harness probe")
        alice_api = server.client(alice.token)
        try:
            yield World(server, up, admin, alice, admin_api, alice_api, probe_log)
        finally:
            anon.close()
            admin_api.close()
            alice_api.close()


def test_starts_offline_on_loopback(world: World) -> None:
    s = world.server
    version = s.client().http.get("/api/version").json()
    assert version["version"] == OPENWEBUI_VERSION
    assert s.base_url.startswith("http://127.0.0.1:")
    unexpected = [b for b in s.blocked_network() if b["host"] != SENTINEL_HOST]
    assert unexpected == [], "Open WebUI tried to reach the network"
    assert "Offline mode enabled" in s.log_text()
    print(f"Open WebUI healthy {s.startup_seconds} s after start; log: {s.log_path}")


def test_network_guard_refuses_non_loopback_inside_openwebui(world: World) -> None:
    """The offline guard is live in the Open WebUI process (so 'no attempts' means something)."""
    hooks_at, _ = world.mark()
    world.alice_api.chat(MODEL, [{"role": "user", "content": "__netcheck__"}], max_tokens=1)
    check = next(h for h in world.hooks(hooks_at) if h["hook"] == "netcheck")
    assert check["getaddrinfo"].startswith("blocked"), check
    assert check["connect"].startswith("blocked"), check
    recorded = [b for b in world.server.blocked_network() if b["host"] == SENTINEL_HOST]
    assert [b["event"] for b in recorded][-2:] == ["socket.getaddrinfo", "socket.connect"]
    # Loopback stays open: the same chat reached the upstream on 127.0.0.1.


def test_admin_and_user_exist(world: World) -> None:
    assert world.admin.role == "admin"
    assert world.alice.role == "user"
    users = {u["email"]: u["role"] for u in world.admin_api.users()}
    assert users == {"admin@example.com": "admin", "alice@example.com": "user"}
    # The first sign-up turned sign-up off: nobody else can register themselves.
    late = world.server.client().raw(
        "POST",
        "/api/v1/auths/signup",
        {"name": "Mallory", "email": "mallory@example.com", "password": "mallory-pass-1"},
    )
    assert late.status_code == 403, late.text
    # A user sees the model only because the admin registered it as public.
    assert [m["id"] for m in world.alice_api.models()] == [MODEL]


def test_filter_function_is_installed_active_and_global(world: World) -> None:
    f = world.admin_api.function("qg_probe")
    assert (f["type"], f["is_active"], f["is_global"]) == ("filter", True, True)


def test_non_streamed_chat_runs_through_the_filter(world: World) -> None:
    hooks_at, log_at = world.mark()
    reply = world.alice_api.chat(MODEL, [{"role": "user", "content": "hello there"}], max_tokens=5)

    assert reply["choices"][0]["message"]["content"] == _words(5)
    assert reply["usage"]["completion_tokens"] == 5
    calls = world.upstream.log[log_at:]
    assert [c.path for c in calls] == ["/v1/chat/completions"]
    sent = calls[0].body
    assert sent["messages"][-1]["content"] == f"hello there {MARKER}"
    assert sent["max_tokens"] == 5
    assert calls[0].headers["x-openwebui-user-email"] == "alice@example.com"
    assert calls[0].headers["x-openwebui-auth-type"] == "jwt"

    hooks = world.hooks_until_outlet(hooks_at)
    assert [h["hook"] for h in hooks] == ["inlet", "outlet"]
    inlet, outlet = hooks
    assert (inlet["email"], inlet["role"], inlet["stream"]) == ("alice@example.com", "user", False)
    assert inlet["path"] == "/api/chat/completions"
    assert outlet["content"] == _words(5)
    assert outlet["usage"]["prompt_tokens"] == reply["usage"]["prompt_tokens"]
    assert outlet["usage"]["completion_tokens"] == 5


def test_streamed_chat_runs_through_the_filter(world: World) -> None:
    hooks_at, log_at = world.mark()
    events = world.alice_api.chat_stream(
        MODEL, [{"role": "user", "content": "stream please"}], max_tokens=4
    )

    assert stream_text(events) == _words(4)
    calls = world.upstream.log[log_at:]
    assert len(calls) == 1
    assert calls[0].body["stream"] is True
    assert calls[0].body["messages"][-1]["content"] == f"stream please {MARKER}"

    kinds = [h["hook"] for h in world.hooks_until_outlet(hooks_at)]
    assert kinds[0] == "inlet"
    assert kinds[-1] == "outlet"
    assert kinds.count("stream") >= 4  # one per upstream event (role, words, finish)


def test_chat_completed_runs_outlet_again(world: World) -> None:
    """The deprecated /api/chat/completed runs outlet on a client-made body, no model call."""
    hooks_at, log_at = world.mark()
    resp = world.alice_api.chat_completed(
        MODEL,
        "msg-client-1",
        [
            {"role": "user", "content": "x"},
            {"id": "msg-client-1", "role": "assistant", "content": "w1 w2"},
        ],
    )
    assert resp.status_code == 200, resp.text
    assert world.upstream.log[log_at:] == []
    hooks = world.hooks_until_outlet(hooks_at)
    assert [h["hook"] for h in hooks] == ["outlet"]
    assert hooks[0]["path"] == "/api/chat/completed"
    assert hooks[0]["content"] == "w1 w2"


def test_ui_path_chat_runs_in_the_background(world: World) -> None:
    """The web UI's request shape: immediate task reply, result saved in the chat."""
    hooks_at, log_at = world.mark()
    chat = world.alice_api.ui_chat_start(
        MODEL, "ui hello", background_tasks={"title_generation": True}
    )
    assert chat.reply["status"] is True
    assert chat.task_ids
    message = world.alice_api.ui_chat_wait(chat)

    assert message["content"] == _words(20)  # the demo upstream's default length
    hooks = world.hooks_until_outlet(hooks_at)
    assert hooks[0]["hook"] == "inlet"
    assert hooks[0]["chat_id"] == chat.chat_id
    assert hooks[0]["message_id"] == chat.assistant_id
    assert hooks[0]["session_id"] == chat.session_id
    outlets = [h for h in hooks if h["hook"] == "outlet"]
    assert [o["id"] for o in outlets] == [chat.assistant_id]
    # The title generation task also called the model, without passing through the filter.
    bodies = [c.body for c in world.upstream_calls_since(log_at, 2)]
    prompts = [b["messages"][-1]["content"] for b in bodies]
    assert f"ui hello {MARKER}" in prompts
    assert any("Generate a concise title" in p for p in prompts), prompts
    assert len(bodies) == 2


def test_personal_api_key_reaches_the_upstream_as_api_key(world: World) -> None:
    key = world.alice_api.create_api_key()
    assert key.startswith("sk-")
    _, log_at = world.mark()
    with world.server.client(key) as by_key:
        reply = by_key.chat(MODEL, [{"role": "user", "content": "by key"}], max_tokens=2)
    assert reply["choices"][0]["message"]["content"] == _words(2)
    headers = world.upstream.log[log_at].headers
    assert headers["x-openwebui-auth-type"] == "api_key"
    assert headers["x-openwebui-user-email"] == "alice@example.com"


def test_user_without_access_gets_no_model(world: World) -> None:
    """Sanity of the access model the e2e tests rely on: unknown models are refused."""
    resp = world.alice_api.raw(
        "POST",
        "/api/chat/completions",
        {"model": "demo-model-large", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code in (400, 403, 404), resp.text
    assert isinstance(resp.json().get("detail"), str)
    with pytest.raises(httpx.HTTPStatusError):
        world.alice_api.chat("demo-model-large", [{"role": "user", "content": "hi"}])


def test_admin_valves_reach_the_filter(world: World) -> None:
    world.admin_api.update_function_valves("qg_probe", {"marker": "[valve-set]"})
    try:
        _, log_at = world.mark()
        world.alice_api.chat(MODEL, [{"role": "user", "content": "valves"}], max_tokens=1)
        assert world.upstream.log[log_at].body["messages"][-1]["content"] == "valves [valve-set]"
    finally:
        world.admin_api.update_function_valves("qg_probe", {"marker": MARKER})


def test_ui_chat_can_be_stopped(world: World) -> None:
    """The UI's stop button cancels the background task mid-stream (no outlet runs)."""
    knobs = world.upstream.knobs
    knobs.default_tokens, knobs.chunk_delay = 200, 0.05
    try:
        hooks_at, _ = world.mark()
        chat = world.alice_api.ui_chat_start(MODEL, "long answer please")
        deadline = time.monotonic() + 30
        while sum(h["hook"] == "stream" for h in world.hooks(hooks_at)) < 5:
            assert time.monotonic() < deadline, world.hooks(hooks_at)
            time.sleep(0.05)
        world.alice_api.ui_chat_stop(chat)
        message = world.alice_api.ui_chat_wait(chat)
    finally:
        knobs.default_tokens, knobs.chunk_delay = 20, 0.0
    words = message["content"].split()
    assert 0 < len(words) < 200, message
    assert message["content"] == _words(len(words))
    time.sleep(1.0)
    assert "outlet" not in [h["hook"] for h in world.hooks(hooks_at)]
