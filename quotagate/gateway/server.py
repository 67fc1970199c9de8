"""Running the gateway: `quotagate serve`.

uvicorn with uvloop and httptools serves the app (measured against granian on the same
app, see docs/benchmarks.md). With ``--workers N`` uvicorn starts N processes that each
build the app from :func:`build_app`; they share the SQLite store, whose reservations
are atomic across processes. With no channel configured anywhere, the demo upstream
(:mod:`quotagate.gateway.demo`) is started on a loopback port in this process and the
gateway routes to it, so a fresh machine shows quotas working at once — unless
``quota_api_only`` is set: a deployment whose Open WebUI filters only call the quota API
gets no model routes and no demo.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quotagate.config import Settings
from quotagate.engine import Engine
from quotagate.gateway.app import Gateway

log = logging.getLogger("quotagate.gateway")

#: set by `serve` for its worker processes: where the demo upstream listens
DEMO_URL_ENV = "QUOTAGATE_DEMO_URL"


def build_app() -> Gateway:
    """The app of one worker process, from the environment `serve` prepared."""
    from quotagate.gateway.demo import DEFAULT_MODELS
    from quotagate.store.factory import open_engine

    engine = open_engine()
    configure_logging(engine.settings.access_log)  # worker processes start unconfigured
    return Gateway(engine, demo_url=os.environ.get(DEMO_URL_ENV), demo_models=DEFAULT_MODELS)


def prepare_database(settings: Settings) -> tuple[Engine, bool]:
    """Open (creating and initialising on first use) the database; True if it was new."""
    from quotagate.store.factory import open_engine

    engine = open_engine(settings.database_url, create=True)
    engine.settings = settings
    engine.catalog.timezone = settings.timezone
    fresh = engine.catalog.get_meta("initialised_at") is None
    if fresh:
        try:
            from quotagate.admin.setup import initialise
        except ImportError:  # pragma: no cover - the CLI ships with the package
            return engine, fresh
        initialise(engine)
    return engine, fresh


@dataclass
class DemoServer:
    base_url: str
    thread: threading.Thread


def start_demo_upstream(host: str = "127.0.0.1") -> DemoServer:
    """The demo upstream on a free loopback port, in a thread of this process."""
    import uvicorn

    from quotagate.gateway.demo import DemoUpstream

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        DemoUpstream(),
        log_level="warning",
        access_log=False,
        lifespan="off",
        loop="asyncio",
        http="httptools",
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="demo-upstream", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    return DemoServer(f"http://{host}:{port}/v1", thread)


def configure_logging(access_log: bool) -> None:
    """JSON access lines on stdout; warnings of QuotaGate on stderr."""
    access = logging.getLogger("quotagate.access")
    access.handlers.clear()
    access.propagate = False
    if access_log:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.WARNING)
    root = logging.getLogger("quotagate")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def banner(settings: Settings, host: str, port: int, demo: DemoServer | None) -> str:
    from quotagate.gateway.channels import load_channels

    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    if settings.quota_api_only:
        return "\n".join(
            [
                f"QuotaGate quota API on {url}/v1/quota  "
                f"(database: {_database(settings.database_url)})",
                "Quota API only: no model routes and no upstream, for the Open WebUI filters.",
                "",
                "Create the filters' service key (shown once):",
                "  quotagate keys create --user openwebui --name 'Open WebUI' --trusted-openwebui",
                f"and set the filter's quotagate_url valve to {url}.",
                "",
                "Quotas: quotagate status USER | Metrics: " + url + "/metrics",
            ]
        )
    lines = [f"QuotaGate gateway on {url}/v1  (database: {_database(settings.database_url)})"]
    if demo is not None:
        from quotagate.gateway.demo import DEFAULT_MODELS

        lines.append(
            f"No channel configured: routing to the built-in demo upstream ({demo.base_url}), "
            f"models {', '.join(DEFAULT_MODELS)}."
        )
        model = DEFAULT_MODELS[0]
    else:
        from quotagate.store.factory import open_engine

        engine = open_engine(settings.database_url)
        try:
            channels = load_channels(settings, engine.catalog)
        finally:
            engine.catalog.db.dispose()
        names = ", ".join(f"{c.name} ({len(c.models)} models)" for c in channels)
        lines.append(f"Channels: {names}")
        model = next(iter(channels[0].models)) if channels and channels[0].models else "MODEL"
    lines += [
        "",
        "Create an API key (shown once):",
        "  quotagate keys create --user alice",
        "Then call it like OpenAI:",
        f"  curl {url}/v1/chat/completions \\",
        '    -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\',
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        "",
        "Quotas: quotagate status alice | Metrics: " + url + "/metrics",
    ]
    return "\n".join(lines)


def _database(url: str) -> str:
    if url.startswith("sqlite"):
        from quotagate.store.factory import sqlite_path

        return str(Path(sqlite_path(url)).resolve())
    return url.split("@")[-1]


def serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """Run the gateway until interrupted (Ctrl-C or SIGTERM: streams in flight are
    given ``graceful_shutdown_seconds`` to finish, then settled on what they delivered)."""
    import uvicorn

    from quotagate.gateway.channels import ChannelStore

    engine, _ = prepare_database(settings)
    try:
        configured = bool(settings.channels) or bool(ChannelStore(engine.catalog).list())
    finally:
        engine.catalog.db.dispose()
    demo = None if configured or settings.quota_api_only else start_demo_upstream()
    # worker processes rebuild the settings from the environment: hand over what the
    # command line decided
    os.environ["QUOTAGATE_DATABASE_URL"] = settings.database_url
    if settings.quota_api_only:
        os.environ["QUOTAGATE_QUOTA_API_ONLY"] = "true"
    if demo is not None:
        os.environ[DEMO_URL_ENV] = demo.base_url
    configure_logging(settings.access_log)
    print(banner(settings, host, port, demo), file=sys.stderr, flush=True)
    uvicorn.run(
        "quotagate.gateway.server:build_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        **uvicorn_options(settings),
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn runs the gateway: `serve` and the tests' harness both start it with
    these, so what is tested is what is served."""
    from quotagate.gateway.protocol import ConnectionLimits, protocol_factory

    return {
        "loop": "uvloop",
        # httptools, bounded against slow and greedy clients; given by reference, so that
        # the spawned worker processes of `--workers N` rebuild it
        "http": protocol_factory(ConnectionLimits.of(settings)),
        "ws": "none",  # no WebSockets: an upgrade request is an ordinary request (404)
        "lifespan": "on",
        "access_log": False,
        "proxy_headers": False,  # the gateway never looks at the client's address
        "log_level": "warning",
        "timeout_graceful_shutdown": int(settings.graceful_shutdown_seconds),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "backlog": 4096,
    }
