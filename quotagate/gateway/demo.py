"""A deterministic OpenAI-compatible upstream, written as a bare ASGI app.

Why it exists: `quotagate serve` needs a model to talk to on a fresh machine (so the README's
first command shows quotas working), the tests need an upstream whose answers and failures they
control, and the benchmark needs an upstream that costs as little as possible so the gateway's own
cost is what gets measured. One app serves all three. It is a plain ASGI callable (no framework,
orjson for bodies) because a framework's routing and request objects would show up in the
benchmark's "direct" baseline.

Endpoints (matched on the path's ending, so it also works mounted under a prefix such as
``/demo/v1``): ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming and not),
``POST /v1/completions`` (streaming and not), ``POST /v1/embeddings``.

The counting rule (tests assert it, keep it stable):

* **Completion**: the reply is ``n`` words taken in order from :data:`REPLY_WORDS` (cycled),
  joined by single spaces, where ``n = min(max_tokens, settings.default_tokens)``;
  ``max_completion_tokens`` is honoured when ``max_tokens`` is absent; a missing or
  non-integer limit means ``n = settings.default_tokens``. One word is one token, so
  ``usage.completion_tokens == n == len(text.split())``. ``finish_reason`` is ``"length"`` when
  the request's limit cut the reply short (``limit < default_tokens``), else ``"stop"``.
* **Prompt**: ``prompt_tokens`` is the number of whitespace-separated words in every message's
  content (string content, or the ``text`` of ``{"type": "text"}`` parts) **plus 1 per message**.
  For ``/v1/completions`` it is the words of ``prompt`` (a string, or the sum over a list of
  strings; a list of token ids counts its length; no per-message extra). For
  ``/v1/embeddings`` it is the words of ``input`` counted the same way. Then
  ``settings.prompt_tokens_extra`` is added (to imitate a provider whose tokenizer counts more
  than the gateway's estimate).
* ``total_tokens = prompt_tokens + completion_tokens``; ``prompt_tokens_details.cached_tokens``
  is ``min(settings.cached_tokens, prompt_tokens)``.

Streaming follows OpenAI's wire format exactly: one ``data: {json}\\n\\n`` event per chunk, a
first chunk with ``delta: {"role": "assistant", "content": ""}``, one chunk per word, a chunk
with an empty delta and the ``finish_reason``, then — only when the request carried
``stream_options: {"include_usage": true}`` — a chunk with ``"choices": []`` and the usage (every
earlier chunk then carries ``"usage": null``, as OpenAI does), then ``data: [DONE]\\n\\n``.
Non-streaming bodies always carry ``usage`` (unless ``settings.omit_usage``).

Knobs live in :class:`DemoSettings`; tests mutate the instance at run time (attribute writes
are atomic, the server may run in another thread). Every request is recorded in
:attr:`DemoUpstream.requests` (the parsed JSON bodies of POSTs, in arrival order) and
:attr:`DemoUpstream.log` (method, path, headers and body of every request).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REPLY_TEXT = (
    "QuotaGate demo model here: this answer is deterministic, one token per word, "
    "so every quota you set can be checked by counting words."
)
REPLY_WORDS: tuple[str, ...] = tuple(_REPLY_TEXT.split())
"""The words the demo model answers with, in order, cycled when more are needed."""

DEFAULT_MODELS: tuple[str, ...] = ("demo-model", "demo-model-large", "demo-embedding")

EMBEDDING_DIMENSIONS = 8

_SYSTEM_FINGERPRINT = "fp_quotagate_demo"
_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class DemoSettings:
    """Run-time knobs of the demo upstream; tests change them between (or during) requests."""

    default_tokens: int = 20
    """Reply length in words (= tokens) when the request's max_tokens does not cut it shorter."""
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    """What ``GET /v1/models`` lists. Requests for any other model are answered all the same."""
    api_key: str | None = None
    """When set, requests must carry ``Authorization: Bearer <api_key>`` or get 401."""
    fail_status: int | None = None
    """When set, requests are answered with this status and an OpenAI error body, before any
    byte of a normal answer (``/v1/models`` included)."""
    fail_count: int | None = None
    """With ``fail_status``: how many of the next requests fail (decremented on each); ``None``
    means every request fails until ``fail_status`` is cleared."""
    close_after_chunks: int | None = None
    """Streaming only: drop the TCP connection after sending this many ``data:`` events
    (no ``[DONE]``, no terminating chunk)."""
    omit_usage: bool = False
    """Never report usage: no usage chunk even when asked, no ``usage`` in non-stream bodies."""
    chunk_delay: float = 0.0
    """Seconds to wait before each streamed event after the first."""
    first_byte_delay: float = 0.0
    """Seconds to wait before answering anything (stream or not)."""
    prompt_tokens_extra: int = 0
    """Added to the reported prompt_tokens (a provider whose tokenizer counts more)."""
    cached_tokens: int = 0
    """Reported as ``usage.prompt_tokens_details.cached_tokens`` (capped at prompt_tokens)."""


