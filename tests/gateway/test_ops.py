"""What operators rely on: health and readiness probes, Prometheus metrics, and access
logs that say who did what without a single secret."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from tests.gateway.harness import RunningGateway
from tests.support.upstream import RunningUpstream


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()) or not wanted:
                return float(value)
    return 0.0


async def test_health_and_readiness(gw: RunningGateway) -> None:
    assert gw.http.get(f"{gw.root_url}/healthz").json() == {"status": "ok"}
    ready = gw.http.get(f"{gw.root_url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "channels": 1, "resting": 0}
    # a database that cannot be reached makes the gateway unready
    catalog = gw.gateway.engine.catalog
    working, catalog.db = catalog.db, sa.create_engine("sqlite:////nonexistent-dir/x.db")
    try:
        assert gw.http.get(f"{gw.root_url}/readyz").status_code == 503
    finally:
        catalog.db = working
    assert gw.http.get(f"{gw.root_url}/readyz").status_code == 200


async def test_metrics_count_requests_refusals_tokens_and_latency(
    gw: RunningGateway, upstream: RunningUpstream
) -> None:
    gw.limit("user", "alice", "tokens", "day", 40)
    key = gw.key("alice")
    client = gw.client(key)
    reply = client.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert reply.usage is not None
    refused = gw.http.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "demo-model", "messages": [{"role": "user", "content": "hi" * 200}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert refused.status_code == 429
    text = gw.http.get(f"{gw.root_url}/metrics").text
    assert metric(text, "quotagate_requests_total", endpoint="chat", status="200") == 1
    assert metric(text, "quotagate_requests_total", endpoint="chat", status="429") == 1
    assert metric(text, "quotagate_admitted_total", model="demo-model", channel="main") == 1
    assert metric(text, "quotagate_refused_total", limit="allowance:tokens/day") == 1
    tokens = {"model": "demo-model", "channel": "main"}
    assert metric(text, "quotagate_tokens_total", **tokens, direction="input") == (
        reply.usage.prompt_tokens
    )
    assert metric(text, "quotagate_tokens_total", **tokens, direction="output") == 8
    assert metric(text, "quotagate_upstream_seconds_count", channel="main") == 1


async def test_access_log_is_json_without_secrets(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="quotagate.access")
    key = gw.key("alice")
    gw.client(key).chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": "secret prompt"}], max_tokens=3
    )
    gw.http.post(f"{gw.base_url}/chat/completions", json={}, headers={"Authorization": "Bearer x"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "quotagate.access"]
    ok = next(line for line in lines if line["status"] == 200)
    assert ok["user"] == "alice" and ok["model"] == "demo-model" and ok["channel"] == "main"
    assert ok["key"] == key.removeprefix("qg-").split("-")[0]
    assert ok["completion_tokens"] == 3 and ok["ms"] > 0
    assert any(line["status"] == 401 for line in lines)
    assert key not in caplog.text and "secret prompt" not in caplog.text
