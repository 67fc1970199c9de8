"""The engine over HTTP, for the Open WebUI filters: ``/v1/quota/admit|settle|cancel|renew|status``.

A Filter Function runs inside Open WebUI and a Pipelines filter inside the Pipelines
server; neither may hold quota state (one Open WebUI has many workers and replicas), so
they ask the engine, here, mounted in the gateway app. JSON in, JSON out:

* ``POST /v1/quota/admit`` — reserve for one chat: who (Open WebUI's user id, email, name,
  role, groups), which model, the messages (or a prompt, or counted prompt tokens) and
  ``max_tokens``. 200: a ticket and the completion budget the caller must clamp to.
  429: the refusal (which limit, used, amount, remaining, when it resets, a message).
* ``POST /v1/quota/settle`` — charge a ticket with the usage the upstream reported, or
  with the text that was streamed when no usage came (QuotaGate counts it). Idempotent:
  settling a ticket again answers the first settlement and charges nothing more.
* ``POST /v1/quota/cancel`` — release a ticket that produced nothing.
* ``POST /v1/quota/renew`` — extend a pending ticket's lease to a full ``lease_seconds``
  from now. The ticket's holder is in another process (Open WebUI), so only it knows the
  chat is still running: a ticket nobody renews is swept when its lease runs out. The
  Filter Function renews from its stream hook; a Pipelines filter has no such hook, so
  its chats must end within the lease.
* ``GET /v1/quota/status?user=ID`` — every limit that binds the user.
* ``GET /v1/quota/openapi.json`` — this API as an OpenAPI 3.1 document.

Authentication: ``Authorization: Bearer <key>`` with a QuotaGate API key created with
``--trusted-openwebui`` — the same kind of key gateway mode uses, one per Open WebUI
instance, revocable with ``quotagate keys revoke``. Such a key may act for any person, so
it must be as secret as the database; ordinary keys get 403. Limits on the key apply on
top of each person's (a cap for the whole Open WebUI instance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quotagate.core.errors import (
    InvalidInput,
    QuotaExceeded,
    Refusal,
    StoreUnavailable,
    UnknownModel,
    UnknownTicket,
)
from quotagate.core.pricing import Usage
from quotagate.core.text import printable
from quotagate.engine import AdmitContext, Engine, LimitStatus, Ticket
from quotagate.gateway.asgi import Receive, Scope, Send, header_map, read_body, respond
from quotagate.gateway.auth import Authenticator
from quotagate.gateway.errors import (
    ApiError,
    bad_request,
    check_method,
    not_found,
    store_unavailable,
)
from quotagate.gateway.openwebui import OpenWebUIUsers, Person, check_user_id, clean_groups
from quotagate.gateway.ratelimit import refusal_error
from quotagate.store.base import UsageEvent
from quotagate.store.catalog import ApiKey

log = logging.getLogger("quotagate.gateway")

QUOTA_PREFIX = "/v1/quota/"
M = TypeVar("M", bound=BaseModel)


# -- the documents --------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class UserIn(_In):
    """The Open WebUI user a request is for (``__user__`` of a filter)."""

    id: str = Field(min_length=1, max_length=255, description="Open WebUI's user id")
    email: str | None = Field(None, max_length=320)
    name: str | None = Field(None, max_length=255)
    role: str | None = Field(None, description="Open WebUI role: admin, user or pending")
    groups: list[str] | None = Field(
        None,
        description="Open WebUI group names; with openwebui_groups=sync they replace "
        "the user's QuotaGate groups (omit to leave them alone)",
    )


class AdmitIn(_In):
    user: UserIn
    model: str = Field(min_length=1, max_length=255)
    messages: list[Any] | None = Field(
        None, description="OpenAI chat messages (checked as OpenAI checks them)"
    )
    prompt: str | None = Field(None, description="a prompt text instead of messages")
    prompt_tokens: int | None = Field(None, ge=0, description="prompt tokens already counted")
    max_tokens: int | None = Field(
        None, ge=1, description="completion tokens asked for (default_max_tokens if absent)"
    )
    stream: bool = False
    status: bool = Field(False, description="also answer the user's limits before this request")


class SettleIn(_In):
    ticket: str = Field(min_length=1, max_length=64)
    usage: dict[str, Any] | None = Field(
        None, description="the upstream's usage object (OpenAI or Anthropic names)"
    )
    completion_text: str | None = Field(
        None, description="when no usage came: the text that was generated, counted here"
    )
    status: bool = Field(False, description="also answer the user's limits after settling")


class CancelIn(_In):
    ticket: str = Field(min_length=1, max_length=64)


class RenewIn(_In):
    ticket: str = Field(min_length=1, max_length=64)


class LimitOut(BaseModel):
    label: str
    metric: str = Field(description="tokens, input_tokens, output_tokens, credits or requests")
    window: str = Field(description="e.g. day, month, rolling 5h, lifetime")
    window_kind: str = Field(description="minute, hour, day, week, month, rolling or lifetime")
    timezone: str
    amount: int | None = Field(description="null: unlimited")
    used: int
    reserved: int = Field(description="held by requests in flight")
    remaining: int | None
    resets_at: str | None = Field(description="ISO 8601 in the limit's timezone; null: never")


class AdmitOut(BaseModel):
    ticket: str
    user: str
    role: str
    model: str
    max_tokens: int = Field(description="the completion budget: send at most this upstream")
    requested_max_tokens: int
    clamped: bool
    prompt_tokens: int = Field(description="QuotaGate's count of the prompt")
    expires_at: str = Field(description="when an unsettled ticket is swept (lease)")
    limits: list[LimitOut] | None = None


class SettleOut(BaseModel):
    ticket: str
    user: str
    model: str
    status: str = Field(description="settled, or expired/released if the lease ran out first")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    credits: int = Field(description="micro-credits charged")
    estimated: bool = Field(description="counted by QuotaGate, not reported by the upstream")
    excess: int
    limits: list[LimitOut] | None = None


class CancelOut(BaseModel):
    ticket: str
    cancelled: bool = Field(description="false if the ticket was not pending")


class RenewOut(BaseModel):
    ticket: str
    renewed: bool = Field(description="false if the ticket was not pending (settled, swept)")
    expires_at: str | None = Field(description="the lease's new end; null if not renewed")


class StatusOut(BaseModel):
    user: str
    known: bool
    limits: list[LimitOut]


class RefusalOut(BaseModel):
    limit: str
    metric: str
    window: str
    timezone: str
    amount: int
    used: int = Field(description="used plus held by requests in flight")
    requested: int = Field(
        description="the least the request needs left: its prompt plus min_output_tokens"
    )
    remaining: int
    resets_at: str | None = Field(
        description="ISO 8601 in `timezone`: when the limit resets or, for a rolling "
        "window, when this request fits again; null: never"
    )
    scope: str | None
    message: str = Field(description="the refusal in words, for the person asking")


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorOut(BaseModel):
    error: ErrorDetail
    refusal: RefusalOut | None = None


# -- the app --------------------------------------------------------------------------------


class QuotaApi:
    """Serves ``/v1/quota/*`` inside the gateway app."""

    def __init__(
        self,
        engine: Engine,
        auth: Authenticator,
        users: OpenWebUIUsers,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.auth = auth
        self.users = users
        self.clock = clock
        self._openapi: bytes | None = None

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, entry: dict[str, Any]
    ) -> int:
        path: str = scope["path"]
        method: str = scope["method"]
        name = path[len(QUOTA_PREFIX) :]
        if name == "openapi.json":
            check_method(method, path, "GET")
            if self._openapi is None:
                self._openapi = orjson.dumps(openapi())
            await respond(send, 200, self._openapi)
            return 200
        routes = {
            "admit": "POST",
            "settle": "POST",
            "cancel": "POST",
            "renew": "POST",
            "status": "GET",
        }
        if name not in routes:
            raise not_found(path)
        check_method(method, path, routes[name])
        headers = header_map(scope)
        key = self._key(headers)
        entry["key"] = key.id
        try:
            if name == "status":
                out: BaseModel = await self._status(scope, entry)
            else:
                raw = await read_body(receive, headers, self.engine.settings.max_body_bytes)
                if name == "admit":
                    out = await self._admit(_parse(AdmitIn, raw), key, entry)
                elif name == "settle":
                    out = await self._settle(_parse(SettleIn, raw), key, entry)
                elif name == "renew":
                    out = await self._renew(_parse(RenewIn, raw), key)
                else:
                    out = await self._cancel(_parse(CancelIn, raw), key)
        except QuotaExceeded as exc:
            return await self._refuse(send, exc.refusal, entry)
        except InvalidInput as exc:
            raise bad_request(str(exc), exc.param) from None
        except UnknownModel as exc:
            raise ApiError(404, str(exc), "invalid_request_error", "model_not_priced") from None
        except UnknownTicket as exc:
            raise ApiError(404, str(exc), "invalid_request_error", "unknown_ticket") from None
        except StoreUnavailable as exc:
            raise store_unavailable(exc, self.engine.settings.store_timeout) from None
        await respond(send, 200, out.model_dump_json().encode())
        return 200

    def _key(self, headers: dict[bytes, bytes]) -> ApiKey:
        key = self.auth.key(headers)
        if not key.trusted_openwebui:
            raise ApiError(
                403,
                "This API key may not use the quota API: it needs a key created with "
                "`quotagate keys create --user openwebui --trusted-openwebui`.",
                "permission_error",
                "key_not_trusted",
            )
        return key

    # -- endpoints ----------------------------------------------------------------------
    async def _admit(self, req: AdmitIn, key: ApiKey, entry: dict[str, Any]) -> AdmitOut:
        user_id = check_user_id(req.user.id, "user.id")
        entry["user"] = user_id
        entry["model"] = req.model
        if not key.allows(req.model):
            raise ApiError(
                403,
                f"This API key may not use the model `{req.model}`.",
                "permission_error",
                "model_not_allowed",
                "model",
            )
        person = Person(
            user_id,
            req.user.role,
            printable(req.user.email) if req.user.email else None,
            printable(req.user.name) if req.user.name else None,
            clean_groups(req.user.groups) if req.user.groups is not None else None,
        )
        now = self.clock()
        context = AdmitContext(
            user=user_id,
            model=req.model,
            messages=req.messages,
            prompt=req.prompt,
            prompt_tokens=req.prompt_tokens,
            max_tokens=req.max_tokens,
            key_id=key.id,
        )
        # a request refused as invalid must not create or update the user: check it first
        context.prompt_tokens = self.engine.check(context, now=now)
        context.role = role = await self.users.sync(person)
        before = await self._limits(user_id, now) if req.status else None
        ticket = await self.engine.admit(context, now=now)
        return AdmitOut(
            ticket=ticket.id,
            user=user_id,
            role=role,
            model=req.model,
            max_tokens=ticket.max_tokens,
            requested_max_tokens=ticket.requested_max_tokens,
            clamped=ticket.clamped,
            prompt_tokens=ticket.prompt_tokens,
            expires_at=_iso(datetime.fromtimestamp(ticket.expires_at, now.tzinfo)) or "",
            limits=before,
        )

    async def _settle(self, req: SettleIn, key: ApiKey, entry: dict[str, Any]) -> SettleOut:
        if req.usage is None and req.completion_text is None:
            raise bad_request("Give the upstream's 'usage' or the 'completion_text'.", "usage")
        ticket = await self._pending(req.ticket, key)
        now = self.clock()
        if ticket is None:
            # not pending: settled already (answer that settlement) or never issued (404)
            event = await self.engine.settle(req.ticket, Usage(), now=now)
        elif req.usage is not None:
            usage = dict(req.usage)
            if "prompt_tokens" not in usage and "input_tokens" not in usage:
                usage["prompt_tokens"] = ticket.prompt_tokens
            event = await self.engine.settle(ticket, usage, now=now)
        else:
            counted = self.engine.counter.text(req.completion_text or "", ticket.model)
            event = await self.engine.settle(
                ticket, Usage(ticket.prompt_tokens, counted), now=now, estimated=True
            )
        entry["user"] = event.user_id
        entry["model"] = event.model
        entry["prompt_tokens"] = event.prompt_tokens
        entry["completion_tokens"] = event.completion_tokens
        limits = await self._limits(event.user_id, now) if req.status else None
        return _settled(event, limits)

    async def _cancel(self, req: CancelIn, key: ApiKey) -> CancelOut:
        ticket = await self._pending(req.ticket, key)
        cancelled = ticket is not None and await self.engine.cancel(ticket)
        return CancelOut(ticket=req.ticket, cancelled=cancelled)

    async def _renew(self, req: RenewIn, key: ApiKey) -> RenewOut:
        ticket = await self._pending(req.ticket, key)
        now = self.clock()
        renewed = ticket is not None and bool(await self.engine.renew([ticket.id], now=now))
        ends = now.timestamp() + self.engine.settings.lease_seconds
        expires = _iso(datetime.fromtimestamp(ends, now.tzinfo)) if renewed else None
        return RenewOut(ticket=req.ticket, renewed=renewed, expires_at=expires)

    async def _status(self, scope: Scope, entry: dict[str, Any]) -> StatusOut:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        users = query.get("user") or []
        if len(users) != 1:
            raise bad_request("Name exactly one user: /v1/quota/status?user=ID", "user")
        user_id = check_user_id(users[0], "user")
        entry["user"] = user_id
        known = self.engine.catalog.user(user_id) is not None
        return StatusOut(
            user=user_id, known=known, limits=await self._limits(user_id, self.clock())
        )

    # -- helpers ------------------------------------------------------------------------
    async def _pending(self, ticket_id: str, key: ApiKey) -> Ticket | None:
        """The pending ticket, refusing one admitted through another key; None if not pending."""
        stored = await self.engine.store.ticket(ticket_id)
        if stored is None:
            return None
        ticket = Ticket.model_validate_json(stored.payload)
        if ticket.key_id != key.id:
            raise ApiError(
                403,
                "This ticket was admitted through another key.",
                "permission_error",
                "ticket_of_other_key",
            )
        return ticket.filled(stored.max_output, [amount for _, amount in stored.held])

    async def _limits(self, user_id: str, now: datetime) -> list[LimitOut]:
        return [_limit(s) for s in await self.engine.status(user_id, now=now)]

    async def _refuse(self, send: Send, refusal: Refusal, entry: dict[str, Any]) -> int:
        now = self.clock()
        error = refusal_error(refusal, now)
        entry["reason"] = error.reason
        body = ErrorOut(
            error=ErrorDetail(
                message=error.message, type=error.type, code=error.code, param=error.param
            ),
            refusal=RefusalOut(
                limit=refusal.limit,
                metric=refusal.metric,
                window=refusal.window,
                timezone=refusal.timezone,
                amount=refusal.amount,
                used=refusal.used + refusal.reserved,
                requested=refusal.requested,
                remaining=refusal.remaining,
                resets_at=_iso(refusal.resets_at, refusal.timezone),
                scope=refusal.scope,
                message=error.message,
            ),
        )
        await respond(send, 429, body.model_dump_json().encode(), error.headers)
        return 429


def _parse(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise bad_request(f"Invalid request: {message}.", where) from None


def _iso(moment: datetime | None, timezone: str | None = None) -> str | None:
    if moment is None:
        return None
    if timezone:
        moment = moment.astimezone(ZoneInfo(timezone))
    return moment.isoformat(timespec="seconds")


def _limit(status: LimitStatus) -> LimitOut:
    window = status.window
    return LimitOut(
        label=status.label,
        metric=status.metric.value,
        window=window.describe(),
        window_kind=window.kind,
        timezone=window.tz,
        amount=status.amount,
        used=status.used,
        reserved=status.reserved,
        remaining=status.remaining,
        resets_at=_iso(status.resets_at, window.tz),
    )


def _settled(event: UsageEvent, limits: list[LimitOut] | None) -> SettleOut:
    return SettleOut(
        ticket=event.ticket_id,
        user=event.user_id,
        model=event.model,
        status=event.status,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.total_tokens,
        cached_tokens=event.cached_tokens,
        credits=event.credits,
        estimated=event.estimated,
        excess=event.excess,
        limits=limits,
    )


# -- OpenAPI --------------------------------------------------------------------------------


def openapi() -> dict[str, Any]:
    """The quota API as an OpenAPI 3.1 document (served at /v1/quota/openapi.json)."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": ref(model)}}}

    def answer(model: type[BaseModel], text: str) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {"schema": ref(model)}}}

    errors = {
        "400": answer(ErrorOut, "invalid request"),
        "401": answer(ErrorOut, "no or unknown API key"),
        "403": answer(ErrorOut, "the key is not a trusted Open WebUI key"),
        "503": answer(ErrorOut, "the quota store is unavailable"),
    }
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    paths = {
        "/v1/quota/admit": {
            "post": {
                "summary": "Reserve quota for one model call",
                "description": "Creates the user on first sight (role mapped from Open WebUI's). "
                "Clamp the call's max_tokens to the answer's max_tokens.",
                "security": secured,
                "requestBody": body(AdmitIn),
                "responses": {
                    "200": answer(AdmitOut, "admitted: a ticket"),
                    "429": answer(ErrorOut, "refused: the refusal names the limit"),
                    "404": answer(
                        ErrorOut, "the model has no price and unpriced models are refused"
                    ),
                    **errors,
                },
            }
        },
        "/v1/quota/settle": {
            "post": {
                "summary": "Charge a ticket with the real usage (idempotent)",
                "security": secured,
                "requestBody": body(SettleIn),
                "responses": {
                    "200": answer(SettleOut, "settled (or the earlier settlement)"),
                    "404": answer(ErrorOut, "no such ticket (never issued, or cancelled)"),
                    **errors,
                },
            }
        },
        "/v1/quota/cancel": {
            "post": {
                "summary": "Release a ticket that produced nothing",
                "security": secured,
                "requestBody": body(CancelIn),
                "responses": {"200": answer(CancelOut, "released, or was not pending"), **errors},
            }
        },
        "/v1/quota/renew": {
            "post": {
                "summary": "Extend a pending ticket's lease while its call still runs",
                "description": "A ticket nobody renews is swept when its lease runs out; "
                "renew it about every third of the lease while the model call runs.",
                "security": secured,
                "requestBody": body(RenewIn),
                "responses": {"200": answer(RenewOut, "renewed, or was not pending"), **errors},
            }
        },
        "/v1/quota/status": {
            "get": {
                "summary": "Every limit that binds a user",
                "security": secured,
                "parameters": [
                    {"name": "user", "in": "query", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": answer(StatusOut, "the user's limits"), **errors},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "QuotaGate quota API",
            "version": "1",
            "description": "What the Open WebUI filters call: admit before a model call, "
            "settle after it. Authenticate with a key created with --trusted-openwebui.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
