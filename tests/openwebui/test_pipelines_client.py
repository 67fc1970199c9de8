"""The Pipelines filter as Open WebUI 0.12.4's own client code sees it.

test_pipelines.py talks to the filter the way routers/pipelines.py does, with httpx; this
module runs the real thing: `process_pipeline_inlet_filter`, imported from the installed
Open WebUI package (its aiohttp session, `raise_for_status`, its error handling), in a
process of Open WebUI's virtualenv, pointed at a Pipelines-compatible server holding the
real filter file, which calls a real QuotaGate. Only Open WebUI's lookup of the
connection's URL and key in its database (`get_openai_connection`) is replaced.

A second test runs the whole way, a real Open WebUI with the Pipelines-compatible server
as its second connection (the fetched open-webui/pipelines server itself, run by hand,
answered the same).

What it proves: that client keeps nothing of a Pipelines error answer but its status and
reason phrase, so a refusal must say it with its status — 429, "Too Many Requests" to the
web UI and HTTP 429 to API clients — not as the 500 "Internal Server Error" a raised
exception becomes; and an admitted API stream reaches the model without a usage request
the client never made. And the way around it (test_the_refusal_pipe_...): after a 200 inlet
Open WebUI calls the model the returned body names, so the opt-in refusal pipe makes the
web UI's reply QuotaGate's own message, without calling any model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quotagate.core.limits import Metric, Scope
from tests.gateway.harness import RunningGateway, running_gateway
from tests.openwebui.harness import (
    _server_env,
    base_env,
    ensure_openwebui,
    run_openwebui,
    template_db,
)
from tests.openwebui.test_pipelines import (
    PipelinesServer,
    inlet_body,
    owui_user,
    running_pipelines,
)
from tests.support.upstream import running_upstream

pytestmark = [pytest.mark.openwebui, pytest.mark.usefixtures("isolated_environment")]

# Runs inside Open WebUI's virtualenv: argv[1] = the Pipelines server's URL, stdin = the
# cases as JSON [{"user": ..., "payload": ...}], stdout = one JSON result per case.
CLIENT = r"""
import asyncio, json, sys
from fastapi import HTTPException
import open_webui.routers.pipelines as pipelines

URL, KEY = sys.argv[1], "0p3n-w3bu!"

async def connection(url_idx):
    return URL, KEY

pipelines.get_openai_connection = connection

class User:
    def __init__(self, d):
        self.id, self.email, self.name, self.role = d["id"], d["email"], d["name"], d["role"]

async def main():
    results = []
    for case in json.load(sys.stdin):
        payload = case["payload"]
        model = payload["model"]
        models = {
            model: {"id": model, "urlIdx": 1},
            "quotagate": {
                "id": "quotagate",
                "urlIdx": 1,
                "pipeline": {"type": "filter", "pipelines": ["*"], "priority": 0},
            },
        }
        try:
            user = User(case["user"])
            out = await pipelines.process_pipeline_inlet_filter(None, payload, user, models)
            results.append({"payload": out})
        except HTTPException as e:
            results.append({"status": e.status_code, "detail": e.detail})
    print(json.dumps(results))

asyncio.run(main())
"""


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path, timezone="Europe/Berlin") as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        gateway.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 5)
        yield gateway


@pytest.fixture
def server(
    gw: RunningGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PipelinesServer]:
    from quotagate.openwebui import PIPELINE_FILE, pipeline_source

    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / PIPELINE_FILE).write_text(pipeline_source())
    monkeypatch.setenv("QUOTAGATE_URL", gw.root_url)
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", gw.key("openwebui", trusted_openwebui=True))
    with running_pipelines(directory) as running:
        yield running


def open_webui_client(
    server: PipelinesServer, cases: list[dict[str, Any]], work: Path
) -> list[dict[str, Any]]:
    """Run Open WebUI's process_pipeline_inlet_filter on each case."""
    venv = ensure_openwebui()
    work.mkdir()
    shutil.copyfile(template_db(venv), work / "webui.db")
    env = _server_env(venv, base_env("http://127.0.0.1:9/v1", work), work / "network.jsonl", None)
    # import open_webui.config as its own migration step does; the template is at the head
    env.update(FROM_INIT_PY="true", ENABLE_DB_MIGRATIONS="false", GLOBAL_LOG_LEVEL="ERROR")
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CLIENT, server.url],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


