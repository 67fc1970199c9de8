"""The README's recipe with a real Open WebUI 0.12.4 and the Filter Function.

An admin names a person by the email they sign in with, gives them a role and a group in
QuotaGate, and the person keeps chatting: past the gateway's memory of them
(`openwebui_cache_seconds`) their next chats still find the admin's role and group, and
the Open WebUI group the Function sends joins them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quotagate.admin.cli import app
from quotagate.core.limits import Metric, Scope
from quotagate.openwebui import FUNCTION_ID, function_source
from tests.gateway.harness import RunningGateway, running_gateway
from tests.openwebui.harness import run_openwebui
from tests.support.upstream import running_upstream

pytestmark = pytest.mark.openwebui

MODEL = "demo-model"
CACHE = 0.5


def admin(gw: RunningGateway, *args: str) -> str:
    database = gw.engine.catalog.db.url.database
    assert database is not None
    result = CliRunner().invoke(app, ["--database", database, *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def test_an_admins_role_and_group_outlive_open_webuis_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("QUOTAGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QUOTAGATE_CONFIG", str(tmp_path / "no-such-config.toml"))
    with (
        running_upstream() as up,
        running_gateway(tmp_path, auth_cache_seconds=CACHE, openwebui_cache_seconds=CACHE) as qg,
        run_openwebui(up.base_url, tmp_path / "owui") as server,
    ):
        qg.limit(Scope.EVERYONE, "*", Metric.TOKENS, "day", 10_000)
        qg.limit(Scope.ROLE, "premium", Metric.TOKENS, "day", 50_000)
        qg.limit(Scope.GROUP, "research", Metric.TOKENS, "day", 5_000)
        qg.limit(Scope.GROUP, "Staff", Metric.TOKENS, "day", 1_000)
        first = server.client().signup("Ada Admin", "admin@example.com", "admin-pass-1")
        with server.client(first.token) as owui_admin:
            alice = owui_admin.add_user("Alice", "alice@example.com", "alice-pass-1")
            owui_admin.create_public_model(MODEL)
            owui_admin.install_function(FUNCTION_ID, function_source(), "QuotaGate")
            key = qg.key("openwebui", trusted_openwebui=True)
            owui_admin.update_function_valves(
                FUNCTION_ID, {"quotagate_url": qg.root_url, "service_key": key}
            )
            staff = owui_admin.raw(
                "POST", "/api/v1/groups/create", {"name": "Staff", "description": "staff"}
            )
            assert staff.status_code == 200, staff.text
            added = owui_admin.raw(
                "POST",
                f"/api/v1/groups/id/{staff.json()['id']}/users/add",
                {"user_ids": [alice.id]},
            )
            assert added.status_code == 200, added.text

        def allowance() -> int:
            status = json.loads(admin(qg, "status", "alice@example.com", "--format", "json"))
            [limit] = status["limits"]
            return int(limit["amount"])

        with server.client(alice.token) as chat:
            chat.chat(MODEL, [{"role": "user", "content": "hello"}], max_tokens=2)
            assert allowance() == 11_000  # base + Open WebUI's group Staff

            admin(qg, "users", "set-role", "alice@example.com", "premium")
            admin(qg, "users", "add-group", "alice@example.com", "research")
            for _ in range(2):
                time.sleep(CACHE * 2)
                chat.chat(MODEL, [{"role": "user", "content": "still me"}], max_tokens=2)
                assert allowance() == 56_000  # role premium + research + Staff
        user = qg.engine.catalog.user(alice.id)
        assert user is not None
        assert (user.role, user.groups, user.email) == (
            "premium",
            ("Staff", "research"),
            "alice@example.com",
        )
