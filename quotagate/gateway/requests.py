"""Reading an OpenAI request: validate what quotas depend on, leave everything else alone.

Only the fields the gateway needs are checked (model, the prompt, max tokens, n, stream);
every other field is forwarded untouched, so new OpenAI parameters work without a
gateway release. :meth:`Call.upstream_body` changes exactly three things: the completion
limit (set to the clamped budget), ``stream_options.include_usage`` for streams, and the
model name when the channel calls it differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from quotagate.core.errors import InvalidInput
from quotagate.core.limits import ABSURD
from quotagate.core.messages import check_messages
from quotagate.core.tokens import TokenCounter
from quotagate.gateway.errors import ApiError, bad_request

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

#: path suffix upstream, per endpoint (appended to the channel's base URL)
UPSTREAM_PATHS = {
    CHAT: "/chat/completions",
    COMPLETIONS: "/completions",
    EMBEDDINGS: "/embeddings",
}
MAX_CHOICES = 128


@dataclass
class Call:
    endpoint: str
    data: dict[str, Any]
    model: str
    stream: bool = False
    client_usage: bool = False  # the client asked for the usage chunk itself
    limit_fields: tuple[str, ...] = ()  # max_tokens / max_completion_tokens as the client sent
    requested: int | None = None  # per-choice completion limit the client asked for
    choices: int = 1  # completions generated per request (n, best_of)
    messages: list[Any] | None = None
    prompt_tokens: int | None = None

    @property
    def produces_output(self) -> bool:
        return self.endpoint != EMBEDDINGS

    @property
    def want_tokens(self) -> int | None:
        """Completion tokens to reserve: every choice may use the per-choice limit."""
        if self.requested is None:
            return None
        return self.requested * self.choices

    def upstream_body(self, max_tokens: int | None, upstream_model: str) -> bytes:
        data = self.data
        if upstream_model != self.model:
            data["model"] = upstream_model
        if max_tokens is not None:
            for name in self.limit_fields or ("max_tokens",):
                data[name] = max_tokens
        if self.stream:
            options = data.get("stream_options")
            data["stream_options"] = (
                {**options, "include_usage": True}
                if isinstance(options, dict)
                else {"include_usage": True}
            )
        return orjson.dumps(data)


def parse(endpoint: str, raw: bytes, counter: TokenCounter) -> Call:
    """The call in `raw`, or a 400 that names the offending parameter."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request(
            "We could not parse the JSON body of your request. Send a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _missing("model", "a non-empty string")
    call = Call(endpoint, data, model)
    if endpoint == EMBEDDINGS:
        call.prompt_tokens = _input_tokens(data.get("input"), "input", model, counter)
        return call
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream", "invalid_type")
    call.stream = bool(stream)
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", "stream_options")
        call.client_usage = options.get("include_usage") is True
    if endpoint == CHAT:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _missing("messages", "a non-empty array of message objects")
        try:
            check_messages(messages)
        except InvalidInput as exc:
            raise bad_request(str(exc), exc.param, "invalid_type") from None
        call.messages = messages
        # counted here, once: every channel attempt admits with the same count
        call.prompt_tokens = counter.messages(messages, model)
        fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    else:
        call.prompt_tokens = _input_tokens(data.get("prompt"), "prompt", model, counter)
        fields = ("max_tokens",)
    limits = {}
    for name in fields:
        value = data.get(name)
        if value is not None:
            limits[name] = _positive(value, name)
    if limits:
        call.limit_fields = tuple(limits)
        call.requested = min(limits.values())
    choices = 1
    for name in ("n", "best_of"):
        value = data.get(name)
        if value is not None:
            count = _positive(value, name)
            if count > MAX_CHOICES:
                raise bad_request(f"'{name}' must be at most {MAX_CHOICES}.", name)
            choices = max(choices, count)
    call.choices = choices
    return call


def _missing(name: str, what: str) -> ApiError:
    return bad_request(f"'{name}' is required and must be {what}.", name, "invalid_value")


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}.", name, "invalid_type")
    if value < 1 or value > ABSURD:
        raise bad_request(f"'{name}' must be a positive integer, got {value}.", name)
    return value


def _input_tokens(value: Any, name: str, model: str, counter: TokenCounter) -> int:
    """Tokens of a prompt or embeddings input: text, texts, token ids, or lists of ids."""
    if isinstance(value, str):
        return counter.text(value, model)
    if isinstance(value, list) and value:
        total = 0
        for item in value:
            if isinstance(item, str):
                total += counter.text(item, model)
            elif isinstance(item, int) and not isinstance(item, bool):
                total += 1
            elif isinstance(item, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in item
            ):
                total += len(item)
            else:
                raise bad_request(
                    f"'{name}' must be a string, an array of strings, or token arrays.",
                    name,
                    "invalid_type",
                )
        return total
    raise _missing(name, "a string, an array of strings, or token arrays")
