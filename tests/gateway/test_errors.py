"""Requests the gateway must turn away get OpenAI-shaped errors, reach no upstream, and
leave the ledger and every counter exactly as they were."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}


def post(gw: RunningGateway, key: str | None, body: Any, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return gw.http.post(
            f"{gw.base_url}/chat/completions",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
            timeout=10,
            **extra,
        )
    return gw.http.post(
        f"{gw.base_url}/chat/completions", json=body, headers=headers, timeout=10, **extra
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.fixture
def quiet(gw: RunningGateway, upstream: RunningUpstream) -> Iterator[RunningGateway]:
    """The gateway; after the test, nothing reached the upstream and the ledger is empty."""
    gw.limit("everyone", "*", "tokens", "day", 1_000)
    yield gw


async def assert_untouched(gw: RunningGateway, upstream: RunningUpstream) -> None:
    assert upstream.requests == []
    assert await gw.events() == []
    assert await gw.pending() == 0
    assert all(used == 0 and reserved == 0 for used, reserved in (await gw.counters()).values())


async def test_401_without_or_with_a_wrong_key(
    quiet: RunningGateway, upstream: RunningUpstream
) -> None:
    for key in (None, "qg-nope-nope", "sk-not-ours"):
        response = post(quiet, key, CHAT)
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        quiet.client("qg-abc-wrong").chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await assert_untouched(quiet, upstream)


async def test_revoked_key_stops_working(quiet: RunningGateway, upstream: RunningUpstream) -> None:
    key = quiet.key("alice")
    assert post(quiet, key, {**CHAT, "max_tokens": 1}).status_code == 200
    key_id = key.removeprefix("qg-").split("-")[0]
    assert quiet.engine.catalog.revoke_key(key_id)
    deadline = time.monotonic() + 3
    while post(quiet, key, {**CHAT, "max_tokens": 1}).status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.05)


async def test_403_model_the_key_may_not_use(
    quiet: RunningGateway, upstream: RunningUpstream
) -> None:
    key = quiet.key("alice", models=["demo-model-large"])
    response = post(quiet, key, CHAT)
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        quiet.client(key).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await assert_untouched(quiet, upstream)


async def test_404_unknown_model(quiet: RunningGateway, upstream: RunningUpstream) -> None:
    response = post(quiet, quiet.key("alice"), {**CHAT, "model": "gpt-nonexistent"})
    assert response.status_code == 404
    error = error_of(response)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    await assert_untouched(quiet, upstream)


MALFORMED: list[tuple[Any, str | None]] = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": CHAT["messages"]}, "model"),
    ({"model": "demo-model"}, "messages"),
    ({"model": "demo-model", "messages": []}, "messages"),
    ({"model": "demo-model", "messages": ["hi"]}, "messages[0]"),
    ({**CHAT, "max_tokens": -5}, "max_tokens"),
    ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream_options": []}, "stream_options"),
]


async def test_400_malformed_bodies(quiet: RunningGateway, upstream: RunningUpstream) -> None:
    key = quiet.key("alice")
    for body, param in MALFORMED:
        response = post(quiet, key, body)
        assert response.status_code == 400, body
        error = error_of(response)
        assert error["type"] == "invalid_request_error", body
        assert error["param"] == param, body
    await assert_untouched(quiet, upstream)


async def test_400_from_the_sdk(quiet: RunningGateway, upstream: RunningUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        quiet.client(quiet.key("alice")).chat.completions.create(
            model="demo-model", messages=CHAT["messages"], max_tokens=-1
        )
    assert caught.value.param == "max_tokens"
    await assert_untouched(quiet, upstream)


async def test_413_oversized_bodies(upstream: RunningUpstream, tmp_path: Path) -> None:
    with running_gateway(
        tmp_path, [channel("main", upstream, ["demo-model"])], max_body_bytes=64 * 1024
    ) as gw:
        key = gw.key("alice")
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}
        response = post(gw, key, big)
        assert response.status_code == 413
        assert error_of(response)["code"] == "request_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: caught while reading
            yield b'{"model": "demo-model", "messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"y" * 1024
            yield b'"}]}'

        response = gw.http.post(
            f"{gw.base_url}/chat/completions",
            content=chunked(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 413
        await assert_untouched(gw, upstream)


async def test_unknown_path_and_method(quiet: RunningGateway, upstream: RunningUpstream) -> None:
    key = quiet.key("alice")
    headers = {"Authorization": f"Bearer {key}"}
    response = quiet.http.get(f"{quiet.base_url}/assistants", headers=headers)
    assert response.status_code == 404 and error_of(response)
    response = quiet.http.get(f"{quiet.base_url}/chat/completions", headers=headers)
    assert response.status_code == 405 and error_of(response)
    await assert_untouched(quiet, upstream)
