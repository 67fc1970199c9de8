"""
title: QuotaGate
author: QuotaGate
version: 0.1.0
license: MIT
description: Per-person token quotas from QuotaGate: checked before a chat, charged on real usage.
"""

# One self-contained file: an admin pastes it into Admin → Functions (or uploads it with
# POST /api/v1/functions/create). Standard library only, plus pydantic, which Open WebUI
# itself ships: Open WebUI in offline mode installs no `requirements:`.
#
# How it works (Open WebUI 0.12.x):
# * inlet: asks QuotaGate (POST /v1/quota/admit) with the user's id, email, role and
#   groups, the model, the messages and max_tokens. A refusal becomes an exception, which
#   Open WebUI shows as the chat's error. Otherwise max_tokens is clamped to what the user
#   may still spend and a stream asks the upstream for its usage chunk. The ticket is kept
#   in `__metadata__`, the one dict Open WebUI hands to inlet, stream and outlet of the
#   same request (nothing about quotas is kept in this process: replicas are safe).
# * stream: collects the streamed text and, when the usage chunk passes, settles at once.
#   While the chat streams it renews the ticket's lease (POST /v1/quota/renew) a third of
#   the way to its end, so a chat longer than QuotaGate's lease_seconds keeps its
#   reservation; only the tickets of an Open WebUI process that died expire.
# * outlet: settles (once) with the usage of exactly this request's message, or counts the
#   text when no usage came. Outlet calls made by POST /api/chat/completed are ignored:
#   that deprecated route runs outlet again on a body the client wrote.
# * no outlet at all (the UI's stop button, an upstream error, a dropped stream): when the
#   request's task ends without a settlement, the filter settles what the stream delivered
#   or, if nothing was delivered, cancels the reservation. If this process dies first, the
#   ticket's lease expires and QuotaGate's sweeper settles it.

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
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


def _now() -> datetime:
    return datetime.now(timezone.utc)  # noqa: UP017 - also runs on older Open WebUI Pythons


def _renew_at(expires_at: Any, now: datetime) -> float | None:
    """When to renew a lease that ends at `expires_at` (ISO 8601): a third of the way."""
    try:
        ends = datetime.fromisoformat(str(expires_at)).timestamp()
    except ValueError:
        return None
    return now.timestamp() + max(0.0, ends - now.timestamp()) / 3


