"""QuotaGate: token quotas in front of large language models.

>>> from quotagate import Engine, AdmitContext
>>> engine = Engine.from_url("memory://")   # doctest: +SKIP
>>> ctx = AdmitContext(user="alice", model="gpt-4o", prompt="hi")  # doctest: +SKIP
>>> ticket = await engine.admit(ctx)  # doctest: +SKIP
>>> await engine.settle(ticket, {"prompt_tokens": 9, "completion_tokens": 12})  # doctest: +SKIP
"""

from quotagate.core.errors import (
    ConfigError,
    InvalidInput,
    QuotaExceeded,
    QuotaGateError,
    StoreUnavailable,
    UnknownModel,
    UnknownTicket,
)
from quotagate.core.limits import Metric, Scope
from quotagate.core.pricing import Price, Usage
from quotagate.engine import AdmitContext, Engine, LimitStatus, Ticket

__all__ = [
    "AdmitContext",
    "ConfigError",
    "Engine",
    "InvalidInput",
    "LimitStatus",
    "Metric",
    "Price",
    "QuotaExceeded",
    "QuotaGateError",
    "Scope",
    "StoreUnavailable",
    "Ticket",
    "UnknownModel",
    "UnknownTicket",
    "Usage",
]
