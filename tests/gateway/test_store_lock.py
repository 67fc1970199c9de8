"""The gateway while another process holds SQLite's write lock for 3 × store_timeout.

Health checks answer at once, open streams keep flowing (one ends during the lock, its
settle is written once the lock frees), a new request gets 503 ``store_unavailable`` with
``Retry-After`` after about store_timeout, and afterwards everything is in the ledger
exactly once: ``quotagate reconcile --check`` is clean and no ticket is left pending.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.store_loop_locker import write_lock_held
from tests.support.upstream import RunningUpstream

pytestmark = pytest.mark.timeout(120)

STORE_TIMEOUT = 1.0
LOCK_SECONDS = 3 * STORE_TIMEOUT
CHUNK_DELAY = 0.1
MESSAGES: Any = [{"role": "user", "content": "tell me a long story"}]


class Reading(threading.Thread):
    """Reads a stream to its end on a thread of its own, noting when each chunk came."""

    def __init__(self, client: openai.OpenAI, events: int) -> None:
        super().__init__(daemon=True)
        self.stream = client.chat.completions.create(
            model="demo-model", messages=MESSAGES, max_tokens=events, stream=True
        )
        self.arrived: list[float] = []
        self.finish: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.stream:
                self.arrived.append(time.monotonic())
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
        except BaseException as exc:
            self.error = exc


def within(arrived: list[float], start: float, end: float) -> list[float]:
    return [t for t in arrived if start <= t <= end]


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def reconcile_check(database: Path) -> subprocess.CompletedProcess[str]:
    script = shutil.which("quotagate", path=str(Path(sys.executable).parent))
    assert script is not None, "the quotagate console script is not installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_CONFIG"] = str(database.parent / "none.toml")
    return subprocess.run(
        [script, "--database", str(database), "reconcile", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_store_unavailable(status: int, headers: httpx.Headers, body: Any) -> None:
    assert status == 503, body
    assert body["error"]["code"] == "store_unavailable"
    assert body["error"]["type"] == "server_error"
    assert headers["retry-after"] == "1"


async def test_a_held_write_lock_freezes_nothing_and_loses_nothing(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    upstream.knobs.chunk_delay = CHUNK_DELAY
    upstream.knobs.default_tokens = 1000  # replies as long as max_tokens
    models = ["demo-model"]
    with running_gateway(
        tmp_path, [channel("main", upstream, models)], store_timeout=STORE_TIMEOUT
    ) as gw:
        await run_during_a_held_lock(gw, tmp_path / "quotagate.db")


async def run_during_a_held_lock(gw: RunningGateway, database: Path) -> None:
    client = gw.client(gw.key("alice"))
    quota_key = gw.key("openwebui", trusted_openwebui=True)
    client.chat.completions.create(model="demo-model", messages=MESSAGES, max_tokens=5)
    # both admitted before the lock: the long one outlives it, the short one ends in it
    long = Reading(client, events=int((LOCK_SECONDS + 2) / CHUNK_DELAY))
    short = Reading(client, events=int(STORE_TIMEOUT / CHUNK_DELAY))
    long.start()
    short.start()
    with write_lock_held(database):
        locked = time.monotonic()
        for _ in range(5):
            started = time.monotonic()
            health = gw.http.get(f"{gw.root_url}/healthz")
            assert health.status_code == 200
            assert time.monotonic() - started < 0.25, "the health check waited"
            time.sleep(0.05)

        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="demo-model", messages=MESSAGES, max_tokens=5)
        spent = time.monotonic() - started
        response = refused.value.response
        assert_store_unavailable(response.status_code, response.headers, response.json())
        assert 0.8 * STORE_TIMEOUT <= spent < STORE_TIMEOUT + 1.0

        started = time.monotonic()
        admit = gw.http.post(
            f"{gw.root_url}/v1/quota/admit",
            headers={"authorization": f"Bearer {quota_key}"},
            json={"user": {"id": "someone-new"}, "model": "demo-model", "max_tokens": 5},
        )
        spent = time.monotonic() - started
        assert_store_unavailable(admit.status_code, admit.headers, admit.json())
        assert spent < STORE_TIMEOUT + 1.0

        started = time.monotonic()
        gw.http.get(f"{gw.root_url}/readyz")
        assert time.monotonic() - started < STORE_TIMEOUT + 0.5

        short.join(timeout=STORE_TIMEOUT * 3)
        assert not short.is_alive(), "a stream that ended during the lock never finished"
        time.sleep(max(0.0, locked + LOCK_SECONDS - time.monotonic()))
        unlocked = time.monotonic()
    long.join(timeout=30)
    for stream in (long, short):
        assert stream.error is None, stream.error
        assert stream.finish == "length"
    flowing = within(long.arrived, locked, unlocked)
    assert len(flowing) >= LOCK_SECONDS / CHUNK_DELAY / 2, "the stream stalled during the lock"
    assert longest_gap([locked, *flowing, unlocked]) < 0.5

    after = client.chat.completions.create(model="demo-model", messages=MESSAGES, max_tokens=5)
    assert after.choices[0].message.content
    admitted = 4  # before, the long and the short stream, after
    events = await gw.settled(admitted, timeout=10)
    assert len(events) == admitted
    assert len({e.ticket_id for e in events}) == admitted
    assert all(e.status == "settled" for e in events)
    assert sorted(e.completion_tokens for e in events) == sorted(
        [5, 5, int(STORE_TIMEOUT / CHUNK_DELAY), int((LOCK_SECONDS + 2) / CHUNK_DELAY)]
    )
    assert await gw.pending() == 0
    check = reconcile_check(database)
    assert check.returncode == 0, check.stdout + check.stderr
