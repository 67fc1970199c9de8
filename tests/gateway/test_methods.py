"""Every route answers a method it does not serve with 405 and the `Allow` header HTTP
requires (HEAD and OPTIONS included); GET routes answer HEAD like GET, without the body."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.harness import RunningGateway
from tests.support.upstream import RunningUpstream

POST_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/quota/admit",
    "/v1/quota/settle",
    "/v1/quota/cancel",
]
GET_ROUTES = [
    "/v1/models",
    "/v1/models/demo-model",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/quota/status",
    "/v1/quota/openapi.json",
]


def call(gw: RunningGateway, method: str, path: str, key: str) -> httpx.Response:
    return gw.http.request(method, gw.root_url + path, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "GET", "PUT", "DELETE", "PATCH"])
def test_post_routes_name_post_in_allow(gw: RunningGateway, method: str) -> None:
    key = gw.key("alice")
    for path in POST_ROUTES:
        response = call(gw, method, path, key)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == "POST", (method, path)
        if method != "HEAD":
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and method in error["message"]


@pytest.mark.parametrize("method", ["OPTIONS", "POST", "PUT", "DELETE", "PATCH"])
def test_get_routes_name_get_and_head_in_allow(
    gw: RunningGateway, upstream: RunningUpstream, method: str
) -> None:
    key = gw.key("alice")
    for path in GET_ROUTES:
        response = call(gw, method, path, key)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == "GET, HEAD", (method, path)
        assert method in response.json()["error"]["message"]
    assert upstream.requests == []


def test_head_on_a_get_route_answers_as_get_without_a_body(gw: RunningGateway) -> None:
    key = gw.key("alice")
    for path in ("/healthz", "/v1/models"):
        got = call(gw, "GET", path, key)
        head = call(gw, "HEAD", path, key)
        assert head.status_code == got.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
