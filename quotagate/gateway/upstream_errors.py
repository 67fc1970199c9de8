"""What a client is told when an upstream refuses a call, and what the log keeps of it.

An upstream's error body belongs to the upstream: it may echo the request's headers (one
that echoed ``Authorization`` handed the channel's key to the client), name the provider's
account (OpenAI's rate-limit messages name the organization), or run to megabytes. So no
client gets it as sent. A 4xx the client can act on (a bad request, a context too long) is
rendered again as an OpenAI error carrying only the upstream's message, type, code and
param, capped, with the channel's key and any bearer token scrubbed; the upstream's rate
limit becomes a message of the gateway's own. Refusals that are the operator's business
(the channel's credentials refused, the provider account out of quota or credit, a
model or endpoint the channel is configured for that the provider lacks, a proxy refusing
the gateway) are not 4xx for the client at all: the proxy treats them as a failing
channel (:func:`channel_fault`).
The log gets a scrubbed excerpt of the body (:func:`excerpt`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from quotagate.gateway.errors import error_body

#: the most of an upstream's message a client gets
MESSAGE_CHARS = 1000
#: the most of an upstream's body the log gets
EXCERPT_CHARS = 300

#: a bearer token (RFC 6750 characters; a sentence's full stop after it is not part of it)
_BEARER = re.compile(r"(?i)\bbearer\s+(?!\[redacted\])[\w.~+/=-]*[\w~+/=-]")
_FIELD = re.compile(r"^[\w.\[\]-]{1,100}$")  # a type, code or param worth passing on


def scrub(text: str, secret: str | None) -> str:
    """`text` without the channel's key and without any bearer token."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _BEARER.sub("Bearer [redacted]", text)


def _parse(data: bytes) -> dict[str, Any]:
    """The error object of an OpenAI-style body (``{"error": {...}}``, or the flat shape
    of vLLM and FastAPI servers), else {}."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    error = parsed.get("error", parsed)
    if isinstance(error, str):
        return {"message": error}
    if not isinstance(error, dict):
        return {}
    if "message" not in error and isinstance(error.get("detail"), str):
        return {"message": error["detail"]}
    return error


def channel_fault(status: int, data: bytes) -> str | None:
    """Why this refusal is the channel's, not the client's (the proxy then tries the next
    channel and, if none is left, answers 502), or None."""
    if status in (401, 403):
        return f"refused the gateway's credentials (HTTP {status})"
    if status == 402:  # OpenRouter and others: the provider account has no credit left
        return "has no credit left at the provider (HTTP 402)"
    if status == 404:  # the model or endpoint the channel is configured for, not there
        return "does not serve the configured model or endpoint (HTTP 404)"
    if status == 407:
        return "is behind a proxy that refused the gateway (HTTP 407)"
    if status == 429:
        error = _parse(data)
        if "insufficient_quota" in (error.get("code"), error.get("type")):
            return "has no quota left at the provider (HTTP 429)"
    return None


def client_error(status: int, data: bytes, secret: str | None, origin: str = "") -> bytes:
    """The body a client gets for an upstream's 4xx answer (status `status`); `origin`
    is the upstream's host:port, which its message may echo (its Host header) and no
    client is told."""
    if status == 429:
        return error_body(
            "The upstream provider is rate limiting this gateway; retry shortly.",
            "rate_limit_exceeded",
            "rate_limit_exceeded",
        )
    error = _parse(data)
    message = error.get("message")
    if isinstance(message, str) and message.strip():
        message = scrub(message, secret)
        if origin:
            host = origin.rpartition(":")[0].strip("[]")
            message = message.replace(origin, "[upstream]").replace(host, "[upstream]")
        if len(message) > MESSAGE_CHARS:
            message = message[: MESSAGE_CHARS - 1] + "…"
    else:
        message = f"The upstream refused the request (HTTP {status})."
    fields = []
    for name in ("type", "code", "param"):
        value = error.get(name)
        ok = isinstance(value, str) and _FIELD.match(value) and scrub(value, secret) == value
        fields.append(value if ok else None)
    kind, code, param = fields
    return error_body(message, kind or "invalid_request_error", code, param)


def excerpt(data: bytes, secret: str | None) -> str:
    """The start of an upstream's body for the log: decoded, scrubbed, capped."""
    text = data[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    text = scrub(text, secret)[:EXCERPT_CHARS]
    return " ".join(text.split())
