"""Gateway benchmark: what QuotaGate's proxy costs, next to the upstream alone and LiteLLM.

Run from the project root::

    .venv/bin/python bench/gateway.py            # full run (~2 minutes plus a first install)
    .venv/bin/python bench/gateway.py --quick    # shorter cells, c=1 and c=64 only
    .venv/bin/python bench/gateway.py --skip-litellm --duration 3

What it does, all on 127.0.0.1, every child in its own process group and killed at the end
(also on Ctrl-C or an error):

1. starts the mock upstream — ``quotagate.gateway.demo:app`` (deterministic, zero delay, 20
   tokens per answer) — under uvicorn+uvloop+httptools or granian (``--upstream-server``);
2. creates a private SQLite QuotaGate database in a temporary directory with a user, a
   generous daily token allowance plus a requests-per-minute limit (so quotas are *on*: every
   request reserves and settles two counters) and an API key, then starts
   ``quotagate serve`` against the mock upstream (see :func:`start_quotagate`);
3. installs LiteLLM's proxy into ``bench/.venv-litellm`` if it is not there yet and starts it
   offline without a database (one model pointing at the mock upstream, a master key);
4. for streaming and non-streaming × concurrency 1, 16, 64 and each target in turn runs a
   closed-loop load (each of ``c`` workers keeps one keep-alive connection and sends the next
   request when the previous answer ended) for ``--duration`` seconds or ``--max-requests``,
   whichever comes first, after a short warm-up; prints requests/s, p50/p99 latency (to the
   last byte, ``data: [DONE]`` checked for streams), errors, and the server's CPU time per
   request (from /proc, so noise from other programs on the machine does not inflate it);
5. prints the two ratios the gateway issue targets: QuotaGate's added p50 latency at c=1
   versus the upstream directly (target < 2 ms), and QuotaGate's throughput over LiteLLM's
   at c=64 (target >= 3).

The load generator's default client is a minimal HTTP/1.1 client on asyncio+uvloop with
httptools' parser (``--client raw``); ``--client aiohttp`` is there to compare. On a small
machine the client shares the CPU with the servers, so the lighter the client, the more the
figures say about the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_SPEC = "litellm[proxy]"
MODEL = "demo-model"
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM_KEY = "sk-bench-litellm"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROMPT = [{"role": "user", "content": "Say hello to the benchmark in twenty words"}]


# -- child processes ----------------------------------------------------------------------------


@dataclass
class Child:
    """A server started by this script, in a process group of its own."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session=True makes the child its group's leader

    def cpu_seconds(self) -> float:
        """User+system CPU time of every live process in the child's process group."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15.
            if int(fields[2]) == self.pgid:
                total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Children:
    """Starts servers and guarantees they are all gone when the block ends."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Child:
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for child in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=3)
        self.children.clear()


