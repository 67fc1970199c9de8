"""
title: QuotaGate filter for Open WebUI Pipelines
author: QuotaGate
version: 0.1.0
license: MIT
description: Per-person token quotas from QuotaGate, as a filter of the Open WebUI Pipelines server.
"""

# Drop this file into the Pipelines server's pipelines directory (or upload it in Admin →
# Settings → Pipelines). Configure it with environment variables of the Pipelines server
# (QUOTAGATE_URL, QUOTAGATE_SERVICE_KEY, QUOTAGATE_FAIL_OPEN, QUOTAGATE_EXEMPT_ROLES,
# QUOTAGATE_TIMEOUT, QUOTAGATE_REFUSAL_MODEL) or its valves. Standard library plus pydantic
# (which the Pipelines server ships) only.
#
# Open WebUI calls POST /{id}/filter/inlet before the model call and /{id}/filter/outlet
# after it, each with {"user": {...}, "body": {...}}. Unlike a Function, a Pipelines filter
# gets no shared metadata and no stream hook, so:
# * inlet admits, clamps max_tokens, asks streams for their usage chunk, and remembers the
#   ticket in this process under (user, chat id, message id) — or (user, model), first in
#   first out, for API calls, whose outlet carries no id known at inlet;
# * outlet settles that ticket with the usage of exactly this request's message, or counts
#   its text when the upstream reported none;
# * Open WebUI's background tasks (titles, tags, follow-ups) reach inlet but never outlet:
#   they are let through uncounted (gateway mode counts them);
# * a refusal is an HTTP error (Open WebUI shows only its reason phrase) — or, with the
#   `refusal_model` valve naming the companion pipe (pipelines_refusal.py), a web UI turn
#   pointed at that pipe, which answers QuotaGate's message as the reply;
# * when no outlet comes (stop, upstream error) or it reaches another replica, the ticket's
#   lease expires and QuotaGate's sweeper settles it (charged at its reservation, or
#   released, as QuotaGate's on_expiry says).

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

# ==== BEGIN QUOTAGATE CORE (shared with pipelines_filter.py; keep both copies identical) ====

QG_LOG = logging.getLogger("quotagate.openwebui")
QG_STATE = "quotagate"
QG_USER_AGENT = "quotagate-openwebui/0.1"
QG_CHAT_COMPLETED = "/chat/completed"
# QuotaGate is called from threads of its own (urllib blocks), not from the loop's default
# executor, which Open WebUI and other plugins share
QG_THREADS = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="quotagate")


class QuotaGateRefused(Exception):
    """QuotaGate refused the request; the message is for the person chatting. `status`:
    429 over a quota, 400 (403) a request it cannot take (a model the key may not use)."""

    def __init__(self, message: str, status: int = 429) -> None:
        super().__init__(message)
        self.status = status


class QuotaGateUnavailable(Exception):
    """QuotaGate could not be asked (down, misconfigured): the fail mode decides."""


def qg_request(
    base_url: str, key: str, method: str, path: str, payload: Any, timeout: float
) -> tuple[int, dict[str, Any]]:
    """One JSON call to QuotaGate (blocking: run it in a thread)."""
    data = None if payload is None else json.dumps(payload, default=str).encode()
    request = urllib.request.Request(
        base_url.rstrip("/") + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": QG_USER_AGENT,
        },
    )
    # QuotaGate is an internal service: never route it through an environment proxy
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise QuotaGateUnavailable(f"QuotaGate at {base_url} cannot be reached: {error}") from None
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    return status, body if isinstance(body, dict) else {}


async def qg_call(
    config: Any, method: str, path: str, payload: Any = None
) -> tuple[int, dict[str, Any]]:
    if not config.quotagate_url or not config.service_key:
        raise QuotaGateUnavailable("QuotaGate's URL or service key is not set in the valves")
    return await asyncio.get_running_loop().run_in_executor(
        QG_THREADS,
        qg_request,
        config.quotagate_url,
        config.service_key,
        method,
        path,
        payload,
        float(config.timeout_seconds),
    )


def qg_error_message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return "no details"


# -- what a request asks for and gets -------------------------------------------------------


