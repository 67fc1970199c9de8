"""Install and run a real Open WebUI (from PyPI) for QuotaGate's end-to-end tests.

Why a harness: the Open WebUI integration is only worth something if it is proven against the
real package, and that package is big (about 3 GB with torch) and slow to start. So it lives in
its own cached virtualenv outside the repo (installed once per machine, reused afterwards) and
each test run starts it fully offline on loopback against a local upstream.

Self-contained on purpose (stdlib + httpx): `python tests/openwebui/harness.py install` pre-warms
the cache in CI without importing pytest or QuotaGate.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

OPENWEBUI_VERSION = "0.12.4"
# The CPU build of torch this machine keeps on disk; installed first so that open-webui's
# torch requirement is already met and pip does not pull a multi-GB CUDA build.
TORCH_VERSION = "2.13.0"
STAMP_NAME = ".quotagate-installed.json"
# Open WebUI 0.12.4 access grant meaning "every signed-in user may read (use) this resource".
# (principal_type "anyone" means unauthenticated access and is silently dropped for models.)
PUBLIC_READ_GRANT = {"principal_type": "user", "principal_id": "*", "permission": "read"}


class HarnessError(RuntimeError):
    """Open WebUI could not be installed or started (tests must fail, not skip, on this)."""


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where cached virtualenvs live: $QUOTAGATE_CACHE, else ~/.cache/quotagate."""
    env = os.environ.get("QUOTAGATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "quotagate"


def venv_dir(version: str = OPENWEBUI_VERSION) -> Path:
    return cache_root() / f"openwebui-{version}"


def _expected_stamp(version: str, torch_version: str) -> dict[str, str]:
    return {"open-webui": version, "torch": torch_version}


def _read_stamp(venv: Path) -> dict[str, object] | None:
    try:
        data = json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run an install step with its output appended to the install log; raise with its tail."""
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise HarnessError(
            f"install step failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- last lines of {log_path} ---\n{tail}"
        )


def ensure_openwebui(
    version: str = OPENWEBUI_VERSION,
    torch_version: str = TORCH_VERSION,
    python: str | None = None,
    progress: bool = True,
) -> Path:
    """Return a virtualenv with open-webui==version installed, installing it if needed.

    Idempotent and safe to call from concurrent processes (a file lock serialises installers).
    A stamp file is written last, so an interrupted install has no stamp and is redone from
    scratch. `python` defaults to the interpreter running this code (3.11 here: torch's file
    on disk and open-webui both want it); QUOTAGATE_OPENWEBUI_PYTHON overrides.
    """
    python = python or os.environ.get("QUOTAGATE_OPENWEBUI_PYTHON") or sys.executable
    venv = venv_dir(version)
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f"openwebui-{version}.lock"
    log_path = venv.parent / f"openwebui-{version}.install.log"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _read_stamp(venv)
        want = _expected_stamp(version, torch_version)
        if (
            stamp is not None
            and all(stamp.get(k) == v for k, v in want.items())
            and (venv / "bin" / "open-webui").exists()
            and (venv / "bin" / "python").exists()  # False if its base interpreter is gone
        ):
            return venv
        started = time.monotonic()
        if progress:
            print(
                f"[openwebui] installing open-webui=={version} into {venv} "
                f"(several minutes, ~3 GB; log: {log_path})",
                file=sys.stderr,
                flush=True,
            )
        shutil.rmtree(venv, ignore_errors=True)
        log_path.write_text(f"install of open-webui=={version} started {time.ctime()}\n")
        # No PIP_REQUIRE_VIRTUALENV / PYTHONPATH leaking from the caller's environment.
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
        env.pop("VIRTUAL_ENV", None)
        _run_logged([python, "-m", "venv", str(venv)], log_path, env)
        vpy = str(venv / "bin" / "python")
        pip = [vpy, "-m", "pip", "install", "--no-input", "--progress-bar", "off"]
        t0 = time.monotonic()
        _run_logged([*pip, f"torch=={torch_version}"], log_path, env)
        t_torch = time.monotonic() - t0
        t0 = time.monotonic()
        _run_logged([*pip, f"open-webui=={version}"], log_path, env)
        t_owui = time.monotonic() - t0
        probe = subprocess.run(
            [
                vpy,
                "-c",
                "import importlib.metadata as m, sys; "
                "print(m.version('open-webui'), m.version('torch'), sys.version.split()[0])",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        got = probe.stdout.split()
        if probe.returncode != 0 or len(got) != 3 or got[0] != version:
            raise HarnessError(f"installed venv looks wrong: {probe.stdout!r} {probe.stderr!r}")
        if not got[1].startswith(torch_version):
            raise HarnessError(f"open-webui replaced torch {torch_version} with {got[1]}")
        seconds = round(time.monotonic() - started, 1)
        record = {
            **want,
            "python": got[2],
            "torch_installed": got[1],
            "seconds_total": seconds,
            "seconds_torch": round(t_torch, 1),
            "seconds_open_webui": round(t_owui, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = venv / (STAMP_NAME + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(venv / STAMP_NAME)
        if progress:
            print(f"[openwebui] installed in {seconds} s: {record}", file=sys.stderr, flush=True)
        return venv


def install_info(version: str = OPENWEBUI_VERSION) -> dict[str, object] | None:
    """The stamp of a finished install (timings included), or None."""
    return _read_stamp(venv_dir(version))


# --------------------------------------------------------------------------------------------
# Running a server
# --------------------------------------------------------------------------------------------

# Started instead of the `open-webui` console script: the same entry point (open_webui:app,
# a typer app whose `serve` command runs uvicorn in this process), preceded by an audit hook
# that refuses and records every attempt to resolve or connect to a non-loopback address.
# That makes "offline" a checked fact instead of a hope, and names the culprit if a new
# Open WebUI version starts phoning home (the record carries a short stack).
_LAUNCHER = r"""
import json, os, socket, sys, traceback
_NET_LOG = os.environ["QUOTAGATE_NET_LOG"]
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback", "0.0.0.0", "::", ""}

def _loopback(host):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    h = str(host).lower().strip("[]")
    return (h in _LOOPBACK_NAMES or h.startswith("127.") or h == "::1"
            or h.startswith("::ffff:127."))

def _guard(event, args):
    if event == "socket.connect":
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host = address[0]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0]
    else:
        return
    if _loopback(host):
        return
    stack = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-12:-1]]
    with open(_NET_LOG, "a") as fh:
        fh.write(json.dumps({"event": event, "host": str(host), "stack": stack}) + "\n")
    if event == "socket.connect":
        raise OSError(101, f"network unreachable (QuotaGate test harness is offline): {host}")
    raise socket.gaierror(socket.EAI_NONAME, f"offline test harness: no DNS for {host}")

