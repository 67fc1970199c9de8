"""The opt-in refusal pipe: QuotaGate's refusal as the web UI's reply (Pipelines).

Over the Pipelines server's HTTP protocol (test_pipelines.py's server, which loads every
file of the directory and serves pipes as the real server's main.py does). The whole way,
in a real Open WebUI 0.12.4: test_pipelines_client.py::
test_the_refusal_pipe_shows_quotagates_message_in_a_real_open_webui.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from quotagate.core.limits import Metric, Scope
from quotagate.openwebui import (
    PIPELINE_FILE,
    REFUSAL_PIPE_FILE,
    pipeline_source,
    refusal_pipe_source,
)
from quotagate.openwebui.__main__ import main as cli
from tests.gateway.harness import RunningGateway, running_gateway
from tests.openwebui.test_pipelines import (
    MODEL,
    PipelinesServer,
    call_filter,
    inlet_body,
    load_module,
    owui_user,
    pipeline_kind,
    running_pipelines,
)

pytestmark = pytest.mark.usefixtures("isolated_environment")

PIPE = "quotagate-refusal"


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path, timezone="Europe/Berlin") as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        gateway.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 5)
        yield gateway


@pytest.fixture
def pipes_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / PIPELINE_FILE).write_text(pipeline_source())
    (directory / REFUSAL_PIPE_FILE).write_text(refusal_pipe_source())
    return directory


@pytest.fixture
def server(
    gw: RunningGateway, pipes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PipelinesServer]:
    monkeypatch.setenv("QUOTAGATE_URL", gw.root_url)
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", gw.key("openwebui", trusted_openwebui=True))
    monkeypatch.setenv("QUOTAGATE_REFUSAL_MODEL", PIPE)
    with running_pipelines(pipes_dir) as running:
        yield running


def test_the_server_lists_the_pipe_as_a_model(server: PipelinesServer) -> None:
    listed = {
        m["id"]: m["pipeline"]["type"] for m in httpx.get(f"{server.url}/models").json()["data"]
    }
    assert listed == {"quotagate": "filter", PIPE: "pipe"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_pipe_answers_the_text_it_is_given_in_openai_format(
    server: PipelinesServer, stream: bool
) -> None:
    """Read with the openai SDK, as Open WebUI's router forwards it to the chat."""
    client = openai.OpenAI(base_url=server.url, api_key="0p3n-w3bu!", max_retries=0)
    messages: list = [{"role": "user", "content": "(refused by QuotaGate)"}]
    for extra, expected in (
        ({"quotagate_refusal": "Your daily token allowance is used up."}, "Your daily token"),
        ({}, "This model only shows QuotaGate"),  # picked by hand: it only points elsewhere
    ):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=PIPE, messages=messages, stream=True, extra_body=extra
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            # stream=False said out loud: the Pipelines server streams when it is left out
            answer = client.chat.completions.create(
                model=PIPE, messages=messages, stream=False, extra_body=extra
            )
            text = answer.choices[0].message.content or ""
            assert answer.choices[0].finish_reason == "stop"
        assert text.startswith(expected), text