def qg_requested_tokens(body: dict[str, Any]) -> int | None:
    """The completion limit the request asks for (max_tokens / max_completion_tokens)."""
    found = [
        value
        for value in (body.get("max_tokens"), body.get("max_completion_tokens"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
    ]
    return min(found) if found else None


def qg_clamp(body: dict[str, Any], allowed: int) -> None:
    """Bound the completion to what the user may still spend, asking for usage on streams."""
    body["max_tokens"] = allowed
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = allowed
    if body.get("stream"):
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }


def qg_client_asked_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def qg_usage_numbers(usage: Any) -> dict[str, int] | None:
    """prompt/completion/cached tokens of an OpenAI or Anthropic usage object."""
    if not isinstance(usage, dict):
        return None

    def number(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                return int(value)
        return None

    prompt = number("prompt_tokens", "input_tokens")
    completion = number("completion_tokens", "output_tokens")
    if prompt is None and completion is None:
        return None
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {
        "prompt_tokens": prompt or 0,
        "completion_tokens": completion or 0,
        "cached_tokens": cached if isinstance(cached, int) and cached >= 0 else 0,
    }


def qg_add_usage(total: dict[str, int] | None, more: dict[str, int]) -> dict[str, int]:
    if total is None:
        return dict(more)
    return {name: total.get(name, 0) + more.get(name, 0) for name in more}


def qg_as_usage(numbers: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": numbers["prompt_tokens"],
        "completion_tokens": numbers["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": numbers.get("cached_tokens", 0)},
    }


def qg_this_message(body: dict[str, Any]) -> dict[str, Any] | None:
    """The assistant message this request produced: the one whose id is the body's id
    (the UI path's outlet carries the whole chat branch, each turn with its saved usage),
    else the last assistant message."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    wanted = body.get("id")
    if wanted:
        for message in messages:
            if isinstance(message, dict) and message.get("id") == wanted:
                return message
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return message
    return None


def qg_message_text(message: dict[str, Any] | None) -> str:
    if not message:
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def qg_event_text(event: dict[str, Any]) -> str:
    """Generated text in a streamed chunk: content, reasoning, tool-call arguments."""
    parts: list[str] = []
    choices = event.get("choices")
    if not isinstance(choices, list):
        return ""
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or choice.get("message") or {}
        if not isinstance(delta, dict):
            continue
        for name in ("content", "reasoning_content", "reasoning", "refusal"):
            value = delta.get(name)
            if isinstance(value, str):
                parts.append(value)
        for call in delta.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                parts.append(str(function.get("name") or ""))
                parts.append(str(function.get("arguments") or ""))
    return "".join(parts)


def qg_finish_reason(event: dict[str, Any]) -> str | None:
    for choice in event.get("choices") or []:
        if isinstance(choice, dict) and choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


def qg_path(request: Any) -> str:
    try:
        return str(request.url.path)
    except AttributeError:
        return ""


def qg_roles(text: str) -> set[str]:
    return {part.strip().lower() for part in (text or "").split(",") if part.strip()}


def qg_thresholds(text: str) -> list[float]:
    found = []
    for part in (text or "").split(","):
        try:
            value = float(part.strip().rstrip("%"))
        except ValueError:
            continue
        if 0 < value <= 100:
            found.append(value)
    return sorted(set(found))


# -- telling people where they stand --------------------------------------------------------

QG_PERIOD = {
    "minute": ("this minute", "per-minute"),
    "hour": ("this hour", "hourly"),
    "day": ("today", "daily"),
    "week": ("this week", "weekly"),
    "month": ("this month", "monthly"),
    "lifetime": ("in total", "total"),
}


def qg_amount(metric: str, value: int) -> str:
    if metric == "credits":
        return f"{value / 1_000_000:,.2f}"
    return f"{value:,}"


def qg_unit(metric: str) -> str:
    return metric.replace("_", " ")


def qg_period(window: str, kind: str | None = None) -> tuple[str, str]:
    """('today', 'daily') for a window such as 'day' or 'rolling 5h'."""
    kind = kind or (window.split()[0] if window else "")
    if kind == "rolling":
        span = window.split()[1] if len(window.split()) > 1 else ""
        return f"in the last {span}", f"rolling {span}"
    return QG_PERIOD.get(kind, (f"per {window}", window))


def qg_duration(seconds: float) -> str:
    minutes = max(1, int(seconds // 60 + (1 if seconds % 60 else 0)))
    days, minutes = divmod(minutes, 1440)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"


def qg_reset(resets_at: str | None, zone: str, now: datetime, relative: bool) -> str:
    """'resets 00:00 Europe/Berlin' (+ ' (in 3 h 12 min)'), in the limit's own timezone."""
    if not resets_at:
        return "does not reset"
    try:
        when = datetime.fromisoformat(resets_at)
    except ValueError:
        return f"resets {resets_at}"
    local_now = now.astimezone(when.tzinfo)
    if when - local_now <= timedelta(hours=24):
        moment = when.strftime("%H:%M")
    else:
        moment = when.strftime("%a %d %b %H:%M")
    text = f"resets {moment} {zone}"
    if relative:
        text += f" (in {qg_duration(max(0.0, (when - now).total_seconds()))})"
    return text


def qg_refusal_text(body: dict[str, Any]) -> str:
    """The message a person sees when QuotaGate refuses their chat: QuotaGate's own words
    (every front door words a refusal the same way, in the limit's timezone)."""
    refusal = body.get("refusal")
    if isinstance(refusal, dict) and isinstance(refusal.get("message"), str):
        return refusal["message"]
    return f"QuotaGate refused this request: {qg_error_message(body)}"


def qg_tightest(limits: Any) -> dict[str, Any] | None:
    """The limit closest to running out (the one a status line should show)."""
    best: tuple[float, dict[str, Any]] | None = None
    for limit in limits or []:
        if not isinstance(limit, dict) or not limit.get("amount"):
            continue
        left = limit.get("remaining")
        share = (left or 0) / limit["amount"]
        if best is None or share < best[0]:
            best = (share, limit)
    return best[1] if best else None


def qg_status_line(limits: Any, now: datetime) -> str | None:
    """'12,400 of 50,000 tokens left today, resets 00:00 Europe/Berlin'."""
    limit = qg_tightest(limits)
    if limit is None:
        return None
    metric = str(limit.get("metric") or "tokens")
    period, _ = qg_period(str(limit.get("window") or ""), limit.get("window_kind"))
    reset = qg_reset(limit.get("resets_at"), str(limit.get("timezone") or "UTC"), now, False)
    return (
        f"{qg_amount(metric, int(limit.get('remaining') or 0))} of "
        f"{qg_amount(metric, int(limit['amount']))} {qg_unit(metric)} left {period}, {reset}"
    )


def qg_used_share(limit: dict[str, Any]) -> float:
    amount = limit.get("amount") or 0
    if not amount:
        return 0.0
    return 100.0 * (int(limit.get("used") or 0) + int(limit.get("reserved") or 0)) / amount


def qg_warning(before: Any, after: Any, thresholds: list[float], now: datetime) -> str | None:
    """A warning when this request pushed a limit across a threshold (e.g. 80 %)."""
    earlier = {
        (b.get("label"), b.get("metric"), b.get("window")): qg_used_share(b)
        for b in before or []
        if isinstance(b, dict)
    }
    worst: tuple[float, dict[str, Any]] | None = None
    for limit in after or []:
        if not isinstance(limit, dict) or not limit.get("amount"):
            continue
        share = qg_used_share(limit)
        was = earlier.get((limit.get("label"), limit.get("metric"), limit.get("window")), 0.0)
        crossed = [t for t in thresholds if was < t <= share]
        if crossed and (worst is None or crossed[-1] > worst[0]):
            worst = (crossed[-1], limit)
    if worst is None:
        return None
    limit = worst[1]
    metric = str(limit.get("metric") or "tokens")
    _, adjective = qg_period(str(limit.get("window") or ""), limit.get("window_kind"))
    reset = qg_reset(limit.get("resets_at"), str(limit.get("timezone") or "UTC"), now, True)
    used = int(limit.get("used") or 0) + int(limit.get("reserved") or 0)
    return (
        f"You have used {min(100, int(qg_used_share(limit)))}% of your {adjective} "
        f"{qg_unit(metric)} quota ({qg_amount(metric, used)} of "
        f"{qg_amount(metric, int(limit['amount']))}); it {reset}."
    )


# -- the quota calls ------------------------------------------------------------------------


async def qg_admit(
    config: Any,
    user: dict[str, Any],
    body: dict[str, Any],
    groups: list[str] | None,
) -> dict[str, Any]:
    """Admit the request; returns QuotaGate's answer (ticket, max_tokens, limits)."""
    person = {
        "id": str(user.get("id")),
        "email": user.get("email"),
        "name": user.get("name"),
        "role": user.get("role"),
    }
    if groups is not None:
        person["groups"] = groups
    messages = body.get("messages")
    payload = {
        "user": person,
        "model": body.get("model"),
        "messages": messages if isinstance(messages, list) else [],
        "max_tokens": qg_requested_tokens(body),
        "stream": bool(body.get("stream")),
        "status": True,
    }
    status, answer = await qg_call(config, "POST", "/v1/quota/admit", payload)
    if status == 200 and answer.get("ticket"):
        return answer
    if status == 429:
        raise QuotaGateRefused(qg_refusal_text(answer))
    code = (answer.get("error") or {}).get("code") if isinstance(answer, dict) else None
    if status in (400, 404) or code == "model_not_allowed":
        text = f"QuotaGate refused this request: {qg_error_message(answer)}"
        raise QuotaGateRefused(text, 403 if code == "model_not_allowed" else 400)
    raise QuotaGateUnavailable(f"QuotaGate answered HTTP {status}: {qg_error_message(answer)}")


async def qg_settle(config: Any, state: dict[str, Any]) -> dict[str, Any] | None:
    """Settle the ticket once: with the usage seen, else the streamed text counted."""
    if state.get("settled"):
        return None
    payload: dict[str, Any] = {"ticket": state["ticket"], "status": True}
    usage = state.get("usage")
    if usage:
        payload["usage"] = qg_as_usage(usage)
    else:
        payload["completion_text"] = "".join(state.get("text") or [])
    status, answer = await qg_call(config, "POST", "/v1/quota/settle", payload)
    if status != 200:
        raise QuotaGateUnavailable(f"settle answered HTTP {status}: {qg_error_message(answer)}")
    state["settled"] = True
    state.pop("text", None)
    return answer


async def qg_cancel(config: Any, state: dict[str, Any]) -> None:
    if state.get("settled"):
        return
    status, answer = await qg_call(config, "POST", "/v1/quota/cancel", {"ticket": state["ticket"]})
    if status != 200:
        raise QuotaGateUnavailable(f"cancel answered HTTP {status}: {qg_error_message(answer)}")
    state["settled"] = True


def qg_new_state(
    answer: dict[str, Any], body: dict[str, Any], ui_path: bool, client_usage: bool
) -> dict[str, Any]:
    """What later hooks of the same request need (JSON values only). `client_usage`: the
    client itself asked for the stream's usage chunk (before the filter asked for it)."""
    return {
        "ticket": answer["ticket"],
        "user": answer.get("user"),
        "max_tokens": answer.get("max_tokens"),
        "prompt_tokens": answer.get("prompt_tokens"),
        "before": answer.get("limits"),
        "stream": bool(body.get("stream")),
        "client_usage": client_usage,
        "ui_path": ui_path,
        "text": [],
        "usage": None,
        "finish": None,
        "settled": False,
    }


def qg_observe(state: dict[str, Any], event: dict[str, Any]) -> bool:
    """Record a streamed chunk; True when it closes the generation with a usage report.

    A model that stops to call tools (finish_reason "tool_calls") is called again by
    Open WebUI: its usages add up, and only a final one settles.
    """
    text = qg_event_text(event)
    if text:
        state.setdefault("text", []).append(text)
    finish = qg_finish_reason(event)
    if finish:
        state["finish"] = finish
    numbers = qg_usage_numbers(event.get("usage"))
    if numbers is None:
        return False
    state["usage"] = qg_add_usage(state.get("usage"), numbers)
    return state.get("finish") != "tool_calls"


# ==== END QUOTAGATE CORE ====


def _env_flag(name: str) -> bool:
    return os.getenv(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.getenv(name, ""))
    except ValueError:
        return default


def _refuse(status: int, message: str) -> Any:
    """The inlet's answer to a request that must not reach the model.

    Raising would make the Pipelines server answer 500 whatever was raised, and Open WebUI
    0.12.4 (routers/pipelines.py) drops the body of every error answer of a Pipelines
    server, keeping only its status and reason phrase. So the status must say it: returned
    as a response (which the server passes on as it is), 429 reaches an API client as
    HTTP 429 and the web UI as "Too Many Requests", not as a server error. The message
    rides along in `detail` for any client that reads it.
    """
    try:
        from starlette.responses import JSONResponse
    except ImportError:  # not inside the Pipelines server (which runs on FastAPI)
        raise Exception(message) from None
    return JSONResponse({"detail": message}, status_code=status)


#: the body field the refusal text rides in to the companion pipe (pipelines_refusal.py)
QG_REFUSAL_FIELD = "quotagate_refusal"


def _refusal_reply(body: dict[str, Any], refusal_model: str, message: str) -> dict[str, Any]:
    """A web UI chat QuotaGate refused, pointed at the companion pipe that answers `message`.

    Open WebUI 0.12.4 routes the call to the `model` of the body a filter's inlet returns
    (utils/chat.py looks it up again), so the reply the person reads is the refusal and no
    model is called. Only what the rest of the request path needs is kept: the person's
    messages, files, tools and features go nowhere.
    """
    return {
        "model": refusal_model,
        "stream": bool(body.get("stream")),
        "messages": [{"role": "user", "content": "(refused by QuotaGate)"}],
        "metadata": body.get("metadata") or {},
        QG_REFUSAL_FIELD: message,
    }


class Pipeline:
    class Valves(BaseModel):
        pipelines: list[str] = Field(
            default_factory=lambda: ["*"], description="Models this filter applies to"
        )
        priority: int = Field(default=0, description="Filter order (low runs first)")
        quotagate_url: str = Field(
            default_factory=lambda: os.getenv("QUOTAGATE_URL", "http://127.0.0.1:8000")
        )
        service_key: str = Field(default_factory=lambda: os.getenv("QUOTAGATE_SERVICE_KEY", ""))
        fail_open: bool = Field(default_factory=lambda: _env_flag("QUOTAGATE_FAIL_OPEN"))
        exempt_roles: str = Field(default_factory=lambda: os.getenv("QUOTAGATE_EXEMPT_ROLES", ""))
        timeout_seconds: float = Field(
            default_factory=lambda: _env_float("QUOTAGATE_TIMEOUT", 10.0)
        )
        link_seconds: float = Field(
            default=900.0, description="How long an admitted request waits for its outlet"
        )
        refusal_model: str = Field(
            default_factory=lambda: os.getenv("QUOTAGATE_REFUSAL_MODEL", ""),
            description="The companion pipe's id (quotagate-refusal): the web UI shows "
            "refusals as its reply. Only ever that pipe: calls of this model are not "
            "counted. Empty: a refusal is an HTTP error",
        )

    def __init__(self) -> None:
        self.type = "filter"
        self.id = "quotagate"
        self.name = "QuotaGate"
        self.valves = self.Valves()
        # inlet -> outlet links of requests in flight (tickets, not quota: QuotaGate has those)
        self._open: dict[tuple[str, str, str], list[tuple[float, dict[str, Any]]]] = {}
        # web UI chats whose last turn the refusal pipe answered (their tasks go there too)
        self._refusals: dict[tuple[str, str], tuple[float, str]] = {}

    async def on_startup(self) -> None:
        QG_LOG.info("QuotaGate filter for %s", self.valves.quotagate_url)

    async def on_shutdown(self) -> None:
        self._open.clear()
        self._refusals.clear()

    async def on_valves_updated(self) -> None:
        pass

    async def inlet(self, body: dict, user: dict | None = None) -> Any:
        person = user or {}
        if not person.get("id") or str(person.get("role") or "").lower() in qg_roles(
            self.valves.exempt_roles
        ):
            return body
        raw = body.get("metadata")
        meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
        refusal_model = self.valves.refusal_model.strip()
        chat = (str(person["id"]), str(meta.get("chat_id") or ""))
        if meta.get("task"):
            # a background task: Open WebUI calls no outlet for it, so it is let through
            # uncounted — except the follow-ups and tags Open WebUI asks for once the refusal
            # pipe answered a turn of the chat (their metadata is the chat's, without the
            # message id): they would call the model the person may not use
            refused = self._refusals.get(chat) if refusal_model else None
            if refused and refused[0] >= time.monotonic():
                return _refusal_reply(body, refusal_model, refused[1])
            return body
        if refusal_model and body.get("model") == refusal_model:
            return body  # the companion pipe calls no model: nothing to count
        ui_path = bool(meta.get("session_id") and meta.get("chat_id"))
        try:
            answer = await qg_admit(self.valves, person, body, None)
        except QuotaGateRefused as refused:
            return self._refused(body, chat if ui_path else None, refused.status, str(refused))
        except QuotaGateUnavailable as down:
            QG_LOG.error("QuotaGate: %s", down)
            if self.valves.fail_open:
                return body
            return self._refused(
                body,
                chat if ui_path else None,
                503,
                "QuotaGate, which keeps track of chat quotas, cannot be reached right now. "
                "Please try again in a moment.",
            )
        self._refusals.pop(chat, None)  # admitted: this turn's tasks are the person's again
        client_usage = qg_client_asked_usage(body)
        options = body.get("stream_options")
        qg_clamp(body, int(answer["max_tokens"]))
        if body.get("stream") and not ui_path and not client_usage:
            # No stream hook can take the usage chunk out again before Open WebUI hands it
            # to an API client that never asked for it: do not ask; outlet counts the text.
            if options is None:
                body.pop("stream_options", None)
            else:
                body["stream_options"] = options
        state = qg_new_state(answer, body, ui_path, client_usage)
        message_id = meta.get("message_id")
        if message_id:
            link = (str(person["id"]), str(meta.get("chat_id") or ""), str(message_id))
        else:
            link = (str(person["id"]), "", f"model:{body.get('model')}")
        self._forget_old()
        self._open.setdefault(link, []).append((time.monotonic() + self.valves.link_seconds, state))
        return body

    async def outlet(self, body: dict, user: dict | None = None) -> dict:
        person = user or {}
        if not person.get("id"):
            return body
        state = self._take(str(person["id"]), body)
        if state is None:
            return body
        message = qg_this_message(body)
        numbers = qg_usage_numbers((message or {}).get("usage"))
        if numbers is not None:
            state["usage"] = numbers
        else:
            state["text"] = [qg_message_text(message)]
        try:
            await qg_settle(self.valves, state)
        except QuotaGateUnavailable as down:
            QG_LOG.error("QuotaGate: ticket %s left to its lease: %s", state["ticket"], down)
        return body

    def _refused(self, body: dict, chat: tuple[str, str] | None, status: int, message: str) -> Any:
        """A web UI turn is answered by the companion pipe when one is set (the person
        reads `message`); API clients, and everyone without the pipe, get the HTTP error."""
        refusal_model = self.valves.refusal_model.strip()
        if not refusal_model or chat is None:
            return _refuse(status, message)
        now = time.monotonic()
        for key in [k for k, (until, _) in self._refusals.items() if until < now]:
            del self._refusals[key]
        self._refusals[chat] = (now + self.valves.link_seconds, message)
        return _refusal_reply(body, refusal_model, message)

    def _take(self, user_id: str, body: dict) -> dict[str, Any] | None:
        """The request this outlet belongs to: by chat and message id, else oldest first."""
        keys = []
        if body.get("id"):
            keys.append((user_id, str(body.get("chat_id") or ""), str(body["id"])))
        keys.append((user_id, "", f"model:{body.get('model')}"))
        for key in keys:
            waiting = self._open.get(key)
            if waiting:
                _, state = waiting.pop(0)
                if not waiting:
                    del self._open[key]
                return state
        return None

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, v in self._open.items() if v and v[0][0] < now]:
            fresh = [entry for entry in self._open[key] if entry[0] >= now]
            if fresh:
                self._open[key] = fresh
            else:
                del self._open[key]