sys.addaudithook(_guard)
if sys.argv[1:] == ["--migrate-only"]:
    # Importing open_webui.config runs Open WebUI's own database migrations for DATA_DIR.
    os.environ["FROM_INIT_PY"] = "true"
    import open_webui.config
    raise SystemExit(0)
sys.argv = ["open-webui", *sys.argv[1:]]
from open_webui import app
app()
"""

# Variables kept from the caller's environment; everything else is dropped so that a stray
# OPENAI_API_KEY, proxy setting or Open WebUI variable on the developer's machine cannot change
# what the tests see.
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")


def base_env(upstream_url: str, data_dir: Path, *, api_key: str = "sk-upstream") -> dict[str, str]:
    """The environment that runs Open WebUI offline against `upstream_url` (ends with /v1).

    The first block is what openwebui-facts.md was observed with; the second keeps libraries
    from reaching for the internet (telemetry, model hubs) and the log readable.
    """
    upstream_url = upstream_url.rstrip("/")
    return {
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_ENGINE": "openai",
        "RAG_OPENAI_API_BASE_URL": upstream_url,
        "RAG_OPENAI_API_KEY": "x",
        "ENABLE_OLLAMA_API": "false",
        "OPENAI_API_BASE_URL": upstream_url,
        "OPENAI_API_KEY": api_key,
        "ENABLE_API_KEYS": "true",
        "USER_PERMISSIONS_FEATURES_API_KEYS": "true",
        "ENABLE_FORWARD_USER_INFO_HEADERS": "true",
        "ENABLE_PERSISTENT_CONFIG": "false",
        # >= 32 bytes, or PyJWT warns about a short HMAC key on every sign-in.
        "WEBUI_SECRET_KEY": "quotagate-e2e-secret-key-not-for-production",
        "DATA_DIR": str(data_dir),
        # -- belt and braces: no hub, no telemetry --
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(data_dir / "cache" / "huggingface"),
        "DO_NOT_TRACK": "true",
        "SCARF_NO_ANALYTICS": "true",
        "ANONYMIZED_TELEMETRY": "false",
        "PYTHONUNBUFFERED": "1",
    }


def _server_env(
    venv: Path, env_vars: dict[str, str], net_log: Path, extra_env: dict[str, str] | None
) -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEPT_ENV if k in os.environ}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.update(env_vars)
    env["QUOTAGATE_NET_LOG"] = str(net_log)
    env.update(extra_env or {})
    return env


def _sqlite_copy(src: Path, dst: Path) -> None:
    """Copy an SQLite database consistently (WAL included) with the backup API."""
    dst.unlink(missing_ok=True)
    with (
        contextlib.closing(sqlite3.connect(src)) as a,
        contextlib.closing(sqlite3.connect(dst)) as b,
    ):
        a.backup(b)


def template_db(venv: Path | None = None) -> Path:
    """An empty Open WebUI database at the schema head, made once per install.

    Why: a fresh DATA_DIR spends 10-15 s in Open WebUI's ~70 migrations at every start. The
    template is produced by Open WebUI's own migration code (importing open_webui.config),
    so copying it into a new DATA_DIR gives exactly what a first start would have built; the
    server still runs its (now no-op) migrations itself.
    """
    venv = venv or ensure_openwebui()
    tdir = venv / ".quotagate-template"
    db = tdir / "webui.db"
    with (venv.parent / f"{venv.name}.template.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if db.exists():
            return db
        work = Path(tempfile.mkdtemp(prefix="owui-template-", dir=venv))
        try:
            log_path = work / "migrate.log"
            env = _server_env(
                venv, base_env("http://127.0.0.1:9/v1", work), work / "network.jsonl", None
            )
            with log_path.open("wb") as log:
                proc = subprocess.run(
                    [str(venv / "bin" / "python"), "-c", _LAUNCHER, "--migrate-only"],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=600,
                    check=False,
                )
            if proc.returncode != 0 or not (work / "webui.db").exists():
                raise HarnessError(
                    f"Open WebUI migrations failed (exit {proc.returncode})\n{_tail(log_path)}"
                )
            tdir.mkdir(exist_ok=True)
            _sqlite_copy(work / "webui.db", tdir / "webui.db.tmp")
            (tdir / "webui.db.tmp").replace(db)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return db


@dataclass
class OpenWebUIServer:
    """A running Open WebUI: where it listens and where its traces are."""

    base_url: str
    port: int
    data_dir: Path
    log_path: Path
    net_log_path: Path
    process: subprocess.Popen[bytes]
    startup_seconds: float
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def blocked_network(self) -> list[dict[str, Any]]:
        """Every non-loopback resolve/connect Open WebUI attempted (all were refused)."""
        if not self.net_log_path.exists():
            return []
        return [json.loads(x) for x in self.net_log_path.read_text().splitlines() if x.strip()]

    def client(self, token: str | None = None, timeout: float = 60.0) -> OpenWebUIClient:
        return OpenWebUIClient(self.base_url, token=token, timeout=timeout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminate the whole process group (uvicorn + anything it spawned), then kill it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def run_openwebui(
    upstream_url: str,
    data_dir: Path,
    *,
    api_key: str = "sk-upstream",
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
    startup_timeout: float = 300.0,
    use_template_db: bool = True,
    venv: Path | None = None,
) -> Iterator[OpenWebUIServer]:
    """Start `open-webui serve` on 127.0.0.1, wait for /health, stop its process group after.

    `upstream_url` is the OpenAI-compatible base URL (ending in /v1) Open WebUI talks to.
    `data_dir` holds its database, uploads and caches, plus `openwebui.log` (its stdout and
    stderr) and `network.jsonl` (refused network attempts). `extra_env` adds or overrides
    Open WebUI variables (e.g. BYPASS_MODEL_ACCESS_CONTROL=true). Raises HarnessError if it
    exits early or is not healthy in time, with the log's tail in the message.
    """
    venv = venv or ensure_openwebui()
    data_dir.mkdir(parents=True, exist_ok=True)
    if use_template_db and not (data_dir / "webui.db").exists():
        _sqlite_copy(template_db(venv), data_dir / "webui.db")
    port = port or _free_port()
    log_path = data_dir / "openwebui.log"
    net_log = data_dir / "network.jsonl"
    env_vars = base_env(upstream_url, data_dir, api_key=api_key)
    env = _server_env(venv, env_vars, net_log, extra_env)
    cmd = [str(venv / "bin" / "python"), "-c", _LAUNCHER]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one at the end
        )
    try:
        deadline = started + startup_timeout
        while True:
            if proc.poll() is not None:
                raise HarnessError(
                    f"open-webui exited with {proc.returncode} during start-up\n"
                    f"--- {log_path} ---\n{_tail(log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"open-webui not healthy after {startup_timeout:.0f} s\n"
                    f"--- {log_path} ---\n{_tail(log_path)}"
                )
            time.sleep(0.25)
        yield OpenWebUIServer(
            base_url=base_url,
            port=port,
            data_dir=data_dir,
            log_path=log_path,
            net_log_path=net_log,
            process=proc,
            startup_seconds=round(time.monotonic() - started, 1),
            env={**env_vars, **(extra_env or {})},
        )
    finally:
        _stop(proc)


# --------------------------------------------------------------------------------------------
# REST helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Account:
    """A signed-in Open WebUI user."""

    id: str
    email: str
    name: str
    role: str
    token: str
    password: str


class OpenWebUIClient:
    """Thin synchronous client for the Open WebUI REST calls the e2e tests need.

    Every method raises httpx.HTTPStatusError on a non-2xx answer unless it is documented to
    return the raw response; `raw()` is there for tests that assert on error statuses.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OpenWebUIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        r = self.http.request(method, path, json=body)
        if r.is_error:
            raise httpx.HTTPStatusError(
                f"{method} {path} -> {r.status_code}: {r.text[:2000]}",
                request=r.request,
                response=r,
            )
        return r.json()

    def raw(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.http.request(method, path, json=body)

    # -- accounts ---------------------------------------------------------------------------

    def signup(self, name: str, email: str, password: str) -> Account:
        """`POST /api/v1/auths/signup`; the first user of a fresh DATA_DIR becomes admin."""
        d = self._json(
            "POST", "/api/v1/auths/signup", {"name": name, "email": email, "password": password}
        )
        return Account(d["id"], d["email"], d["name"], d["role"], d["token"], password)

    def signin(self, email: str, password: str) -> Account:
        d = self._json("POST", "/api/v1/auths/signin", {"email": email, "password": password})
        return Account(d["id"], d["email"], d["name"], d["role"], d["token"], password)

    def add_user(self, name: str, email: str, password: str, role: str = "user") -> Account:
        """Admin only: `POST /api/v1/auths/add`, then sign in as the new user for a token."""
        d = self._json(
            "POST",
            "/api/v1/auths/add",
            {"name": name, "email": email, "password": password, "role": role},
        )
        acc = self.signin(email, password)
        assert acc.id == d["id"], (acc, d)
        return acc

    def users(self) -> list[dict[str, Any]]:
        """Admin only: `GET /api/v1/users/` (first page)."""
        return list(self._json("GET", "/api/v1/users/")["users"])

    def create_api_key(self) -> str:
        """`POST /api/v1/auths/api_key`: a personal `sk-...` key usable as a Bearer token.

        Needs ENABLE_API_KEYS=true and USER_PERMISSIONS_FEATURES_API_KEYS=true (set by
        base_env); requests made with it reach the upstream with X-OpenWebUI-Auth-Type api_key.
        """
        return str(self._json("POST", "/api/v1/auths/api_key")["api_key"])

    # -- models -----------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """`GET /api/models` (also rebuilds Open WebUI's in-memory model table)."""
        return list(self._json("GET", "/api/models")["data"])

    def create_public_model(
        self,
        model_id: str,
        base_model_id: str | None = None,
        name: str | None = None,
        meta: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Admin only: register a model every user may use (`POST /api/v1/models/create`).

        With `base_model_id=None` the entry overrides the upstream model of the same id (this
        is how an admin makes an upstream model public); otherwise it is a preset on top.
        """
        body = {
            "id": model_id,
            "base_model_id": base_model_id,
            "name": name or model_id,
            "meta": {"description": "QuotaGate e2e", "capabilities": {}, **(meta or {})},
            "params": params or {},
            "access_grants": [PUBLIC_READ_GRANT],
            "is_active": True,
        }
        return dict(self._json("POST", "/api/v1/models/create", body))

    # -- functions --------------------------------------------------------------------------

    def install_function(
        self,
        function_id: str,
        content: str,
        name: str | None = None,
        description: str = "",
        *,
        active: bool = True,
        is_global: bool = True,
    ) -> dict[str, Any]:
        """Admin only: create a Function from source, then activate and globalize it.

        A new function is inactive and not global; the toggles flip state, so they are only
        called when the state differs from what is wanted.
        """
        created = self._json(
            "POST",
            "/api/v1/functions/create",
            {
                "id": function_id,
                "name": name or function_id,
                "content": content,
                "meta": {"description": description, "manifest": {}},
            },
        )
        if bool(created.get("is_active")) != active:
            created = self._json("POST", f"/api/v1/functions/id/{function_id}/toggle")
        if bool(created.get("is_global")) != is_global:
            created = self._json("POST", f"/api/v1/functions/id/{function_id}/toggle/global")
        return self.function(function_id)

    def function(self, function_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/api/v1/functions/id/{function_id}"))

    def update_function_valves(self, function_id: str, valves: dict[str, Any]) -> Any:
        return self._json("POST", f"/api/v1/functions/id/{function_id}/valves/update", valves)

    # -- chat -------------------------------------------------------------------------------

    def chat(self, model: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """API path, non-streaming: `POST /api/chat/completions` -> the OpenAI JSON body."""
        body = {"model": model, "messages": messages, "stream": False, **extra}
        return dict(self._json("POST", "/api/chat/completions", body))

    def chat_stream(
        self, model: str, messages: list[dict[str, Any]], **extra: Any
    ) -> list[dict[str, Any]]:
        """API path, streaming: the parsed `data:` events (without the final [DONE]).

        Raises HarnessError if the stream does not end with `data: [DONE]`.
        """
        body = {"model": model, "messages": messages, "stream": True, **extra}
        events: list[dict[str, Any]] = []
        done = False
        with self.http.stream("POST", "/api/chat/completions", json=body) as r:
            if r.is_error:
                r.read()
                raise httpx.HTTPStatusError(
                    f"stream -> {r.status_code}: {r.text[:2000]}", request=r.request, response=r
                )
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                events.append(json.loads(data))
        if not done:
            raise HarnessError(f"stream ended without [DONE]: {events[-3:]}")
        return events

    def chat_completed(
        self,
        model: str,
        message_id: str,
        messages: list[dict[str, Any]],
        chat_id: str = "",
        session_id: str | None = None,
        **extra: Any,
    ) -> httpx.Response:
        """The deprecated `POST /api/chat/completed` (runs outlet again; raw response).

        0.12.4 needs the keys `model`, `id`, `chat_id` and `session_id` to be present (a
        missing `session_id` is a KeyError, answered 400 `{"detail": "'session_id'"}`).
        """
        body = {
            "model": model,
            "id": message_id,
            "chat_id": chat_id,
            "session_id": session_id,
            "messages": messages,
            **extra,
        }
        return self.raw("POST", "/api/chat/completed", body)

    def ui_chat_start(
        self,
        model: str,
        content: str,
        *,
        session_id: str | None = None,
        background_tasks: dict[str, bool] | None = None,
        **extra: Any,
    ) -> UIChat:
        """Start a new chat the way the 0.12.4 web UI does (the "UI path").

        Sends `session_id` (a made-up socket.io id: no socket is needed, events go to the
        user's room and into the DB), `parent_id: null` (new chat), the assistant message
        `id` and the `user_message`. Open WebUI answers at once with `{status, task_ids,
        chat_id}` and generates in a background task; see `ui_chat_wait`.
        """
        user_message_id = str(uuid.uuid4())
        assistant_id = str(uuid.uuid4())
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "session_id": session_id or f"qg-fake-socket-{uuid.uuid4().hex[:8]}",
            "parent_id": None,
            "id": assistant_id,
            "user_message": {
                "id": user_message_id,
                "parentId": None,
                "childrenIds": [],
                "role": "user",
                "content": content,
                "timestamp": int(time.time()),
                "models": [model],
            },
            "background_tasks": background_tasks
            if background_tasks is not None
            else {
                "title_generation": False,
                "tags_generation": False,
                "follow_up_generation": False,
            },
            "params": {},
            "features": {},
            **extra,
        }
        reply = dict(self._json("POST", "/api/chat/completions", body))
        return UIChat(
            chat_id=str(reply.get("chat_id")),
            assistant_id=assistant_id,
            user_message_id=user_message_id,
            session_id=body["session_id"],
            task_ids=list(reply.get("task_ids") or []),
            reply=reply,
        )

    def ui_chat_wait(self, chat: UIChat, timeout: float = 60.0) -> dict[str, Any]:
        """Poll the saved chat until the assistant message is `done`; return that message."""
        deadline = time.monotonic() + timeout
        while True:
            saved = self.get_chat(chat.chat_id)
            msg = saved["chat"]["history"]["messages"].get(chat.assistant_id) or {}
            if msg.get("done") or msg.get("error"):
                return dict(msg)
            if time.monotonic() > deadline:
                raise HarnessError(f"UI chat {chat.chat_id} not done after {timeout} s: {msg}")
            time.sleep(0.2)

    def ui_chat_stop(self, chat: UIChat) -> dict[str, Any]:
        """The UI's stop button: `POST /api/tasks/chat/{chat_id}/stop` (cancels the task)."""
        return dict(self._json("POST", f"/api/tasks/chat/{chat.chat_id}/stop"))

    def get_chat(self, chat_id: str) -> dict[str, Any]:
        """`GET /api/v1/chats/{id}`: the saved chat with its message history."""
        return dict(self._json("GET", f"/api/v1/chats/{chat_id}"))


@dataclass
class UIChat:
    """A chat started on the UI path (ids needed to find its result)."""

    chat_id: str
    assistant_id: str
    user_message_id: str
    session_id: str
    task_ids: list[str]
    reply: dict[str, Any]


def stream_text(events: list[dict[str, Any]]) -> str:
    """Concatenated `delta.content` of streamed chat chunks."""
    parts = []
    for e in events:
        for choice in e.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        venv = ensure_openwebui()
        print(venv)
        print(json.dumps(install_info(), indent=2))
        return 0
    print("usage: python tests/openwebui/harness.py install", file=sys.stderr)
    return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(_main(sys.argv[1:]))