async def test_a_refused_web_ui_turn_is_pointed_at_the_pipe(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    body = inlet_body(ui=True, stream=True)
    status, sent = call_filter(server, "inlet", body, owui_user("u-bob"))
    assert status == 200, sent  # a body: Open WebUI goes on, with the model it names
    assert sent["model"] == PIPE and sent["stream"] is True
    assert sent["quotagate_refusal"].startswith("This request does not fit in your daily")
    assert "Europe/Berlin" in sent["quotagate_refusal"]
    # the person's words go nowhere, and Open WebUI keeps its metadata
    assert "hello there" not in str(sent["messages"])
    assert sent["metadata"] == body["metadata"]
    assert await gw.pending() == 0


async def test_api_clients_still_get_the_http_error(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    """A program reads a status, not a reply that looks like the model's."""
    for stream in (False, True):
        status, detail = call_filter(server, "inlet", inlet_body(stream=stream), owui_user("u-bob"))
        assert status == 429 and "your daily token allowance" in detail


async def test_the_turns_tasks_go_to_the_pipe_until_a_turn_is_admitted(
    server: PipelinesServer, gw: RunningGateway
) -> None:
    """Open WebUI asks for follow-ups and tags once the pipe's reply is done; their
    metadata is the chat's (no message id). Uncounted, they would call the model."""
    turn = inlet_body(ui=True)
    call_filter(server, "inlet", turn, owui_user("u-bob"))
    task = inlet_body(ui=True, task="follow_up_generation", max_tokens=None)
    task["metadata"].pop("message_id")
    status, sent = call_filter(server, "inlet", task, owui_user("u-bob"))
    assert status == 200 and sent["model"] == PIPE
    # another person's tasks in another chat, and tasks of a chat never refused, pass
    other = inlet_body(ui=True, task="follow_up_generation", max_tokens=None)
    other["metadata"]["chat_id"] = "chat-2"
    assert call_filter(server, "inlet", other, owui_user("u-bob"))[1]["model"] == MODEL
    assert call_filter(server, "inlet", task, owui_user())[1]["model"] == MODEL
    # bob's limit raised, his next turn is admitted: his tasks are his own again
    gw.limit(Scope.USER, "u-bob", Metric.TOKENS, "day", 10_000)
    status, admitted = call_filter(server, "inlet", inlet_body(ui=True), owui_user("u-bob"))
    assert status == 200 and admitted["model"] == MODEL
    assert call_filter(server, "inlet", task, owui_user("u-bob"))[1]["model"] == MODEL


async def test_the_pipe_itself_is_not_counted(server: PipelinesServer, gw: RunningGateway) -> None:
    body = {**inlet_body(ui=True), "model": PIPE}
    status, sent = call_filter(server, "inlet", body, owui_user("u-bob"))
    assert status == 200 and sent == body
    assert await gw.pending() == 0


async def test_quotagate_down_fail_closed_is_said_by_the_pipe_too(
    pipes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTAGATE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", "qg-x-y")
    monkeypatch.setenv("QUOTAGATE_REFUSAL_MODEL", PIPE)
    with running_pipelines(pipes_dir) as down:
        status, sent = call_filter(down, "inlet", inlet_body(ui=True), owui_user())
        assert status == 200 and sent["model"] == PIPE
        assert "cannot be reached right now" in sent["quotagate_refusal"]
        status, detail = call_filter(down, "inlet", inlet_body(), owui_user())
        assert status == 503 and "cannot be reached" in detail


async def test_without_the_valve_a_web_ui_refusal_stays_an_error(
    gw: RunningGateway, pipes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opt-in: the pipe file alone changes nothing."""
    monkeypatch.setenv("QUOTAGATE_URL", gw.root_url)
    monkeypatch.setenv("QUOTAGATE_SERVICE_KEY", gw.key("openwebui", trusted_openwebui=True))
    with running_pipelines(pipes_dir) as plain:
        status, detail = call_filter(plain, "inlet", inlet_body(ui=True), owui_user("u-bob"))
        assert status == 429 and "your daily token allowance" in detail


def test_the_pipe_file_is_installable_alone(tmp_path: Path) -> None:
    """Loaded as the Pipelines server loads it: no `type` (else it is not listed at all),
    stdlib imports only, a frontmatter without requirements."""
    path = tmp_path / REFUSAL_PIPE_FILE
    path.write_text(refusal_pipe_source())
    pipe = load_module(path)
    assert (pipeline_kind(pipe), pipe.id) == ("pipe", PIPE)
    imported = set()
    for node in ast.walk(ast.parse(refusal_pipe_source())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
    assert imported <= set(sys.stdlib_module_names)
    frontmatter = refusal_pipe_source().split('"""')[1]
    assert "title:" in frontmatter and "requirements:" not in frontmatter


def test_the_cli_prints_the_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["refusal-pipe"]) == 0
    assert capsys.readouterr().out == refusal_pipe_source()
    assert cli(["nonsense"]) == 2
    assert "refusal-pipe" in capsys.readouterr().err
