"""What operators watch: Prometheus metrics and one JSON line per request.

Metrics live in a registry of their own per gateway (several gateways in one test
process must not share counters). Labelled children are cached, since
``Counter.labels`` takes a lock and builds a key on every call. Access-log lines carry
who, what, where and how long — never a key, a prompt or an answer.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from quotagate.core.text import MAX_SHOWN, shown

access_log = logging.getLogger("quotagate.access")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "quotagate_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self._admitted = Counter(
            "quotagate_admitted",
            "Requests admitted by the quotas",
            ["model", "channel"],
            registry=r,
        )
        self._refused = Counter(
            "quotagate_refused", "Requests refused, by the kind of limit", ["limit"], registry=r
        )
        self._tokens = Counter(
            "quotagate_tokens",
            "Tokens settled, by model, channel and direction (input/output)",
            ["model", "channel", "direction"],
            registry=r,
        )
        self._upstream = Histogram(
            "quotagate_upstream_seconds",
            "Time from sending a request upstream to its response headers",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._upstream_errors = Counter(
            "quotagate_upstream_errors",
            "Failed upstream attempts (connection errors and 5xx)",
            ["channel"],
            registry=r,
        )
        self.streams = Gauge("quotagate_streams_open", "Streams in flight", registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, endpoint: str, status: int) -> None:
        self._child(self._requests, endpoint, str(status)).inc()

    def admitted(self, model: str, channel: str) -> None:
        self._child(self._admitted, model, channel).inc()

    def refused(self, limit: str) -> None:
        self._child(self._refused, limit).inc()

    def tokens(self, model: str, channel: str, prompt: int, completion: int) -> None:
        if prompt:
            self._child(self._tokens, model, channel, "input").inc(prompt)
        if completion:
            self._child(self._tokens, model, channel, "output").inc(completion)

    def upstream(self, channel: str, seconds: float) -> None:
        self._child(self._upstream, channel).observe(seconds)

    def upstream_error(self, channel: str) -> None:
        self._child(self._upstream_errors, channel).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def log_access(entry: dict[str, Any]) -> None:
    """One JSON line (JSON escapes control characters, so no value can start a line);
    text a client chose (model, path, user) is shortened to MAX_SHOWN characters."""
    if access_log.isEnabledFor(logging.INFO):
        for name, value in entry.items():
            if isinstance(value, str) and len(value) > MAX_SHOWN:
                entry[name] = shown(value)
        access_log.info(orjson.dumps(entry).decode())