@dataclass
class RecordedRequest:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class _AbortConnection(Exception):
    """Raised inside the app to end a stream without completing it."""


def count_words(value: Any) -> int:
    """Words in a string, in the text parts of a content list, or ids in a token list."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        total = 0
        for item in value:
            if isinstance(item, dict):
                if item.get("type", "text") == "text":
                    total += count_words(item.get("text"))
            else:
                total += count_words(item)
        return total
    return 0


def chat_prompt_tokens(messages: Any) -> int:
    """Words in every message's content plus one per message (see the module docstring)."""
    if not isinstance(messages, list):
        return 0
    return sum(count_words(m.get("content")) + 1 if isinstance(m, dict) else 1 for m in messages)


def reply_length(body: dict[str, Any], default_tokens: int) -> tuple[int, str]:
    """How many words to answer with, and the finish_reason that goes with it."""
    limit = body.get("max_tokens")
    if limit is None:
        limit = body.get("max_completion_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        if limit < default_tokens:
            return limit, "length"
        return default_tokens, "stop"
    return default_tokens, "stop"


def reply_words(n: int) -> list[str]:
    """The first ``n`` words of the demo answer."""
    k = len(REPLY_WORDS)
    return [REPLY_WORDS[i % k] for i in range(n)]


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """An OpenAI usage object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def embedding_vector(text: str, dims: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit-ish vector derived from the text's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i] - 127.5) / 127.5, 6) for i in range(dims)]


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class DemoUpstream:
    """The ASGI app. ``DemoUpstream()`` is ready to serve; see the module docstring."""

    def __init__(self, settings: DemoSettings | None = None) -> None:
        self.settings = settings if settings is not None else DemoSettings()
        self.requests: list[Any] = []
        self.log: list[RecordedRequest] = []

    def reset(self) -> None:
        """Back to default knobs (same settings object, mutated) and an empty record."""
        fresh = DemoSettings()
        for name in fresh.__dataclass_fields__:
            setattr(self.settings, name, getattr(fresh, name))
        self.requests.clear()
        self.log.clear()

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        try:
            await self._http(scope, receive, send)
        except _AbortConnection:
            # Returning with the response unfinished makes the server drop the connection,
            # which is what a provider crashing mid-stream looks like to the gateway.
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"].rstrip("/")
        raw = await _read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                bad_json = True
        self.log.append(RecordedRequest(method, path, headers, body))
        if method == "POST":
            self.requests.append(body)

        s = self.settings
        if s.first_byte_delay > 0:
            await asyncio.sleep(s.first_byte_delay)
        if s.api_key is not None and headers.get("authorization") != f"Bearer {s.api_key}":
            await _send_error(send, 401, "Incorrect API key provided to the demo upstream.")
            return
        if s.fail_status is not None and (s.fail_count is None or s.fail_count > 0):
            if s.fail_count is not None:
                s.fail_count -= 1
            await _send_error(send, s.fail_status, f"Demo upstream failing with {s.fail_status}.")
            return

        if method == "GET" and path.endswith("/models"):
            await self._models(send)
            return
        if method != "POST":
            await _send_error(send, 404, f"No route {method} {path}.")
            return
        if bad_json or not isinstance(body, dict):
            await _send_error(send, 400, "Request body must be a JSON object.")
            return
        if path.endswith("/chat/completions"):
            await self._completion(body, send, chat=True)
        elif path.endswith("/completions"):
            await self._completion(body, send, chat=False)
        elif path.endswith("/embeddings"):
            await self._embeddings(body, send)
        else:
            await _send_error(send, 404, f"No route {method} {path}.")

    # -- endpoints ------------------------------------------------------------------------------

    async def _models(self, send: Send) -> None:
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "quotagate-demo"}
            for m in self.settings.models
        ]
        await _send_json(send, 200, {"object": "list", "data": data})

    async def _completion(self, body: dict[str, Any], send: Send, *, chat: bool) -> None:
        s = self.settings
        model = str(body.get("model") or "demo-model")
        if chat:
            if not isinstance(body.get("messages"), list):
                await _send_error(send, 400, "'messages' must be a list.")
                return
            prompt = chat_prompt_tokens(body["messages"])
        else:
            prompt = count_words(body.get("prompt"))
        prompt += s.prompt_tokens_extra
        n, finish = reply_length(body, s.default_tokens)
        words = reply_words(n)
        usage = usage_dict(prompt, n, s.cached_tokens)
        created = int(time.time())
        prefix = "chatcmpl-" if chat else "cmpl-"
        ident = prefix + uuid.uuid4().hex[:24]

        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            await self._stream(
                ident, created, model, words, finish, usage, include_usage, chat, send
            )
            return

        text = " ".join(words)
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": _SYSTEM_FINGERPRINT,
            "choices": [choice],
        }
        if not s.omit_usage:
            out["usage"] = usage
        await _send_json(send, 200, out)

    async def _stream(
        self,
        ident: str,
        created: int,
        model: str,
        words: list[str],
        finish: str,
        usage: dict[str, Any],
        include_usage: bool,
        chat: bool,
        send: Send,
    ) -> None:
        s = self.settings
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_field = include_usage and not s.omit_usage

        def chunk(delta: dict[str, Any] | str, finish_reason: str | None) -> bytes:
            choice: dict[str, Any]
            if chat:
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            else:
                choice = {
                    "index": 0,
                    "text": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            c: dict[str, Any] = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "system_fingerprint": _SYSTEM_FINGERPRINT,
                "choices": [choice],
            }
            if usage_field:
                c["usage"] = None
            return b"data: " + orjson.dumps(c) + b"\n\n"

        events: list[bytes] = []
        if chat:
            events.append(chunk({"role": "assistant", "content": ""}, None))
        for i, w in enumerate(words):
            piece = w if i == 0 else " " + w
            events.append(chunk({"content": piece} if chat else piece, None))
        events.append(chunk({} if chat else "", finish))
        if usage_field:
            last = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "system_fingerprint": _SYSTEM_FINGERPRINT,
                "choices": [],
                "usage": usage,
            }
            events.append(b"data: " + orjson.dumps(last) + b"\n\n")
        events.append(b"data: [DONE]\n\n")

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        close_after = s.close_after_chunks
        for i, event in enumerate(events):
            if close_after is not None and i >= close_after:
                raise _AbortConnection
            if i and s.chunk_delay > 0:
                await asyncio.sleep(s.chunk_delay)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _embeddings(self, body: dict[str, Any], send: Send) -> None:
        s = self.settings
        raw_input = body.get("input")
        items: list[Any] = raw_input if isinstance(raw_input, list) else [raw_input]
        if raw_input and isinstance(raw_input, list) and all(isinstance(v, int) for v in raw_input):
            items = [raw_input]  # one input given as token ids
        as_base64 = body.get("encoding_format") == "base64"
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else EMBEDDING_DIMENSIONS
        data = []
        for i, item in enumerate(items):
            vec = embedding_vector(orjson.dumps(item).decode(), dims)
            emb: Any = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_base64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt = count_words(raw_input) + s.prompt_tokens_extra
        out: dict[str, Any] = {
            "object": "list",
            "data": data,
            "model": str(body.get("model") or "demo-embedding"),
        }
        if not s.omit_usage:
            out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        await _send_json(send, 200, out)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _AbortConnection
        part = message.get("body", b"")
        size += len(part)
        if size > _MAX_BODY_BYTES:
            raise _AbortConnection
        chunks.append(part)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, payload: Any) -> None:
    data = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_error(send: Send, status: int, message: str) -> None:
    type_, code = _STATUS_ERRORS.get(status, ("server_error", "upstream_error"))
    data = _error_body(message, type_, code)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


def create_app(settings: DemoSettings | None = None) -> DemoUpstream:
    """A demo upstream app (fresh record, the given or default knobs)."""
    return DemoUpstream(settings)


app = DemoUpstream()
"""Module-level instance for ``uvicorn quotagate.gateway.demo:app`` / granian."""
