"""`quotagate keys`, `quotagate channels` and `quotagate serve`, run for real.

Keys and channels go through Typer's CliRunner on a real SQLite file; `serve` runs the
installed console script in a subprocess with no configuration at all, as the README's
first command does, and is called with the `openai` SDK.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner, Result

from quotagate.admin import common
from quotagate.admin.cli import app
from quotagate.gateway.demo import reply_words
from tests.gateway.harness import migrated_sqlite, running_gateway
from tests.support.upstream import RunningUpstream, free_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common.out, "width", 250)


def ok(db: Path, *args: str) -> Result:
    result = runner.invoke(app, ["--database", str(db), *args])
    assert result.exit_code == 0, result.output
    return result


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    migrated_sqlite(tmp_path)  # creates q.db's sibling; keys create works on a new file too
    created = ok(db, "keys", "create", "--user", "alice", "--model", "demo-model", "--name", "ci")
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("qg-")
    listed = ok(db, "keys", "list", "--format", "json")
    [record] = json.loads(listed.stdout)
    assert record["user"] == "alice" and record["models"] == ["demo-model"]
    assert record["name"] == "ci" and record["revoked_at"] is None
    assert secret not in listed.stdout
    assert secret not in ok(db, "keys", "list").stdout
    ok(db, "keys", "revoke", record["id"])
    assert json.loads(ok(db, "keys", "list", "--format", "json").stdout)[0]["revoked_at"]
    again = runner.invoke(app, ["--database", str(db), "keys", "revoke", record["id"]])
    assert again.exit_code == 2


def test_channels_add_list_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "q.db"
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider-secret")
    ok(
        db,
        "channels",
        "add",
        "provider",
        "--base-url",
        "https://llm.example.com/v1/",
        "--model",
        "gpt-house=gpt-4o-mini",
        "--model",
        "other",
        "--api-key-env",
        "PROVIDER_KEY",
        "--priority",
        "3",
        "--daily-token-cap",
        "1000000",
        "--rpm",
        "60",
    )
    listed = ok(db, "channels", "list", "--format", "json").stdout
    [record] = json.loads(listed)
    assert record == {
        "name": "provider",
        "source": "database",
        "base_url": "https://llm.example.com/v1",
        "key": "env:PROVIDER_KEY",
        "models": {"gpt-house": "gpt-4o-mini", "other": "other"},
        "priority": 3,
        "weight": 1,
        "daily_token_cap": 1_000_000,
        "rpm": 60,
        "tpm": None,
    }
    table = ok(db, "channels", "list").stdout
    assert "provider" in table and "1,000,000" in table
    assert "sk-provider-secret" not in listed + table
    # re-adding without --rpm drops that cap
    ok(db, "channels", "add", "provider", "--base-url", "http://x/v1", "--model", "m")
    assert json.loads(ok(db, "channels", "list", "--format", "json").stdout)[0]["rpm"] is None
    ok(db, "channels", "remove", "provider")
    assert json.loads(ok(db, "channels", "list", "--format", "json").stdout) == []
    limits = json.loads(ok(db, "limits", "list", "--format", "json").stdout)
    assert not [limit for limit in limits if limit.get("scope") == "channel"]
    bad = runner.invoke(
        app,
        ["--database", str(db), "channels", "add", "x", "--base-url", "ftp://h", "--model", "m"],
    )
    assert bad.exit_code == 2


def test_running_gateway_picks_up_a_channel_added_from_the_cli(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    with running_gateway(tmp_path) as gw:
        key = gw.key("alice")
        body = {"model": "cli-model", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {key}"}
        url = f"{gw.base_url}/chat/completions"
        assert gw.http.post(url, json=body, headers=headers).status_code == 404
        db = Path(gw.engine.store.path)  # type: ignore[attr-defined]
        ok(
            db,
            "channels",
            "add",
            "cli",
            "--base-url",
            upstream.base_url,
            "--model",
            "cli-model=demo-model",
        )
        deadline = time.monotonic() + 5
        while gw.http.post(url, json=body, headers=headers).status_code != 200:
            assert time.monotonic() < deadline, "the new channel was not picked up"
            time.sleep(0.1)
        assert upstream.requests[-1]["model"] == "demo-model"


def test_serve_with_no_configuration_runs_the_demo(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_CONFIG"] = str(tmp_path / "none.toml")
    script = Path(sys.executable).parent / "quotagate"
    server = subprocess.Popen(
        [str(script), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        # the key is made by the CLI on the database `serve` created in its directory
        made = ok(tmp_path / "quotagate.db", "keys", "create", "--user", "alice")
        secret = made.stdout.strip().splitlines()[-1]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0
        )
        reply = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert reply.choices[0].message.content == " ".join(reply_words(4))
        status = ok(tmp_path / "quotagate.db", "status", "alice", "--format", "json").stdout
        assert reply.usage is not None
        assert f'"used": {reply.usage.total_tokens}' in status
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert server.returncode in (0, -signal.SIGTERM), err
    assert "Traceback" not in err
    assert "quotagate keys create --user alice" in err  # the start-up banner
    assert "curl http://127.0.0.1:" in err
    access = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(a["path"] == "/v1/chat/completions" and a["status"] == 200 for a in access)
    assert secret not in out + err
