"""Errors in OpenAI's convention: ``{"error": {"message", "type", "code", "param"}}``.

Clients such as the openai SDK read `type` and `code` to decide what to do (retry on a
rate limit, stop on an invalid key), so every failure the gateway produces itself is one
:class:`ApiError` rendered the same way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import orjson

from quotagate.core.text import shown

log = logging.getLogger("quotagate.gateway")


@dataclass
class ApiError(Exception):
    """A response the gateway answers with instead of calling (or after failing to call) a model."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: label for metrics and access logs (e.g. the limit that refused)
    reason: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "code": code, "param": param}}
    )


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        "invalid_request_error",
        "invalid_api_key",
        headers=[(b"www-authenticate", b'Bearer realm="quotagate"')],
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than the gateway accepts ({limit:,} bytes).",
        "invalid_request_error",
        "request_too_large",
    )


#: what a GET route answers: HEAD too, as HTTP requires (uvicorn sends the headers, no body)
READ_METHODS = ("GET", "HEAD")


def method_error(method: str, path: str, route: str) -> ApiError:
    """405 for a route served by `route` (``"POST"``, or ``"GET"`` with HEAD), with the
    `Allow` header HTTP requires."""
    error = method_not_allowed(method, path)
    allowed = READ_METHODS if route == "GET" else (route,)
    error.headers.append((b"allow", ", ".join(allowed).encode()))
    return error


def check_method(method: str, path: str, route: str) -> None:
    """Refuse (405) any method the route does not serve."""
    if method != route and not (method == "HEAD" and route == "GET"):
        raise method_error(method, path, route)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{shown(model)}` does not exist or no channel serves it.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def model_forbidden(model: str) -> ApiError:
    return ApiError(
        403,
        f"This API key may not use the model `{shown(model)}`.",
        "permission_error",
        "model_not_allowed",
        "model",
    )


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown URL: {shown(path)}", "invalid_request_error", "unknown_url")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(
        405, f"Method {method} is not allowed on {shown(path)}.", "invalid_request_error", None
    )


def store_unavailable(cause: Exception, store_timeout: float) -> ApiError:
    """503 for a request that could not reach the quota store within `store_timeout`
    (another process holds SQLite's write lock, say). Retry-After asks clients to wait
    as long as this one did, so they do not pile on a store that is catching up."""
    log.error("quota store unavailable: %s", cause)
    return ApiError(
        503,
        "The quota store is unavailable; retry shortly.",
        "server_error",
        "store_unavailable",
        headers=[(b"retry-after", b"%d" % max(1, math.ceil(store_timeout)))],
        reason="store",
    )