class Filter:
    class Valves(BaseModel):
        quotagate_url: str = Field(
            default="http://127.0.0.1:8000",
            description="Where QuotaGate listens (the gateway serves the quota API)",
        )
        service_key: str = Field(
            default="",
            description="A QuotaGate key made with: quotagate keys create --user openwebui "
            "--trusted-openwebui",
            json_schema_extra={"input": {"type": "password"}},
        )
        fail_open: bool = Field(
            default=False,
            description="When QuotaGate cannot be reached: let chats through uncounted "
            "(on) or refuse them (off)",
        )
        exempt_roles: str = Field(
            default="", description="Open WebUI roles never limited nor counted, comma-separated"
        )
        warn_at_percent: str = Field(
            default="80,95", description="Warn when a chat pushes a quota past these percentages"
        )
        show_status: bool = Field(default=True, description="Show what is left under each reply")
        send_groups: bool = Field(default=True, description="Send the user's Open WebUI groups")
        timeout_seconds: float = Field(default=10.0, description="Per call to QuotaGate")
        settle_grace_seconds: float = Field(
            default=2.0,
            description="After a request ends without an outlet (stop, error), wait this "
            "long for a late one before settling what the stream delivered",
        )
        priority: int = Field(
            default=100, description="Filter order; high runs last, so other filters' edits count"
        )

    def __init__(self) -> None:
        self.valves = self.Valves()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- hooks ----------------------------------------------------------------------------
    async def inlet(
        self,
        body: dict,
        __user__: dict | None = None,
        __metadata__: dict | None = None,
        __event_emitter__: Any = None,
    ) -> dict:
        user = __user__ or {}
        if not user.get("id") or str(user.get("role") or "").lower() in qg_roles(
            self.valves.exempt_roles
        ):
            return body
        now = _now()
        meta = __metadata__ if isinstance(__metadata__, dict) else {}
        ui_path = bool(meta.get("session_id") and meta.get("chat_id"))
        groups = await self._groups(user) if self.valves.send_groups else None
        try:
            answer = await qg_admit(self.valves, user, body, groups)
        except QuotaGateRefused as refused:
            # only as the chat's error: Open WebUI keeps statuses emitted before the raise,
            # and the same text in the status history would show the refusal twice
            raise Exception(str(refused)) from None
        except QuotaGateUnavailable as down:
            QG_LOG.error("QuotaGate: %s", down)
            if self.valves.fail_open:
                return body
            raise Exception(
                "QuotaGate, which keeps track of chat quotas, cannot be reached right now. "
                "Please try again in a moment."
            ) from None
        asked = bool(body.get("stream")) and qg_client_asked_usage(body)
        qg_clamp(body, int(answer["max_tokens"]))
        state = qg_new_state(answer, body, ui_path, asked)
        state["renew_at"] = _renew_at(answer.get("expires_at"), now)
        meta[QG_STATE] = state
        self._watch(state)
        if self.valves.show_status:
            line = qg_status_line(answer.get("limits"), now)
            if line:
                await self._emit(__event_emitter__, line, done=False)
        return body

    async def stream(
        self, event: dict, __metadata__: dict | None = None, __event_emitter__: Any = None
    ) -> dict | None:
        state = (__metadata__ or {}).get(QG_STATE) if isinstance(__metadata__, dict) else None
        if not isinstance(state, dict) or state.get("settled"):
            return event
        self._watch(state)
        self._keep_alive(state)
        if qg_observe(state, event):
            await self._settle(state, __event_emitter__)
        if (
            not state["ui_path"]
            and not state["client_usage"]
            and event.get("usage")
            and event.get("choices") == []
        ):
            return None  # the usage chunk the API client did not ask for
        return event

    async def outlet(
        self,
        body: dict,
        __metadata__: dict | None = None,
        __request__: Any = None,
        __event_emitter__: Any = None,
    ) -> dict:
        if qg_path(__request__).endswith(QG_CHAT_COMPLETED):
            return body  # deprecated route, client-written body: never counted
        state = (__metadata__ or {}).get(QG_STATE) if isinstance(__metadata__, dict) else None
        if not isinstance(state, dict) or state.get("settled"):
            return body
        if not state.get("usage"):
            message = qg_this_message(body)
            numbers = qg_usage_numbers((message or {}).get("usage"))
            if numbers is not None:
                state["usage"] = numbers
            elif not state.get("text"):
                state["text"] = [qg_message_text(message)]
        await self._settle(state, __event_emitter__)
        return body

    # -- helpers --------------------------------------------------------------------------
    async def _settle(self, state: dict, emitter: Any) -> None:
        try:
            answer = await qg_settle(self.valves, state)
        except QuotaGateUnavailable as down:
            # the lease covers it: QuotaGate's sweeper settles the ticket when it expires
            QG_LOG.error("QuotaGate: could not settle ticket %s: %s", state.get("ticket"), down)
            return
        if answer is None or emitter is None:
            return
        now = _now()
        warning = qg_warning(
            state.get("before"),
            answer.get("limits"),
            qg_thresholds(self.valves.warn_at_percent),
            now,
        )
        if warning:
            await self._emit(emitter, "⚠ " + warning, done=True)
            await self._notify(emitter, warning)
        elif self.valves.show_status:
            line = qg_status_line(answer.get("limits"), now)
            if line:
                await self._emit(emitter, line, done=True)

    def _keep_alive(self, state: dict) -> None:
        """Renew the lease when it is a third gone, in the background (the chunk goes on)."""
        due = state.get("renew_at")
        if due is None or _now().timestamp() < due:
            return
        state["renew_at"] = None  # one renewal at a time
        renewal = asyncio.ensure_future(self._renew(state))
        self._tasks.add(renewal)
        renewal.add_done_callback(self._tasks.discard)

    async def _renew(self, state: dict) -> None:
        now = _now()
        try:
            status, answer = await qg_call(
                self.valves, "POST", "/v1/quota/renew", {"ticket": state["ticket"]}
            )
        except QuotaGateUnavailable as down:
            QG_LOG.error("QuotaGate: could not renew ticket %s: %s", state.get("ticket"), down)
            status, answer = 0, {}
        if status == 200:  # renewed: when to renew next; not pending any more: never
            renewed = answer.get("renewed") and not state.get("settled")
            state["renew_at"] = _renew_at(answer.get("expires_at"), now) if renewed else None
        else:
            state["renew_at"] = now.timestamp() + 5.0  # try again at a later chunk

    def _watch(self, state: dict) -> None:
        """Settle when the request's tasks end without an outlet (stop, errors)."""
        task = asyncio.current_task()
        if task is None:
            return
        watched = state.setdefault("tasks", [])
        if id(task) in watched:
            return
        watched.append(id(task))
        state["open"] = state.get("open", 0) + 1
        task.add_done_callback(lambda _: self._task_done(state))

    def _task_done(self, state: dict) -> None:
        state["open"] = state.get("open", 1) - 1
        if state["open"] > 0 or state.get("settled"):
            return
        finish = asyncio.ensure_future(self._finish(state))
        self._tasks.add(finish)
        finish.add_done_callback(self._tasks.discard)

    async def _finish(self, state: dict) -> None:
        await asyncio.sleep(max(0.0, float(self.valves.settle_grace_seconds)))
        if state.get("settled"):
            return
        try:
            if state.get("usage") or state.get("text"):
                await qg_settle(self.valves, state)  # what the stream delivered
            else:
                await qg_cancel(self.valves, state)  # nothing was generated
        except QuotaGateUnavailable as down:
            QG_LOG.error("QuotaGate: ticket %s left to its lease: %s", state.get("ticket"), down)

    async def _groups(self, user: dict) -> list[str] | None:
        """The user's Open WebUI group names (None outside Open WebUI: not sent)."""
        try:
            from open_webui.models.groups import Groups

            found = Groups.get_groups_by_member_id(user["id"])
            if asyncio.iscoroutine(found):
                found = await found
            return sorted({str(g.name) for g in found or []})
        except Exception:
            return None

    @staticmethod
    async def _emit(emitter: Any, description: str, done: bool) -> None:
        if emitter is None:
            return
        try:
            await emitter({"type": "status", "data": {"description": description, "done": done}})
        except Exception:
            QG_LOG.debug("QuotaGate: status event failed", exc_info=True)

    @staticmethod
    async def _notify(emitter: Any, content: str) -> None:
        try:
            await emitter({"type": "notification", "data": {"type": "warning", "content": content}})
        except Exception:
            QG_LOG.debug("QuotaGate: notification failed", exc_info=True)