async def test_open_webuis_client_gets_a_429_and_a_stream_without_a_usage_request(
    server: PipelinesServer, gw: RunningGateway, tmp_path: Path
) -> None:
    refused = {"user": owui_user("u-bob"), "payload": inlet_body()}
    api_stream = {"user": owui_user(), "payload": inlet_body(stream=True, max_tokens=40)}
    asked = inlet_body(stream=True, max_tokens=40)
    asked["stream_options"] = {"include_usage": True}
    asking = {"user": owui_user(), "payload": asked}
    ui_stream = {"user": owui_user(), "payload": inlet_body(ui=True, stream=True)}

    got = open_webui_client(server, [refused, api_stream, asking, ui_stream], tmp_path / "owui")

    # the refusal: Open WebUI raises HTTPException(429, "Too Many Requests"), which its
    # chat endpoint answers as HTTP 429 to API clients and shows in the web UI's error box
    # (it was 500 "Internal Server Error": the detail never survives that client)
    assert got[0] == {"status": 429, "detail": "Too Many Requests"}
    # admitted: clamped, and an API client's stream is not made to carry a usage chunk
    assert got[1]["payload"]["max_tokens"] == 40
    assert "stream_options" not in got[1]["payload"]
    assert got[2]["payload"]["stream_options"] == {"include_usage": True}
    # the web UI's own stream asks for usage (Open WebUI consumes that chunk itself)
    assert got[3]["payload"]["stream_options"] == {"include_usage": True}
    assert await gw.pending() == 3


async def test_a_refused_person_in_a_real_open_webui(
    server: PipelinesServer, gw: RunningGateway, tmp_path: Path
) -> None:
    """The whole way: Open WebUI 0.12.4 with the Pipelines server as its second connection.
    An API client is answered HTTP 429; the web UI's reply shows "Too Many Requests"."""
    with running_upstream() as upstream:
        env = {
            "OPENAI_API_BASE_URLS": f"{upstream.base_url};{server.url}",
            "OPENAI_API_KEYS": "sk-upstream;0p3n-w3bu!",
            "BYPASS_MODEL_ACCESS_CONTROL": "true",
        }
        with run_openwebui(upstream.base_url, tmp_path / "owui", extra_env=env) as owui:
            first = owui.client().signup("Admin", "admin@example.org", "pw-123456")
            with owui.client(first.token) as admin:
                assert "demo-model" in [m["id"] for m in admin.models()]
                bob = admin.add_user("Bob", "bob@example.org", "pw-123456")
            gw.limit(Scope.USER, bob.id, Metric.TOKENS, "day", 5)
            with owui.client(bob.token) as client:
                chat = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
                for stream in (False, True):
                    r = client.raw("POST", "/api/chat/completions", {**chat, "stream": stream})
                    assert (r.status_code, r.json()) == (429, {"detail": "Too Many Requests"})
                reply = client.ui_chat_wait(client.ui_chat_start("demo-model", "hi"))
                assert reply["error"] == {"content": "Too Many Requests"}
        assert upstream.requests == []  # the model was never called
    assert await gw.pending() == 0


@pytest.fixture
def server_with_refusals(
    gw: RunningGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PipelinesServer]:
    """The filter with its opt-in companion pipe, as docs/openwebui.md installs them."""
    from quotagate.openwebui import (
        PIPELINE_FILE,
        REFUSAL_PIPE_FILE,
        pipeline_source,
        refusal_pipe_source,
    )

    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / PIPELINE_FILE).write_text(pipeline_source())
    (directory / REFUSAL_PIPE_FILE).write_text(refusal_pipe_source())
    monkeypatch.setenv("QUOTAGATE_URL", gw.root_url)
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", gw.key("openwebui", trusted_openwebui=True))
    monkeypatch.setenv("QUOTAGATE_REFUSAL_MODEL", "quotagate-refusal")
    with running_pipelines(directory) as running:
        yield running