def _signal_group(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pgid, sig)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment for servers: ours, minus proxies (everything is on loopback)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        and not k.startswith(("QUOTAGATE_", "LITELLM_", "DATABASE_URL"))
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_ready(
    child: Child, url: str, timeout: float, headers: dict[str, str] | None = None
) -> None:
    """Poll `url` until it answers 200; fail with the child's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited with {child.proc.returncode} during start-up:\n{child.tail()}"
            )
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(
        f"{child.name} not ready at {url} after {timeout:.0f}s ({last}):\n{child.tail()}"
    )


# -- targets ------------------------------------------------------------------------------------


@dataclass
class Target:
    """Something the load generator can hit: where, with which key, and the serving process."""

    name: str
    base_url: str  # http://127.0.0.1:PORT/v1
    api_key: str
    child: Child
    note: str = ""

    @property
    def port(self) -> int:
        return int(self.base_url.split(":")[2].split("/")[0])

    @property
    def path_prefix(self) -> str:
        return "/" + self.base_url.split("/", 3)[3]


class TargetUnavailable(Exception):
    """A target that cannot run here; the benchmark goes on without it and says why."""


def start_upstream(children: Children, server: str) -> Target:
    """The demo upstream in its own process, as fast as we can serve it."""
    port = free_port()
    py = sys.executable
    if server == "uvicorn":
        argv = [
            py, "-m", "uvicorn", "quotagate.gateway.demo:app",
            "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning", "--lifespan", "off",
            "--timeout-keep-alive", "60", "--backlog", "4096",
        ]  # fmt: skip
    elif server == "granian":
        argv = [
            str(Path(py).parent / "granian"), "--interface", "asgi",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--loop", "uvloop", "--no-ws", "--log-level", "warning", "--no-access-log",
            "--backlog", "4096", "quotagate.gateway.demo:app",
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown upstream server {server!r}")
    child = children.start("upstream", argv, child_env(), ROOT)
    base = f"http://127.0.0.1:{port}/v1"
    wait_ready(child, f"{base}/models", 30)
    return Target("upstream", base, UPSTREAM_KEY, child, note=f"demo app under {server}")


def setup_quotagate_db(workdir: Path) -> tuple[str, str]:
    """A fresh SQLite QuotaGate database, set up as an operator would with the CLI
    (``quotagate init``, ``limits set``, ``keys create``), through the same library calls.

    The user ``bench`` gets a generous daily token allowance (it overrides the default one
    ``init`` creates) and everyone a requests-per-minute limit. Returns (database URL, key).
    """
    from quotagate.admin.setup import initialise
    from quotagate.store.factory import open_engine

    url = f"sqlite:///{workdir / 'quotagate.db'}"
    engine = open_engine(url, create=True)
    try:
        initialise(engine)
        catalog = engine.catalog
        catalog.ensure_user("bench", "user")
        catalog.set_limit("user", "bench", "tokens", "day", 10**12)
        catalog.set_limit("everyone", "*", "requests", "minute", 10**9)
        _key, secret = catalog.create_key("bench", "bench")
    finally:
        asyncio.run(engine.close())
    return url, secret


def start_quotagate(children: Children, upstream: Target, workdir: Path) -> Target:
    """QuotaGate's gateway (`quotagate serve`) with quotas on, against the mock upstream.

    The contract this relies on (see the report in docs/benchmarks.md):
    - ``quotagate serve --host 127.0.0.1 --port P`` serves the OpenAI API under ``/v1``
      and answers ``GET /readyz`` with 200 once it can serve;
    - the database comes from ``QUOTAGATE_DATABASE_URL``; the channel from the TOML file in
      ``QUOTAGATE_CONFIG`` (section written by :func:`quotagate_config`), its key from the
      environment variable the channel names.
    """
    exe = Path(sys.executable).parent / "quotagate"
    if not exe.exists():
        raise TargetUnavailable(f"{exe} not found (is the project installed in this venv?)")
    probe = subprocess.run(
        [str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60, cwd=workdir
    )
    if probe.returncode != 0:
        raise TargetUnavailable(
            "`quotagate serve` is not available yet: "
            + (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        )
    db_url, secret = setup_quotagate_db(workdir)
    config = workdir / "quotagate.toml"
    config.write_text(quotagate_config(upstream))
    port = free_port()
    env = child_env(
        QUOTAGATE_DATABASE_URL=db_url,
        QUOTAGATE_CONFIG=str(config),
        BENCH_UPSTREAM_KEY=UPSTREAM_KEY,
    )
    argv = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)]
    child = children.start("quotagate", argv, env, workdir)
    wait_ready(child, f"http://127.0.0.1:{port}/readyz", 60)
    return Target("quotagate", f"http://127.0.0.1:{port}/v1", secret, child, note="SQLite store")


def quotagate_config(upstream: Target) -> str:
    """The channel pointing QuotaGate at the mock upstream, with a (generous) daily cap of
    its own, so each request also reserves on the channel's shared counter."""
    return textwrap.dedent(
        f"""\
        [[channels]]
        name = "mock"
        base_url = "{upstream.base_url}"
        api_key_env = "BENCH_UPSTREAM_KEY"
        models = ["{MODEL}"]
        daily_token_cap = 1000000000000
        """
    )


