"""A refusal in words a person understands: which limit, what is left, when it frees up.

Every front door says it the same way: the gateway's 429 message, the quota API's (which
the Open WebUI filters show as they are) and anything built on the library. The limit is
named by what it means to the person ("your daily token allowance", "the daily token cap
of model gpt-4o"), not by its catalog label; the reset is told in the limit's timezone
(the configured one for windows without their own); "needs" is what the decision refused,
the prompt plus the least completion it would have been admitted with.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from quotagate.core.errors import Refusal
from quotagate.core.limits import format_amount
from quotagate.core.windows import zone

_ADJECTIVES = {
    "minute": "per-minute",
    "hour": "hourly",
    "day": "daily",
    "week": "weekly",
    "month": "monthly",
    "lifetime": "lifetime",
}
_SPANS = ((604800, "week"), (86400, "day"), (3600, "hour"), (60, "minute"))


def explain(refusal: Refusal, now: datetime) -> str:
    """The sentence of a refusal, e.g. "Your daily token allowance is used up: 50,000 of
    50,000 tokens used, 0 left. It resets at 00:00 Europe/Berlin (in 3 h 12 min)."."""
    what = limit_name(refusal)
    unit = refusal.metric.replace("_", " ")
    used = refusal.used + refusal.reserved

    def amount(value: int) -> str:
        return format_amount(refusal.metric, value)

    left = refusal.remaining
    if left:
        text = f"This request does not fit in {what}"
    else:
        text = f"{what[0].upper()}{what[1:]} is used up"
    text += f": {amount(used)} of {amount(refusal.amount)} {unit} used"
    if refusal.reserved:
        text += f" ({amount(refusal.reserved)} held by requests in progress)"
    text += f", {amount(left)} left"
    never = refusal.requested > refusal.amount
    if never:
        text += f"; this request alone needs at least {amount(refusal.requested)}, more than "
        text += "the whole limit"
    elif left:
        text += f"; this request needs at least {amount(refusal.requested)}"
    return f"{text}. {_when(refusal, now, never)}"


def limit_name(refusal: Refusal) -> str:
    """What the refusing limit is to the person asking: "your daily token allowance"."""
    period = _period(refusal)
    unit = refusal.metric.removesuffix("s").replace("_", " ")
    target = refusal.target
    scope = refusal.scope or "allowance"
    if scope == "allowance":
        return f"your {period} {unit} allowance"
    if scope == "wallet":
        return "your credit wallet"
    if scope == "key":
        return f"your API key's {period} {unit} limit"
    if scope == "model":
        if refusal.per_user:
            return f"your {period} {unit} limit for model {target}"
        return f"the {period} {unit} cap of model {target}, shared by everyone"
    if scope == "pool":
        if refusal.per_user:
            return f"your {period} {unit} share of pool {target}"
        return f"the {period} {unit} budget of pool {target}, shared by its members"
    if scope == "channel":
        return f"the {period} {unit} capacity of upstream channel {target}"
    return f"the {period} {unit} limit"


def _period(refusal: Refusal) -> str:
    """ "daily", "hourly", "5-hour rolling"."""
    if refusal.window_kind == "rolling" and refusal.window_seconds:
        seconds = refusal.window_seconds
        for size, name in _SPANS:
            if seconds % size == 0:
                return f"{seconds // size}-{name} rolling"
        return f"{seconds}-second rolling"
    return _ADJECTIVES.get(refusal.window_kind, refusal.window)


def _when(refusal: Refusal, now: datetime, never: bool) -> str:
    resets = refusal.resets_at
    if resets is None:
        return "It does not reset."
    moment = local_moment(resets, refusal.timezone, now)
    wait = f"in {human_duration((resets - now).total_seconds())}"
    if refusal.window_kind == "rolling" and not never:
        if resets <= now:
            return "It has room for this request again now."
        return f"It has room for this request again at {moment} ({wait})."
    return f"It resets at {moment} ({wait})."


def local_moment(moment: datetime, tz: str, now: datetime) -> str:
    """ "00:00 Europe/Berlin" (seconds only when there are any; the date when it is more than
    a day away): a wall-clock time where the person is, as the configuration says."""
    local = moment.astimezone(zone(tz))
    text = local.strftime("%H:%M:%S" if local.second else "%H:%M")
    if moment - now > timedelta(hours=24):
        text = local.strftime("%a %d %b ") + text
    return f"{text} {tz}"


def human_duration(seconds: float) -> str:
    """ "45 s", "12 min 5 s", "3 h 12 min", "2 d 4 h": how long to wait, rounded up."""
    whole = max(0, math.ceil(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    minutes = math.ceil(whole / 60)
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