async def test_the_refusal_pipe_shows_quotagates_message_in_a_real_open_webui(
    server_with_refusals: PipelinesServer, gw: RunningGateway, tmp_path: Path
) -> None:
    """With the companion pipe, the web UI's reply IS QuotaGate's refusal: Open WebUI
    0.12.4 routes the call to the model the 200 inlet names (utils/chat.py looks
    `form_data["model"]` up again), checks that model's access (the admin made it public
    and hidden once, as the docs say), and the pipe answers the text. No model is called,
    nothing is charged, and API clients still get HTTP 429."""
    with running_upstream() as upstream:
        env = {
            "OPENAI_API_BASE_URLS": f"{upstream.base_url};{server_with_refusals.url}",
            "OPENAI_API_KEYS": "sk-upstream;0p3n-w3bu!",
        }
        with run_openwebui(upstream.base_url, tmp_path / "owui", extra_env=env) as owui:
            first = owui.client().signup("Admin", "admin@example.org", "pw-123456")
            with owui.client(first.token) as admin:
                models = {m["id"]: m for m in admin.models()}
                assert models["quotagate-refusal"]["pipeline"]["type"] == "pipe"
                admin.create_public_model("demo-model")
                bob = admin.add_user("Bob", "bob@example.org", "pw-123456")
            gw.limit(Scope.USER, bob.id, Metric.TOKENS, "day", 5)
            with owui.client(bob.token) as client:
                # the pipe's model not yet public: Open WebUI's access check on the model the
                # inlet switched to refuses, and still nothing is called
                before = client.ui_chat_wait(client.ui_chat_start("demo-model", "hi"))
                assert before["error"] == {"content": "Model not found"}, before
            with owui.client(first.token) as admin:
                # the admin's one step: Admin → Settings → Models → QuotaGate notices →
                # public, and hidden from the model selector
                admin.create_public_model(
                    "quotagate-refusal", name="QuotaGate notices", meta={"hidden": True}
                )
            with owui.client(bob.token) as client:
                tasks = {"tags_generation": True, "follow_up_generation": True}
                chat = client.ui_chat_start("demo-model", "hi", background_tasks=tasks)
                reply = client.ui_chat_wait(chat)
                assert not reply.get("error"), reply
                # QuotaGate's own words (core/explain.py), in the limit's timezone
                text = reply["content"]
                assert text.startswith("This request does not fit in your daily token allowance")
                assert "0 of 5 tokens used" in text and "Europe/Berlin" in text, text
                api = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
                for stream in (False, True):
                    r = client.raw("POST", "/api/chat/completions", {**api, "stream": stream})
                    assert (r.status_code, r.json()) == (429, {"detail": "Too Many Requests"})
                # the follow-ups and tags Open WebUI asks for after that reply reach the
                # filter as tasks of the same turn: the pipe answers them too (no JSON, so
                # none are shown) instead of the model
                deadline = time.monotonic() + 60
                while len(server_with_refusals.completions) < 3:  # the reply and both tasks
                    assert time.monotonic() < deadline, server_with_refusals.completions
                    time.sleep(0.2)
                answered = [c["model"] for c in server_with_refusals.completions]
                assert answered == ["quotagate-refusal"] * 3
                # picked by hand, the pipe only points elsewhere (and calls nothing)
                direct = {**api, "model": "quotagate-refusal", "stream": False}
                r = client.raw("POST", "/api/chat/completions", direct)
                assert r.status_code == 200, r.text
                assert "pick another model" in r.json()["choices"][0]["message"]["content"]
        assert upstream.requests == []  # the model was never called
    assert await gw.pending() == 0