def ensure_litellm() -> Path:
    """LiteLLM's proxy in its own cached virtualenv; returns the `litellm` executable."""
    exe = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / ".installed"
    if exe.exists() and marker.exists():
        return exe
    print(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (once; takes a few minutes) ...")
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    if not (LITELLM_VENV / "bin" / "python").exists():
        subprocess.run([str(base_python), "-m", "venv", str(LITELLM_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC],
        check=True,
        timeout=1800,
    )
    if not exe.exists():
        raise TargetUnavailable(f"{LITELLM_SPEC} installed but {exe} is missing")
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    return exe


def litellm_version() -> str:
    out = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out.stdout.strip() or "?"


def start_litellm(children: Children, upstream: Target, workdir: Path) -> Target:
    """LiteLLM's proxy, offline, no database (so no budgets), one model at the mock upstream."""
    exe = ensure_litellm()
    config = workdir / "litellm.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            model_list:
              - model_name: {MODEL}
                litellm_params:
                  model: openai/{MODEL}
                  api_base: {upstream.base_url}
                  api_key: {UPSTREAM_KEY}
            litellm_settings:
              telemetry: false
              set_verbose: false
              drop_params: true
            general_settings:
              master_key: {LITELLM_KEY}
            """
        )
    )
    port = free_port()
    env = child_env(
        LITELLM_LOG="ERROR",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        DISABLE_ADMIN_UI="True",
        NO_DOCS="True",
    )
    argv = [
        str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1",
    ]  # fmt: skip
    child = children.start("litellm", argv, env, workdir)
    wait_ready(
        child,
        f"http://127.0.0.1:{port}/v1/models",
        180,
        headers={"Authorization": f"Bearer {LITELLM_KEY}"},
    )
    return Target(
        "litellm",
        f"http://127.0.0.1:{port}/v1",
        LITELLM_KEY,
        child,
        note=f"litellm {litellm_version()}, no database",
    )


# -- load generation ----------------------------------------------------------------------------


def request_bytes(target: Target, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": PROMPT, "max_tokens": 20}
    if stream:
        body["stream"] = True
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {target.path_prefix}/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{target.port}\r\n"
        f"Authorization: Bearer {target.api_key}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


class BadResponse(Exception):
    pass


class RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `request` sends and waits for the whole answer."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.tail = b""
        self.keep_alive = True
        self.lost = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.tail = b""

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.tail = (self.tail + body)[-32:]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        await self.waiter
        return self.status, self.tail

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Cell:
    """The result of one (target, mode, concurrency) run."""

    target: str
    stream: bool
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_req: float
    first_error: str = ""


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


class Load:
    """A closed-loop load of `concurrency` workers against one target for a bounded time."""

    def __init__(self, target: Target, stream: bool, concurrency: int, client: str) -> None:
        self.target = target
        self.stream = stream
        self.concurrency = concurrency
        self.client = client
        self.data = request_bytes(target, stream)
        self.body = self.data.split(b"\r\n\r\n", 1)[1]
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""

    def _check(self, status: int, tail: bytes) -> str | None:
        if status != 200:
            return f"status {status}"
        if self.stream and not tail.endswith(b"data: [DONE]\n\n"):
            return f"stream ended without [DONE]: {tail[-32:]!r}"
        return None

    def _error(self, what: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = what

    async def _raw_worker(self, stop_at: float, budget: list[int], record: bool) -> None:
        loop = asyncio.get_running_loop()
        conn: RawConnection | None = None
        try:
            while budget[0] > 0 and time.perf_counter() < stop_at:
                budget[0] -= 1
                if conn is None or conn.lost or not conn.keep_alive:
                    if conn is not None:
                        conn.close()
                    _, conn = await loop.create_connection(
                        RawConnection, "127.0.0.1", self.target.port
                    )
                t0 = time.perf_counter()
                try:
                    status, tail = await asyncio.wait_for(conn.request(self.data), 30)
                except Exception as exc:
                    self._error(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = None
                    continue
                elapsed = time.perf_counter() - t0
                problem = self._check(status, tail)
                if problem:
                    self._error(problem)
                elif record:
                    self.latencies.append(elapsed)
        finally:
            if conn is not None:
                conn.close()

    async def _aiohttp_worker(
        self, session: Any, stop_at: float, budget: list[int], record: bool
    ) -> None:
        url = f"{self.target.base_url}/chat/completions"
        headers = {
            "Authorization": f"Bearer {self.target.api_key}",
            "Content-Type": "application/json",
        }
        while budget[0] > 0 and time.perf_counter() < stop_at:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=self.body, headers=headers) as resp:
                    body = await resp.read()
                    status = resp.status
            except Exception as exc:
                self._error(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t0
            problem = self._check(status, body[-32:])
            if problem:
                self._error(problem)
            elif record:
                self.latencies.append(elapsed)

    async def _phase(self, seconds: float, max_requests: int, record: bool) -> float:
        stop_at = time.perf_counter() + seconds
        budget = [max_requests]
        t0 = time.perf_counter()
        if self.client == "raw":
            coros = [self._raw_worker(stop_at, budget, record) for _ in range(self.concurrency)]
            await asyncio.wait_for(asyncio.gather(*coros), seconds + 60)
        else:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                coros = [
                    self._aiohttp_worker(session, stop_at, budget, record)
                    for _ in range(self.concurrency)
                ]
                await asyncio.wait_for(asyncio.gather(*coros), seconds + 60)
        return time.perf_counter() - t0

    async def run(self, seconds: float, warmup: float, max_requests: int) -> Cell:
        await self._phase(warmup, max_requests, record=False)
        self.errors, self.first_error = 0, ""
        cpu0 = self.target.child.cpu_seconds()
        elapsed = await self._phase(seconds, max_requests, record=True)
        cpu = self.target.child.cpu_seconds() - cpu0
        lat = sorted(self.latencies)
        n = len(lat)
        return Cell(
            target=self.target.name,
            stream=self.stream,
            concurrency=self.concurrency,
            requests=n,
            errors=self.errors,
            seconds=round(elapsed, 3),
            rps=round(n / elapsed, 1) if elapsed > 0 else 0.0,
            p50_ms=round(percentile(lat, 0.50) * 1000, 3),
            p99_ms=round(percentile(lat, 0.99) * 1000, 3),
            cpu_ms_per_req=round(cpu * 1000 / n, 3) if n else float("nan"),
            first_error=self.first_error,
        )


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    warmup: float
    max_requests: int
    concurrency: list[int]
    modes: list[bool]
    client: str
    upstream_server: str
    skip_litellm: bool
    skip_quotagate: bool
    json_out: Path | None
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s cells, c=1 and c=64 only")
    p.add_argument("--duration", type=float, help="seconds per cell (default 5, quick 2)")
    p.add_argument("--warmup", type=float, help="untimed seconds before each cell (default 1)")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap per cell")
    p.add_argument("--concurrency", type=str, help="comma-separated (default 1,16,64)")
    p.add_argument("--mode", choices=["both", "stream", "nostream"], default="both")
    p.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--upstream-server", choices=["uvicorn", "granian"], default="uvicorn")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--skip-quotagate", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    duration = a.duration if a.duration is not None else (2.0 if a.quick else 5.0)
    warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    if a.concurrency:
        conc = [int(x) for x in a.concurrency.split(",")]
    else:
        conc = [1, 64] if a.quick else [1, 16, 64]
    modes = {"both": [False, True], "stream": [True], "nostream": [False]}[a.mode]
    if not 0 < duration <= 120 or not 0 <= warmup <= 30:
        p.error("--duration must be in (0, 120] and --warmup in [0, 30]")
    if any(not 1 <= c <= 1024 for c in conc):
        p.error("--concurrency values must be in 1..1024")
    return Options(
        duration, warmup, a.max_requests, conc, modes, a.client, a.upstream_server,
        a.skip_litellm, a.skip_quotagate, a.json,
    )  # fmt: skip


def print_cell(cell: Cell) -> None:
    err = f"  errors={cell.errors} ({cell.first_error})" if cell.errors else ""
    print(
        f"  {cell.target:<10} {'stream' if cell.stream else 'json':<6} c={cell.concurrency:<3} "
        f"{cell.rps:>9.1f} req/s  p50 {cell.p50_ms:>8.2f} ms  p99 {cell.p99_ms:>8.2f} ms  "
        f"server cpu {cell.cpu_ms_per_req:>6.2f} ms/req  n={cell.requests}{err}",
        flush=True,
    )


def summarize(cells: list[Cell], opts: Options) -> list[str]:
    def find(target: str, stream: bool, c: int) -> Cell | None:
        for cell in cells:
            if (cell.target, cell.stream, cell.concurrency) == (target, stream, c):
                return cell
        return None

    lines = []
    for stream in opts.modes:
        mode = "stream" if stream else "json"
        direct, qg = find("upstream", stream, 1), find("quotagate", stream, 1)
        if direct and qg:
            added = qg.p50_ms - direct.p50_ms
            verdict = "met" if added < 2.0 else "MISSED"
            lines.append(
                f"QuotaGate added p50 at c=1 ({mode}): {added:.2f} ms "
                f"({qg.p50_ms:.2f} vs {direct.p50_ms:.2f} direct) — target < 2 ms: {verdict}"
            )
        costs = [
            (cell.cpu_ms_per_req, cell.concurrency)
            for cell in cells
            if cell.target == "quotagate" and cell.stream == stream and cell.requests
        ]
        if costs:
            lowest = min(cpu for cpu, _ in costs)
            lines.append(
                f"QuotaGate's own CPU per request ({mode}): {lowest:.2f} ms at best "
                f"({', '.join(f'c={c}: {cpu:.2f}' for cpu, c in costs)}) — one process on a "
                f"free core would top out near {1000 / lowest:.0f} req/s"
            )
        cmax = max(opts.concurrency)
        qg, ll = find("quotagate", stream, cmax), find("litellm", stream, cmax)
        if qg and ll and ll.rps > 0:
            ratio = qg.rps / ll.rps
            verdict = "met" if ratio >= 3 else "MISSED"
            lines.append(
                f"QuotaGate / LiteLLM throughput at c={cmax} ({mode}): {ratio:.2f}x "
                f"({qg.rps:.0f} vs {ll.rps:.0f} req/s) — target >= 3x: {verdict}"
            )
    return lines


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {sys.version.split()[0]}, "
        f"load average {load[0]:.2f} at start"
    )


async def run_matrix(targets: list[Target], opts: Options) -> list[Cell]:
    cells = []
    for stream in opts.modes:
        for c in opts.concurrency:
            for target in targets:
                if target.child.proc.poll() is not None:
                    raise RuntimeError(f"{target.name} died:\n{target.child.tail()}")
                load = Load(target, stream, c, opts.client)
                cell = await load.run(opts.duration, opts.warmup, opts.max_requests)
                print_cell(cell)
                cells.append(cell)
    return cells


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C: asyncio.run cancels the load, `finally` stops servers."""
    raise KeyboardInterrupt


Starter = Callable[[Children, Target, Path], Target]


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(f"machine: {machine()}")
    print(
        f"client: {opts.client}; upstream server: {opts.upstream_server}; "
        f"{opts.duration:g} s per cell after {opts.warmup:g} s warm-up; "
        f"concurrency {opts.concurrency}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="qg-bench-"))
    children = Children(workdir)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    finished = False
    try:
        upstream = start_upstream(children, opts.upstream_server)
        targets = [upstream]
        optional: list[tuple[str, Starter, bool]] = [
            ("quotagate", start_quotagate, opts.skip_quotagate),
            ("litellm", start_litellm, opts.skip_litellm),
        ]
        for name, starter, skip in optional:
            if skip:
                continue
            try:
                targets.append(starter(children, upstream, workdir))
            except TargetUnavailable as exc:
                msg = f"{name} skipped: {exc}"
                opts.notes.append(msg)
                print(msg, flush=True)
        for t in targets:
            print(f"target {t.name}: {t.base_url} ({t.note})", flush=True)
        cells = asyncio.run(run_matrix(targets, opts))
        print()
        for line in summarize(cells, opts):
            print(line)
        for note in opts.notes:
            print(note)
        if opts.json_out:
            opts.json_out.write_text(
                json.dumps(
                    {
                        "machine": machine(),
                        "options": {k: str(v) for k, v in asdict(opts).items()},
                        "targets": {t.name: t.note for t in targets},
                        "cells": [asdict(c) for c in cells],
                        "summary": summarize(cells, opts),
                    },
                    indent=2,
                )
            )
        finished = True
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if finished:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"server logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
