"""docs/openwebui.md's walk-through, as an admin follows it.

Admins name people by email (Open WebUI's users are known to QuotaGate by a UUID; the
email arrives with their first chat, from a filter or gateway mode's forwarded headers),
and a filter-only deployment runs `quotagate serve --quota-api-only`: the quota API
without model routes and without the demo upstream.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from quotagate.admin.cli import app
from quotagate.core.limits import Metric, Scope
from tests.gateway.harness import RunningGateway, running_gateway
from tests.support.upstream import free_port

ALICE = "0b6e6d43-0000-4000-8000-00000000a11c"

pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path) as gateway:
        gateway.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        yield gateway


def cli(gw: RunningGateway, *args: str) -> Result:
    database = gw.engine.catalog.db.url.database
    assert database is not None
    return CliRunner().invoke(app, ["--database", database, *args])


def first_chat(gw: RunningGateway, user_id: str, email: str) -> None:
    """What the Filter Function sends QuotaGate when a person chats (POST /v1/quota/admit)."""
    key = gw.key("openwebui", trusted_openwebui=True)
    r = gw.http.post(
        f"{gw.root_url}/v1/quota/admit",
        json={"user": {"id": user_id, "email": email, "role": "user"}, "model": "demo-model"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    assert gw.http.post(
        f"{gw.root_url}/v1/quota/cancel",
        json={"ticket": r.json()["ticket"]},
        headers={"Authorization": f"Bearer {key}"},
    ).is_success


def test_commands_take_a_users_email(gw: RunningGateway) -> None:
    first_chat(gw, ALICE, "Alice@Example.org")
    made = cli(gw, "limits", "set", "--user", "alice@example.org", "--window", "day", "200000")
    assert made.exit_code == 0, made.stderr
    assert ALICE in made.stdout
    [override] = [lim for lim in gw.engine.catalog.limits() if lim.scope is Scope.USER]
    assert override.target == ALICE
    for args in (
        ("users", "set-role", "alice@example.org", "premium"),
        ("users", "add-group", "alice@example.org", "research"),
        ("status", "alice@example.org", "--format", "json"),
        ("usage", "--user", "alice@example.org"),
        ("wallet", "top-up", "alice@example.org", "5"),
    ):
        result = cli(gw, *args)
        assert result.exit_code == 0, (args, result.stderr)
    user = gw.engine.catalog.user(ALICE)
    assert user is not None
    assert (user.role, user.groups) == ("premium", ("research",))
    assert gw.engine.catalog.wallet_funded(ALICE) == 5_000_000
    assert gw.engine.catalog.user("alice@example.org") is None  # no second "alice"


def test_an_email_two_users_share_is_refused(gw: RunningGateway) -> None:
    first_chat(gw, ALICE, "alice@example.org")
    first_chat(gw, "0b6e6d43-0000-4000-8000-00000000a11d", "alice@example.org")
    result = cli(gw, "limits", "set", "--user", "alice@example.org", "100")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: 2 users have the email 'alice@example.org'")
    assert ALICE in result.stderr
    assert [lim for lim in gw.engine.catalog.limits() if lim.scope is Scope.USER] == []


def test_a_limit_for_nobody_yet_says_so(gw: RunningGateway) -> None:
    result = cli(gw, "limits", "set", "--user", "bob@example.org", "100")
    assert result.exit_code == 0
    assert "no user has the id or email 'bob@example.org' yet" in result.stderr


def test_serve_quota_api_only(tmp_path: Path) -> None:
    """No model routes, no demo upstream; the filters' quota API and health checks work."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_CONFIG"] = str(tmp_path / "none.toml")
    script = Path(sys.executable).parent / "quotagate"
    server = subprocess.Popen(
        [str(script), "serve", "--quota-api-only", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"{root}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        db = str(tmp_path / "quotagate.db")
        made = CliRunner().invoke(
            app,
            ["--database", db, "keys", "create", "--user", "openwebui", "--trusted-openwebui"],
        )
        key = made.stdout.strip().splitlines()[-1]
        auth = {"Authorization": f"Bearer {key}"}
        chat = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{root}/v1/chat/completions", json=chat, headers=auth)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "quota_api_only"
        assert httpx.get(f"{root}/v1/models", headers=auth).status_code == 404
        admit = {"user": {"id": ALICE, "email": "alice@example.org"}, "model": "demo-model"}
        r = httpx.post(f"{root}/v1/quota/admit", json=admit, headers=auth)
        assert r.status_code == 200, r.text
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err
    assert "Quota API only" in err
    assert "demo" not in err.lower()
