"""Telling clients where they stand: ``x-ratelimit-*`` headers and the 429 of a refusal.

The headers follow OpenAI's names so that SDKs and dashboards built for it read them:
``x-ratelimit-limit-tokens``, ``-remaining-tokens``, ``-reset-tokens`` (a duration such
as ``6m0s``) and the same for requests, each for the tightest limit of its kind. They are
computed from the ticket, which carries what each limit had left when it was admitted,
so no counter is read again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from quotagate.core.errors import Refusal
from quotagate.core.explain import explain
from quotagate.core.limits import Metric
from quotagate.engine import Ticket
from quotagate.gateway.asgi import Headers
from quotagate.gateway.errors import ApiError

_TOKEN_METRICS = (Metric.TOKENS, Metric.INPUT_TOKENS, Metric.OUTPUT_TOKENS)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``5h3m20s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ticket_headers(ticket: Ticket, now: float, charged: Sequence[int] | None = None) -> Headers:
    """Headers for the tightest token limit and the tightest request limit of `ticket`.

    Without `charged` the remaining amount assumes the whole reservation is spent (a
    stream's headers leave before its usage is known); with the settled charges per hold
    it is exact.
    """
    tokens: tuple[int, int, float | None] | None = None
    requests: tuple[int, int, float | None] | None = None
    for index, hold in enumerate(ticket.holds):
        if hold.limit is None or hold.remaining is None:
            continue
        left = hold.remaining
        if charged is not None and index < len(charged):
            left = max(0, left + hold.reserved - charged[index])
        if hold.metric in _TOKEN_METRICS:
            if tokens is None or left < tokens[1]:
                tokens = (hold.limit, left, hold.resets_at)
        elif hold.metric is Metric.REQUESTS and (requests is None or left < requests[1]):
            requests = (hold.limit, left, hold.resets_at)
    out: Headers = []
    for kind, found in ((b"tokens", tokens), (b"requests", requests)):
        if found is None:
            continue
        limit, left, resets = found
        out.append((b"x-ratelimit-limit-" + kind, b"%d" % limit))
        out.append((b"x-ratelimit-remaining-" + kind, b"%d" % left))
        if resets is not None:
            out.append((b"x-ratelimit-reset-" + kind, duration(resets - now).encode()))
    return out


def refusal_error(refusal: Refusal, now: datetime) -> ApiError:
    """The 429 of a refusal: OpenAI's body, Retry-After, and the limit's headers.

    A window up to an hour long is a rate limit (`rate_limit_exceeded`, which the openai
    SDK may retry); longer ones are quotas (`insufficient_quota`, `x-should-retry: false`)
    — :attr:`Window.is_rate_limit`, by the window's length whatever the metric.
    """
    wait = (refusal.resets_at - now).total_seconds() if refusal.resets_at else None
    rate = refusal.rate_limit
    kind = "rate_limit_exceeded" if rate else "insufficient_quota"
    message = explain(refusal, now)
    headers: Headers = []
    if wait is not None:
        headers.append((b"retry-after", b"%d" % max(1, math.ceil(wait))))
    if not rate:
        # the openai SDK retries a 429 unless told not to; a quota that resets tomorrow
        # is not worth three quick retries
        headers.append((b"x-should-retry", b"false"))
    metric = Metric(refusal.metric)
    suffix = (
        b"tokens"
        if metric in _TOKEN_METRICS
        else b"requests"
        if metric is Metric.REQUESTS
        else None
    )
    if suffix is not None:
        headers.append((b"x-ratelimit-limit-" + suffix, b"%d" % refusal.amount))
        headers.append((b"x-ratelimit-remaining-" + suffix, b"%d" % refusal.remaining))
        if wait is not None:
            headers.append((b"x-ratelimit-reset-" + suffix, duration(wait).encode()))
    scope = refusal.scope or "allowance"
    return ApiError(
        429,
        message,
        kind,
        kind,
        None,
        headers,
        reason=f"{scope}:{refusal.metric}/{refusal.window}",
    )
