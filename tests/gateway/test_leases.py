"""Requests that outlive their lease keep their reservation (issue 8, item 1.4).

The lease is for requests whose process died. A stream (or a slow answer) lasting several
leases must not be swept while it runs: its reservation keeps refusing the user's other
requests, and at the end its real usage is charged once, as a normal settlement, whatever
`on_expiry` says. The gateway renews the leases of its running requests to make it so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from quotagate.store.factory import open_engine
from tests.gateway.harness import RunningGateway, channel, running_gateway
from tests.support.upstream import RunningUpstream, free_port

pytestmark = pytest.mark.timeout(60)

LEASE = 1.5
LIMIT = 100  # the stream's reservation takes all of it
WORDS = 10  # the stream's reply: 10 tokens, one every CHUNK_DELAY
CHUNK_DELAY = 0.45  # 10 words + role, finish and usage chunks: ~5.4 s, 3.6 leases
MESSAGES: list[Any] = [{"role": "user", "content": "tell me a long story"}]


def lease_gateway(tmp_path: Path, upstream: RunningUpstream, on_expiry: str) -> Any:
    return running_gateway(
        tmp_path,
        [channel("main", upstream, ["demo-model"])],
        lease_seconds=LEASE,
        sweep_seconds=0.2,
        on_expiry=on_expiry,
    )


def refused(client: openai.OpenAI) -> bool:
    """A small request of the same user: refused (429) while the reservation holds."""
    try:
        client.chat.completions.create(model="demo-model", messages=MESSAGES, max_tokens=5)
    except openai.RateLimitError:
        return True
    return False


async def assert_charged_once(gw: RunningGateway, user: str, prompt: int, completion: int) -> None:
    [event] = await gw.settled(1, user)
    assert (event.status, event.estimated) == ("settled", False)
    assert (event.prompt_tokens, event.completion_tokens) == (prompt, completion)
    assert await gw.pending() == 0
    counters = await gw.counters()
    assert all(reserved == 0 for _, reserved in counters.values())
    assert await gw.reader.reconcile(repair=False) == []
    # and the room it did not use is free again
    client = gw.client(gw.key(user))
    assert not refused(client)


def no_lease_warnings(caplog: pytest.LogCaptureFixture) -> None:
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in messages if "expired" in m or "late settle" in m], messages


@pytest.mark.parametrize("on_expiry", ["charge", "release"])
async def test_a_stream_lasting_several_leases_keeps_its_reservation(
    tmp_path: Path,
    upstream: RunningUpstream,
    on_expiry: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="quotagate")
    upstream.knobs.default_tokens = WORDS
    upstream.knobs.chunk_delay = CHUNK_DELAY
    with lease_gateway(tmp_path, upstream, on_expiry) as gw:
        gw.limit("user", "alice", "tokens", "day", LIMIT)
        client = gw.client(gw.key("alice"))
        begun = time.monotonic()
        stream = client.chat.completions.create(
            model="demo-model",
            messages=MESSAGES,
            max_tokens=500,  # clamped to what is left: all of LIMIT
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, probes = [], None, []
        for chunk in stream:
            text += [c.delta.content or "" for c in chunk.choices]
            if chunk.usage is not None:  # the stream may be settled from here on
                usage = chunk.usage
                continue
            probes.append(refused(client))
            assert await gw.pending() == 1
        lasted = time.monotonic() - begun
        assert lasted > 3 * LEASE
        assert len(probes) >= WORDS and all(probes), probes
        assert usage is not None and usage.completion_tokens == WORDS
        assert len("".join(text).split()) == WORDS
        await assert_charged_once(gw, "alice", usage.prompt_tokens, WORDS)
    no_lease_warnings(caplog)


async def test_a_slow_answer_keeps_its_reservation(
    tmp_path: Path, upstream: RunningUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only streams: a non-streamed answer that takes several leases to come."""
    caplog.set_level(logging.WARNING, logger="quotagate")
    upstream.knobs.default_tokens = WORDS
    upstream.knobs.first_byte_delay = 3 * LEASE
    with lease_gateway(tmp_path, upstream, "release") as gw:
        gw.limit("user", "bob", "tokens", "day", LIMIT)
        client = gw.client(gw.key("bob"))
        answers: list[Any] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                client.chat.completions.create(
                    model="demo-model", messages=MESSAGES, max_tokens=500
                )
            )
        )
        slow.start()
        deadline = time.monotonic() + 2.5 * LEASE
        while await gw.pending() == 0:
            time.sleep(0.02)
        upstream.knobs.first_byte_delay = 0.0  # the probes are answered at once
        probes = []
        while time.monotonic() < deadline:
            probes.append(refused(client))
            time.sleep(0.25)
        slow.join(timeout=20)
        assert len(probes) >= 5 and all(probes), probes
        [answer] = answers
        assert answer.usage.completion_tokens == WORDS
        await assert_charged_once(gw, "bob", answer.usage.prompt_tokens, WORDS)
    no_lease_warnings(caplog)


async def test_a_killed_gateways_ticket_is_swept_by_another_process_after_the_lease(
    tmp_path: Path, upstream: RunningUpstream
) -> None:
    """Renewal is what a live process does: SIGKILL the gateway mid-stream and its ticket
    stops being renewed, so another process sweeps it once the lease it had runs out."""
    upstream.knobs.default_tokens = 200
    upstream.knobs.chunk_delay = 0.1
    url = f"sqlite:///{tmp_path / 'quotagate.db'}"
    config = tmp_path / "quotagate.toml"
    config.write_text(
        f'database_url = "{url}"\nlease_seconds = {LEASE}\nsweep_seconds = 0.2\n'
        'on_expiry = "charge"\naccess_log = false\n'
        f'[[channels]]\nname = "main"\nbase_url = "{upstream.base_url}"\n'
        'models = ["demo-model"]\n'
    )
    setup = open_engine(url, create=True)
    setup.catalog.set_limit("user", "carol", "tokens", "day", LIMIT)
    _, key = setup.catalog.create_key("carol", "test")
    await setup.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_CONFIG"] = str(config)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "quotagate"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sweeper = open_engine(url, create=False, lease_seconds=LEASE, on_expiry="charge")
    try:
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.communicate()[1]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{root}/healthz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        body = {"model": "demo-model", "messages": MESSAGES, "stream": True, "max_tokens": 500}
        headers = {"Authorization": f"Bearer {key}"}
        leases: list[float] = []
        with (
            httpx.Client(timeout=20) as http,
            http.stream("POST", f"{root}/v1/chat/completions", json=body, headers=headers) as r,
        ):
            assert r.status_code == 200
            chunks = r.iter_raw()
            begun = time.monotonic()
            while time.monotonic() - begun < 2.5 * LEASE:  # alive: renewed
                next(chunks)
                pending = await sweeper.store.expired(float("inf"))
                leases += [t.expires_at for t in pending]
            server.kill()
            server.wait(timeout=10)
        [ticket] = await sweeper.store.expired(float("inf"))
        assert len(set(leases)) > 2, "the live gateway renewed the lease"
        assert ticket.expires_at > min(leases) + LEASE
        assert await sweeper.sweep() == []  # the lease it was given is still running
        time.sleep(max(0.0, ticket.expires_at - time.time()) + 0.05)
        [swept] = await sweeper.sweep()
        assert (swept.ticket_id, swept.status, swept.estimated) == (ticket.id, "expired", True)
        assert swept.completion_tokens == ticket.max_output > 0
        assert await sweeper.store.expired(float("inf")) == []
        assert await sweeper.reconcile(repair=False) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        await sweeper.close()
