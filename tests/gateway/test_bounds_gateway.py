"""Hostile input at the HTTP doors — the OpenAI-compatible gateway and the quota API — over
real HTTP: malformed messages, absurd usage from an upstream, a 4 MB model name, user ids
with control characters. Each gets a precise OpenAI-style error (never a 500), and the
ledger, the counters and the catalog stay as they were.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from quotagate.core.limits import Metric, Scope
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.gateway.test_errors import CHAT, assert_untouched, error_of, post
from tests.support.bounds_upstream import AbsurdUpstream, absurd_upstream
from tests.support.upstream import RunningUpstream

TOOL_CALL_AS_TEXT = {"role": "assistant", "content": "x", "tool_calls": [{"function": "abc"}]}
MALFORMED: list[tuple[list[Any], str]] = [
    ([TOOL_CALL_AS_TEXT], "messages[0].tool_calls[0].function"),
    (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{}]}],
        "messages[1].tool_calls[0].function",
    ),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content"),
    (["hi"], "messages[0]"),
]


@pytest.fixture
def quiet(gw: RunningGateway) -> Iterator[RunningGateway]:
    gw.limit("everyone", "*", "tokens", "day", 1_000)
    yield gw


def catalog_state(gw: RunningGateway) -> tuple[Any, ...]:
    users = [(u.id, u.role, u.groups, u.email, u.name) for u in gw.engine.catalog.users()]
    return users, gw.engine.catalog.version()


# -- 2.5 malformed messages ----------------------------------------------------------------


async def test_a_tool_call_that_is_not_an_object_is_400_from_the_sdk(
    quiet: RunningGateway, upstream: RunningUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        quiet.client(quiet.key("alice")).chat.completions.create(
            model="demo-model",
            messages=[TOOL_CALL_AS_TEXT],  # type: ignore[list-item]
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "messages[0].tool_calls[0].function"
    await assert_untouched(quiet, upstream)


@pytest.mark.parametrize(("messages", "param"), MALFORMED)
async def test_malformed_messages_are_400_with_the_field_named(
    quiet: RunningGateway, upstream: RunningUpstream, messages: list[Any], param: str
) -> None:
    response = post(quiet, quiet.key("alice"), {**CHAT, "messages": messages})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]
    await assert_untouched(quiet, upstream)


def quota_api(gw: RunningGateway) -> tuple[str, httpx.Client]:
    return gw.key("openwebui", trusted_openwebui=True), gw.http


def admit(gw: RunningGateway, key: str, user: dict[str, Any], **body: Any) -> httpx.Response:
    return gw.http.post(
        f"{gw.root_url}/v1/quota/admit",
        json={"user": user, "model": "demo-model", "max_tokens": 10, **body},
        headers={"Authorization": f"Bearer {key}"},
    )


@pytest.mark.parametrize(("messages", "param"), MALFORMED)
async def test_the_quota_api_refuses_the_same_messages_and_changes_no_user(
    quiet: RunningGateway, upstream: RunningUpstream, messages: list[Any], param: str
) -> None:
    key, _ = quota_api(quiet)
    known = {"id": "u-known", "email": "old@example.com", "role": "user"}
    assert admit(quiet, key, known, messages=[{"role": "user", "content": "hi"}]).status_code == 200
    before = catalog_state(quiet)
    pending = await quiet.pending()
    for user in ({"id": "u-new", "role": "admin"}, {**known, "email": "new@example.com"}):
        response = admit(quiet, key, user, messages=messages)
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["param"] == param
    assert catalog_state(quiet) == before  # u-new not created, u-known's email unchanged
    assert await quiet.pending() == pending and await quiet.events() == []


# -- 1.8 absurd usage from an upstream --------------------------------------------------------


@pytest.fixture
def absurd() -> Iterator[AbsurdUpstream]:
    with absurd_upstream() as up:
        yield up


@pytest.fixture
def lying(absurd: AbsurdUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    """The gateway in front of an upstream whose usage says 10^15 - 1 tokens each way."""
    with running_gateway(tmp_path, [channel("liar", absurd.base_url, ["demo-model"])]) as gw:
        gw.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        gw.limit(Scope.EVERYONE, "*", Metric.CREDITS, "day", None)  # priced: credits overflow
        yield gw


@pytest.mark.parametrize("stream", [False, True])
async def test_absurd_usage_is_settled_on_the_reservation_and_flagged(
    lying: RunningGateway, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    client = lying.client(lying.key("alice"))
    with caplog.at_level(logging.WARNING, logger="quotagate.gateway"):
        if stream:
            chunks = list(
                client.chat.completions.create(**CHAT, max_tokens=20, stream=True)  # type: ignore[call-overload]
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
        else:
            answer = client.chat.completions.create(**CHAT, max_tokens=20)  # type: ignore[call-overload]
            assert answer.choices[0].message.content == "ok"
    [event] = await lying.settled(1)
    assert (event.status, event.estimated) == ("settled", True)
    assert event.completion_tokens == 20 and 0 < event.prompt_tokens < 100
    assert 0 < event.credits < 10**9
    assert await lying.pending() == 0  # no ticket stuck open
    assert "invalid usage" in caplog.text and event.ticket_id in caplog.text
    # and the gateway goes on: the sweeper has nothing to choke on
    assert await lying.engine.sweep() == []
    assert await lying.engine.reconcile(repair=False) == []


async def test_absurd_usage_settled_through_the_quota_api_is_400_and_charges_nothing(
    gw: RunningGateway,
) -> None:
    key, http = quota_api(gw)
    gw.limit(Scope.EVERYONE, "*", Metric.CREDITS, "day", None)
    admitted = admit(gw, key, {"id": "u-1"}, prompt_tokens=10)
    assert admitted.status_code == 200
    ticket = admitted.json()["ticket"]
    usage = {"prompt_tokens": 10**15 - 1, "completion_tokens": 10**15 - 1}
    response = http.post(
        f"{gw.root_url}/v1/quota/settle",
        json={"ticket": ticket, "usage": usage},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 400 and "absurd" in error_of(response)["message"]
    assert await gw.events() == [] and await gw.pending() == 1  # still settleable
    settled = http.post(
        f"{gw.root_url}/v1/quota/settle",
        json={"ticket": ticket, "usage": {"prompt_tokens": 10, "completion_tokens": 3}},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert settled.status_code == 200 and settled.json()["total_tokens"] == 13


# -- 2.6 what is echoed and logged; control characters in user ids -----------------------


async def test_a_4_mb_model_name_is_neither_echoed_nor_logged_whole(
    quiet: RunningGateway, upstream: RunningUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quotagate.access")
    model = "m" * 4_000_000
    response = post(quiet, quiet.key("alice"), {**CHAT, "model": model})
    assert response.status_code == 404
    assert len(error_of(response)["message"]) < 400
    restricted = quiet.key("bob", models=["demo-model"])
    response = post(quiet, restricted, {**CHAT, "model": model})
    assert response.status_code == 403 and len(error_of(response)["message"]) < 400
    response = quiet.http.get(f"{quiet.base_url}/{'x' * 60_000}")
    assert response.status_code == 404 and len(error_of(response)["message"]) < 400
    lines = [r.getMessage() for r in caplog.records if r.name == "quotagate.access"]
    assert len(lines) == 3 and all(len(line) < 1_000 for line in lines)
    assert json.loads(lines[0])["model"].startswith("mmmm")
    await assert_untouched(quiet, upstream)


FORGED = "u-1\nINFO quotagate.access forged"


async def test_user_ids_with_control_characters_are_refused_at_every_http_door(
    quiet: RunningGateway, upstream: RunningUpstream
) -> None:
    key, http = quota_api(quiet)
    before = catalog_state(quiet)
    # gateway mode: Open WebUI's forwarded header (a tab is the one control character
    # HTTP lets a header value carry)
    response = quiet.http.post(
        f"{quiet.base_url}/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}", "X-OpenWebUI-User-Id": "u-1\tadmin"},
    )
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_user"
    for user_id in (FORGED, "u-1\x1b[2J", "u-1\u2028x", "u-1\x00"):
        response = admit(quiet, key, {"id": user_id}, messages=CHAT["messages"])
        assert response.status_code == 400, user_id
        assert error_of(response)["code"] == "invalid_user"
        status = http.get(
            f"{quiet.root_url}/v1/quota/status",
            params={"user": user_id},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert status.status_code == 400 and error_of(status)["code"] == "invalid_user"
    assert catalog_state(quiet) == before
    await assert_untouched(quiet, upstream)


def test_well_formed_tool_conversations_still_pass(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Berlin"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    answer = gw.client(gw.key("alice")).chat.completions.create(
        model="demo-model",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=5,
    )
    assert answer.choices[0].message.content
    assert upstream.requests[-1]["messages"] == messages


@pytest.mark.parametrize(
    "body",
    [
        {"model": "demo-model", "messages": []},
        {**CHAT, "max_tokens": -1},
        {**CHAT, "messages": [TOOL_CALL_AS_TEXT]},
        {**CHAT, "model": "no-such-model"},
    ],
)
async def test_a_refused_gateway_mode_request_creates_no_user(
    quiet: RunningGateway, upstream: RunningUpstream, body: dict[str, Any]
) -> None:
    """Open WebUI's forwarded headers name a person; a request refused before admission
    must not create that person (or change their email) in the catalog."""
    key, _ = quota_api(quiet)
    before = catalog_state(quiet)
    response = quiet.http.post(
        f"{quiet.base_url}/chat/completions",
        json=body,
        headers={
            "Authorization": f"Bearer {key}",
            "X-OpenWebUI-User-Id": "u-new",
            "X-OpenWebUI-User-Email": "new@example.com",
            "X-OpenWebUI-User-Role": "admin",
        },
    )
    assert response.status_code in (400, 404), response.text
    assert catalog_state(quiet) == before
    await assert_untouched(quiet, upstream)


async def test_display_names_and_emails_lose_their_control_characters(
    gw: RunningGateway,
) -> None:
    """Names and emails only inform (`users list`): kept, but never with a line break."""
    key, http = quota_api(gw)
    response = http.post(
        f"{gw.base_url}/chat/completions",
        json={**CHAT, "max_tokens": 2},
        headers={
            "Authorization": f"Bearer {key}",
            "X-OpenWebUI-User-Id": "u-eve",
            "X-OpenWebUI-User-Name": "Eve%0AINFO forged",  # Open WebUI URL-quotes names
        },
    )
    assert response.status_code == 200, response.text
    person = {"id": "u-mal", "name": "Mal\r\nlory", "email": "mal\n@example.com"}
    assert admit(gw, key, person, messages=CHAT["messages"]).status_code == 200
    users = {u.id: u for u in gw.engine.catalog.users()}
    assert users["u-eve"].name == "EveINFO forged"
    assert (users["u-mal"].name, users["u-mal"].email) == ("Mallory", "mal@example.com")
