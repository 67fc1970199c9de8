"""The gateway as an ASGI application: routes, lifecycle, and the operational endpoints.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` go through
:class:`~quotagate.gateway.proxy.Proxy`; ``GET /v1/models`` lists what the caller's key
may use; ``/healthz`` (the process answers), ``/readyz`` (the database answers) and
``/metrics`` (Prometheus) serve operators. Background work — noticing catalog changes
(keys revoked, channels added), sweeping expired tickets and pruning the counters of
ended windows — runs in one task; the engine's lease keeper (:mod:`quotagate.leases`)
renews the tickets of the requests in flight in another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from quotagate.config import Settings
from quotagate.core.errors import InvalidInput, StoreUnavailable, UnknownModel
from quotagate.core.text import shown_repr
from quotagate.engine import Engine
from quotagate.gateway.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    header_map,
    read_body,
    respond,
    respond_error,
)
from quotagate.gateway.auth import Authenticator
from quotagate.gateway.channels import Channel, demo_channel, load_channels, sync_config_caps
from quotagate.gateway.engine_api import QUOTA_PREFIX, QuotaApi
from quotagate.gateway.errors import (
    READ_METHODS,
    ApiError,
    bad_request,
    check_method,
    method_error,
    model_forbidden,
    model_not_found,
    not_found,
    store_unavailable,
)
from quotagate.gateway.observe import Metrics, log_access
from quotagate.gateway.openwebui import OpenWebUIUsers
from quotagate.gateway.proxy import PIN_HEADER, Outcome, Proxy
from quotagate.gateway.requests import CHAT, COMPLETIONS, EMBEDDINGS, parse
from quotagate.gateway.routing import Router
from quotagate.gateway.upstream import UpstreamClient

log = logging.getLogger("quotagate.gateway")

_MODEL_ROUTES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
}
_GET_ROUTES = frozenset({"/v1/models", "/healthz", "/readyz", "/metrics"})
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


def quota_api_only(path: str) -> ApiError:
    return ApiError(
        404,
        f"This QuotaGate serves only the quota API (quota_api_only), not {path}: "
        "model calls go through Open WebUI's own connections.",
        "invalid_request_error",
        "quota_api_only",
    )


def utc_now() -> datetime:
    return datetime.now(UTC)


class Gateway:
    """The ASGI app. Give it an engine; channels come from the settings and the database
    (or `channels` when given), else the demo upstream at `demo_url`.

    `clock` is the time every quota decision uses (tests move it to the next day instead
    of waiting for it).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings | None = None,
        *,
        channels: Sequence[Channel] | None = None,
        demo_url: str | None = None,
        demo_models: Sequence[str] = (),
        clock: Callable[[], datetime] = utc_now,
        router: Router | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings or engine.settings
        s = self.settings
        self.clock = clock
        self.router = router or Router(
            failures=s.channel_failures, cooldown=s.channel_cooldown_seconds
        )
        self.auth = Authenticator(engine.catalog, s.auth_cache_seconds)
        self.client = UpstreamClient(
            s.upstream_connect_timeout, s.upstream_timeout, s.max_upstream_body_bytes
        )
        self.metrics = Metrics()
        self.proxy = Proxy(engine, self.router, self.client, self.metrics, clock)
        engine.leases.clock = clock  # leases count in the time quota decisions use
        self.openwebui = OpenWebUIUsers(engine, s)
        self.quota_api = QuotaApi(engine, self.auth, self.openwebui, clock)
        self._fixed = list(channels) if channels is not None else None
        self._demo_url = demo_url
        self._demo_models = tuple(demo_models)
        self._version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.started:
            return
        if self._fixed is None:
            sync_config_caps(self.settings, self.engine.catalog)
        self._version = self.engine.catalog.version()
        self.reload()
        self.engine.refresh()
        self._task = asyncio.ensure_future(self._maintain())
        self.engine.leases.start()
        self.started = True

    def reload(self) -> None:
        """Read the channels again (after the catalog changed)."""
        if self._fixed is not None:
            channels = list(self._fixed)
        else:
            channels = load_channels(self.settings, self.engine.catalog)
            if not channels and self._demo_url:
                channels = [demo_channel(self._demo_url, self._demo_models)]
        if not channels and not self.settings.quota_api_only:
            log.warning("no upstream channel is configured: every model call will get 404")
        self.router.set_channels(channels)

    async def stop(self) -> None:
        """Let open streams finish for a while, then settle what they delivered."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        deadline = time.monotonic() + self.settings.graceful_shutdown_seconds
        while self.proxy.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        settled = await self.proxy.settle_open()
        if settled:
            log.warning("settled %d streams still open at shutdown on what they delivered", settled)
        await self.engine.leases.stop()
        await self.client.close()
        self.started = False

    async def _maintain(self) -> None:
        interval = max(0.2, min(self.settings.catalog_refresh_seconds or 1.0, 5.0))
        next_sweep = time.monotonic() + self.settings.sweep_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                version = self.engine.catalog.version()
                if version != self._version:
                    self._version = version
                    self.auth.clear()
                    self.reload()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.sweep_seconds
                    await self.engine.sweep(self.clock())
                    await self.engine.prune(self.clock())
            except StoreUnavailable as exc:  # the requests waiting for it say so too
                log.warning("gateway maintenance waits for the store: %s", exc)
            except Exception:
                log.exception("gateway maintenance failed; retrying")

    # -- ASGI ----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.started:
            await self.start()
        begun = time.perf_counter()
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = _MODEL_ROUTES.get(path)
        entry: dict[str, Any] = {"method": method, "path": path}
        outcome = Outcome()
        try:
            if self.settings.quota_api_only and (endpoint is not None or path == "/v1/models"):
                raise quota_api_only(path)
            if endpoint is not None:
                check_method(method, path, "POST")
                status = await self._model_call(endpoint, scope, receive, send, entry, outcome)
            elif method not in READ_METHODS and (
                path in _GET_ROUTES or path.startswith("/v1/models/")
            ):
                raise method_error(method, path, "GET")
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                status = await self._models(scope, send, entry, path[len("/v1/models/") :])
            elif path == "/healthz":
                status = 200
                await respond(send, 200, b'{"status":"ok"}')
            elif path == "/readyz":
                status = await self._ready(scope, send)
            elif path.startswith(QUOTA_PREFIX):
                status = await self.quota_api.handle(scope, receive, send, entry)
            elif path == "/metrics":
                status = 200
                await respond(send, 200, self.metrics.render(), content_type=_PROMETHEUS)
            else:
                raise not_found(path)
        except ApiError as error:
            status = error.status
            if error.reason:
                entry["reason"] = error.reason
                if status == 429:
                    self.metrics.refused(error.reason)
            await respond_error(send, error)
        except ClientGone:
            status = 499
        except Exception:
            log.exception("unexpected error on %s %s", method, shown_repr(path))
            status = 500
            await respond_error(
                send,
                ApiError(500, "The gateway failed unexpectedly.", "server_error", "internal_error"),
            )
        if endpoint is not None:
            self.metrics.request(endpoint, status)
            entry["channel"] = outcome.channel
            entry["prompt_tokens"] = outcome.prompt_tokens
            entry["completion_tokens"] = outcome.completion_tokens
            if outcome.status:
                entry["stream"] = outcome.status
        entry["status"] = status
        entry["ms"] = round((time.perf_counter() - begun) * 1000, 2)
        log_access(entry)

    async def _model_call(
        self,
        endpoint: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        entry: dict[str, Any],
        outcome: Outcome,
    ) -> int:
        headers = header_map(scope)
        key = self.auth.key(headers)
        entry["key"] = key.id
        raw = await read_body(receive, headers, self.settings.max_body_bytes)
        call = parse(endpoint, raw, self.engine.counter)
        entry["model"] = call.model
        if not key.allows(call.model):
            raise model_forbidden(call.model)
        pin = headers.get(PIN_HEADER)
        pinned = pin.decode("latin-1").strip() if pin else None
        if pinned is None and not self.router.serves(call.model):
            raise model_not_found(call.model)
        # only a request that is valid may create or update its user
        user, role = await self.openwebui.charged(key, headers)
        entry["user"] = user
        try:
            return await self.proxy.call(call, user, role, key.id, pinned, receive, send, outcome)
        except InvalidInput as exc:
            raise bad_request(str(exc), exc.param) from None
        except UnknownModel as exc:
            raise ApiError(
                404, str(exc), "invalid_request_error", "model_not_priced", "model"
            ) from None
        except StoreUnavailable as exc:
            raise store_unavailable(exc, self.settings.store_timeout) from None

    async def _models(self, scope: Scope, send: Send, entry: dict[str, Any], wanted: str) -> int:
        key = self.auth.key(header_map(scope))
        entry["key"] = key.id
        entry["user"] = key.user_id
        models = [m for m in self.router.models() if key.allows(m)]
        if wanted:
            if wanted not in models:
                raise model_not_found(wanted)
            await respond(send, 200, orjson.dumps(_model_record(wanted)))
            return 200
        body = {"object": "list", "data": [_model_record(m) for m in models]}
        await respond(send, 200, orjson.dumps(body))
        return 200

    async def _ready(self, scope: Scope, send: Send) -> int:
        try:
            await self.engine.catalog_call(self.engine.catalog.version)
        except Exception as exc:
            await respond(
                send, 503, orjson.dumps({"status": "unavailable", "database": type(exc).__name__})
            )
            return 503
        resting = self.router.resting()
        body: dict[str, Any] = {
            "status": "ready",
            "channels": len(self.router.channels),
            "resting": len(resting),
        }
        if self._has_key(scope):
            # names are for callers with a key (who may pin a channel by name anyway)
            body["channel_names"] = sorted(self.router.channels)
            body["resting_names"] = sorted(resting)
        await respond(send, 200, orjson.dumps(body))
        return 200

    def _has_key(self, scope: Scope) -> bool:
        """Whether the request carries a valid API key (a probe without one is no error)."""
        headers = header_map(scope)
        if b"authorization" not in headers:
            return False
        try:
            self.auth.key(headers)
        except ApiError:
            return False
        return True


def _model_record(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "quotagate"}
