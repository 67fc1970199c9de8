"""One model call through the gateway: admit, route, call upstream, stream back, settle.

The ticket of an attempt lives exactly as long as the attempt: a channel that fails
before the client saw a byte gets its ticket cancelled (nothing charged) and, if the
request provably never reached it or it answered with a failure, the next channel is
admitted afresh, since its own caps are part of the reservation (a request the upstream
may have read is sent nowhere else: it may be generating). Once bytes
have reached the client the attempt is the answer, whatever happens next, and it is
settled on what the upstream reported, or else on what was delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from quotagate.core.errors import (
    InvalidInput,
    QuotaExceeded,
    Refusal,
    StoreUnavailable,
    UnknownTicket,
)
from quotagate.core.pricing import Usage
from quotagate.core.text import shown_repr
from quotagate.engine import AdmitContext, Engine, Ticket
from quotagate.gateway.asgi import Headers, Receive, Send, respond
from quotagate.gateway.channels import Channel
from quotagate.gateway.errors import ApiError
from quotagate.gateway.observe import Metrics
from quotagate.gateway.ratelimit import refusal_error, ticket_headers
from quotagate.gateway.requests import UPSTREAM_PATHS, Call
from quotagate.gateway.routing import Router
from quotagate.gateway.sse import StreamTracker, choice_texts, error_event
from quotagate.gateway.upstream import UpstreamClient, UpstreamFailure, UpstreamResponse
from quotagate.gateway.upstream_errors import channel_fault, client_error, excerpt

log = logging.getLogger("quotagate.gateway")

PIN_HEADER = b"x-quotagate-channel"
_EVENT_STREAM = b"text/event-stream"
_STREAM_HEADERS: Headers = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@dataclass
class Outcome:
    """What the access log and metrics say about one call."""

    channel: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = ""


class Counted(Usage):
    """Usage the gateway counted itself, since the upstream reported none: the ledger row
    is flagged `estimated`."""


@dataclass
class Flight:
    """A stream in progress, so that a shutdown can settle it on what was delivered."""

    ticket: Ticket
    tracker: StreamTracker


class Proxy:
    def __init__(
        self,
        engine: Engine,
        router: Router,
        client: UpstreamClient,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.router = router
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.flights: dict[str, Flight] = {}

    async def call(
        self,
        call: Call,
        user: str,
        role: str | None,
        key_id: str,
        pinned: str | None,
        receive: Receive,
        send: Send,
        outcome: Outcome,
    ) -> int:
        """Answer `call`; returns the HTTP status sent. Raises ApiError before any byte."""
        plan = self.router.plan(call.model, pinned, self.clock().timestamp())
        channel_refusal: Refusal | None = None
        failure: str | None = None
        held_reply: tuple[int, bytes, Headers] | None = None
        for attempt, channel in enumerate(plan):
            now = self.clock()
            context = AdmitContext(
                user=user,
                model=call.model,
                messages=call.messages,
                prompt_tokens=call.prompt_tokens,
                max_tokens=call.want_tokens,
                key_id=key_id,
                channel=channel.name,
                produces_output=call.produces_output,
                role=role,
            )
            try:
                ticket = await self.engine.admit(context, now=now)
            except QuotaExceeded as exc:
                refusal = exc.refusal
                if refusal.scope == "channel" and pinned is None:
                    resets = refusal.resets_at.timestamp() if refusal.resets_at else None
                    self.router.full(channel, now.timestamp(), resets)
                    channel_refusal = channel_refusal or refusal
                    continue
                raise refusal_error(refusal, now) from None
            # renewed while this attempt runs; settle or cancel lets go of it
            self.engine.leases.hold(ticket.id)
            outcome.channel = channel.name
            max_tokens: int | None = None
            if call.produces_output:
                max_tokens = ticket.max_tokens // call.choices
                if max_tokens < 1:
                    await self.engine.cancel(ticket)
                    raise ApiError(
                        429,
                        f"Not enough quota left for {call.choices} completions of at least "
                        "one token each; ask for fewer (n) or wait for the quota to reset.",
                        "insufficient_quota",
                        "insufficient_quota",
                        reason="choices",
                    )
            self.metrics.admitted(call.model, channel.name)
            body = call.upstream_body(max_tokens, channel.upstream_model(call.model))
            last = attempt == len(plan) - 1
            try:
                started = time.perf_counter()
                response = await self.client.post(
                    channel.url(UPSTREAM_PATHS[call.endpoint]), body, channel.api_key
                )
                self.metrics.upstream(channel.name, time.perf_counter() - started)
                status = response.status
                if status != 200:
                    data = await _drain(response)
                    fault = channel_fault(status, data)
                    if fault is None and not 400 <= status < 500:
                        fault = f"answered HTTP {status}"
                    if fault is not None:  # the channel's problem, not the client's
                        detail = f"{response.origin}: {excerpt(data, channel.api_key)}"
                        raise UpstreamFailure(fault, detail, reached=False)
                    await self.engine.cancel(ticket)
                    error = client_error(status, data, channel.api_key, response.origin)
                    reply = (status, error)
                    if status == 429 and not last:
                        # the provider's own rate limit: another channel may have room
                        held_reply = (*reply, response.headers())
                        continue
                    await respond(send, *reply, response.headers())
                    return status
                if call.stream and response.content_type.startswith(_EVENT_STREAM):
                    return await self._stream(
                        call, ticket, channel, response, receive, send, outcome
                    )
                data = await response.read()
            except UpstreamFailure as exc:
                await self.engine.cancel(ticket)
                self.metrics.upstream_error(channel.name)
                resting = self.router.failed(channel)
                failure = f"channel {channel.name} {exc.reason}"  # the log has the rest
                log.warning(
                    "upstream %s failed: %s%s",
                    channel.name,
                    exc,
                    " (resting)" if resting else "",
                )
                if exc.reached:
                    break  # the upstream may be generating for it: sent nowhere else
                continue
            self.router.succeeded(channel)
            usage = self._reply_usage(call, ticket, data)
            charges = await self._settle(ticket, usage, outcome)
            headers = response.headers()
            headers.extend(ticket_headers(ticket, self.clock().timestamp(), charges))
            await respond(send, 200, data, headers, response.content_type)
            return 200
        if held_reply is not None:
            await respond(send, *held_reply)
            return held_reply[0]
        if failure is not None:
            raise ApiError(
                502,
                f"The upstream failed: {failure}.",
                "server_error",
                "upstream_error",
                reason="upstream",
            )
        assert channel_refusal is not None
        raise refusal_error(channel_refusal, self.clock())

    # -- streams --------------------------------------------------------------------------
    async def _stream(
        self,
        call: Call,
        ticket: Ticket,
        channel: Channel,
        response: UpstreamResponse,
        receive: Receive,
        send: Send,
        outcome: Outcome,
    ) -> int:
        """Forward a stream. Raises UpstreamFailure only if nothing reached the client.

        It is cut at the ticket's completion budget (see :class:`StreamTracker`) for an
        upstream that ignores max_tokens: the upstream's connection is closed, which stops
        the generation, and the client sees the end of a stream that hit its limit. An
        upstream that fails once bytes reached the client ends the stream with an error
        event, which the `openai` SDK raises; what was delivered is charged either way.
        """
        tracker = StreamTracker(call.client_usage, ticket.max_tokens)
        gone = asyncio.ensure_future(_disconnected(receive))
        # a client that leaves stops the upstream at once, not at its next chunk
        gone.add_done_callback(lambda _: response.close())
        started = False
        settle = True
        state = "complete"
        failure = ""
        self.flights[ticket.id] = Flight(ticket, tracker)
        self.metrics.streams.inc()
        try:
            try:
                async for data in response.chunks():
                    out = tracker.feed(data)
                    if out:
                        if gone.done():
                            state = "disconnected"
                            break
                        if not started:
                            await self._start_stream(send, ticket, response)
                            started = True
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                        tracker.confirm()
                    if tracker.cut:
                        response.close()  # stops the generation now, before settling
                        break
                else:
                    rest = tracker.finish()  # an unterminated last event
                    if rest and not gone.done():
                        if not started:
                            await self._start_stream(send, ticket, response)
                            started = True
                        await send({"type": "http.response.body", "body": rest, "more_body": True})
                        tracker.confirm()
            except UpstreamFailure as exc:
                if gone.done():
                    state = "disconnected"
                elif not started:
                    settle = False
                    raise
                else:
                    state = "upstream failed"
                    failure = str(exc)
                    self.metrics.upstream_error(channel.name)
                    self.router.failed(channel)
            if tracker.cut and state == "complete":
                state = "cut at the budget"
                log.warning(
                    "upstream %s streamed past the ticket's %d completion tokens (it ignored "
                    "max_tokens); the stream was cut",
                    channel.name,
                    ticket.max_tokens,
                )
            if state != "upstream failed":
                self.router.succeeded(channel)
            if state == "complete" and tracker.usage is not None:
                usage: Usage | dict[str, Any] = tracker.usage
            else:
                usage = self._delivered_usage(ticket, tracker)
            settle = False
            await self._settle(ticket, usage, outcome)
            outcome.status = state
            if state != "disconnected":
                if not started:
                    await self._start_stream(send, ticket, response)
                tail = tracker.tail
                if state == "upstream failed":
                    log.warning("upstream %s failed mid-stream: %s", channel.name, failure)
                    tail = error_event(
                        f"The upstream failed during the answer ({failure}); the answer is "
                        "incomplete. You were charged for the part you received."
                    )
                elif tracker.cut and call.client_usage:
                    tracker.with_usage(
                        {
                            "prompt_tokens": outcome.prompt_tokens,
                            "completion_tokens": outcome.completion_tokens,
                            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
                        }
                    )
                    tail = tracker.tail
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            return 200
        finally:
            self.metrics.streams.dec()
            self.flights.pop(ticket.id, None)
            if not gone.done():
                gone.cancel()
            response.close()
            if settle:
                # cancelled (shutdown) or failed half way: charge what reached the client
                await self._settle_quietly(ticket, self._delivered_usage(ticket, tracker))

    async def _start_stream(self, send: Send, ticket: Ticket, response: UpstreamResponse) -> None:
        headers: Headers = [(b"content-type", response.content_type), *_STREAM_HEADERS]
        headers.extend(response.headers())
        headers.extend(ticket_headers(ticket, self.clock().timestamp()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    # -- usage ----------------------------------------------------------------------------
    def _delivered_usage(self, ticket: Ticket, tracker: StreamTracker) -> Counted:
        """What a stream delivered, counted: the prompt as reserved, the completion as
        counted but never more than the ticket allowed (the offline estimate errs high,
        and a stream never goes past its budget)."""
        counted = self.engine.counter.text(tracker.delivered_text(), ticket.model)
        return Counted(ticket.prompt_tokens, min(counted, ticket.max_tokens))

    def _reply_usage(self, call: Call, ticket: Ticket, data: bytes) -> Usage | dict[str, Any]:
        """The usage a complete answer reports, else its text counted (as for a stream)."""
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            usage = parsed.get("usage")
            if isinstance(usage, dict) and usage:
                return usage
        if not call.produces_output:
            return Counted(ticket.prompt_tokens, 0)
        texts: list[str] = []
        if isinstance(parsed, dict):
            choice_texts(parsed.get("choices"), texts)
        counted = self.engine.counter.text("".join(texts), ticket.model)
        return Counted(ticket.prompt_tokens, min(counted, ticket.max_tokens))

    async def _settle(
        self, ticket: Ticket, usage: Usage | dict[str, Any], outcome: Outcome
    ) -> list[int] | None:
        """Settle; returns the charge per hold (for exact rate-limit headers), or None if
        the store did not answer in time: the answer still goes to the client (it was
        generated), and the settle stays queued until the store takes it. Usage the
        gateway counted itself makes a row flagged `estimated`."""
        estimated = isinstance(usage, Counted)
        try:
            event = await self.engine.settle(ticket, usage, now=self.clock(), estimated=estimated)
        except StoreUnavailable as exc:
            log.warning("settle of ticket %s waits for the store: %s", ticket.id, exc)
            return None
        except InvalidInput as exc:
            # an upstream reporting nonsense usage: fall back on the reservation
            log.warning(
                "upstream reported invalid usage %s (%s); charging ticket %s at its reservation",
                shown_repr(usage),
                exc,
                ticket.id,
            )
            event = await self.engine.settle(
                ticket,
                Usage(ticket.prompt_tokens, ticket.max_tokens),
                now=self.clock(),
                estimated=True,
            )
        outcome.prompt_tokens = event.prompt_tokens
        outcome.completion_tokens = event.completion_tokens
        self.metrics.tokens(
            ticket.model, ticket.channel or "", event.prompt_tokens, event.completion_tokens
        )
        return [amount for _, amount in event.charges]

    async def _settle_quietly(self, ticket: Ticket, usage: Counted) -> None:
        try:
            await self.engine.settle(ticket, usage, now=self.clock(), estimated=True)
        except UnknownTicket:
            pass
        except Exception:
            log.exception("could not settle ticket %s", ticket.id)

    async def settle_open(self) -> int:
        """Settle every stream still open on what it delivered (at shutdown)."""
        flights = list(self.flights.values())
        for flight in flights:
            usage = self._delivered_usage(flight.ticket, flight.tracker)
            await self._settle_quietly(flight.ticket, usage)
        return len(flights)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (or the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _drain(response: UpstreamResponse) -> bytes:
    """An error answer's body, or nothing if it breaks off."""
    with contextlib.suppress(UpstreamFailure):
        return await response.read()
    return b""
