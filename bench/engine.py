"""Engine throughput: admit+settle pairs per second, and whether it stays flat as the
ledger grows.

    .venv/bin/python bench/engine.py                       # memory + SQLite, 1k/100k/1M rows
    .venv/bin/python bench/engine.py --stores sqlite --rows 1000,100000 --pairs 2000

Each store gets a realistic policy, so one admit touches four counters: a base daily
token allowance plus a group grant (one combined counter), a role hourly token allowance,
a role monthly credit allowance (priced model) and a per-user daily token limit on the
model. Some users also have a funded wallet. The ledger is then pre-filled with past
usage (rows written straight into ``usage_events``, with the matching counters, so a
reconcile would find nothing to repair) and grown step by step; at each size the
benchmark runs admit+settle pairs for many users round-robin through the public
engine calls a gateway makes, in one process on one event loop.

The figure per cell is the best of ``--repeat`` rounds: the machine is shared, and the
best round is the one least disturbed by others. Per-call times are means of that round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from quotagate.core.limits import Metric
from quotagate.core.policy import User
from quotagate.core.pricing import Price, Usage
from quotagate.core.windows import Window
from quotagate.engine import AdmitContext, Engine
from quotagate.store.base import UsageEvent
from quotagate.store.factory import open_engine
from quotagate.store.memory import MemoryStore
from quotagate.store.sqlite import SQLiteStore

MODEL = "gpt-4o"
GROUP = "research"
TARGET_PAIRS_PER_SECOND = 5_000  # issue 2: SQLite, one core
HISTORY_DAYS = 30


@dataclass
class Result:
    store: str
    rows: int
    in_flight: int  # concurrent tasks making pairs
    pairs_per_second: float
    admit_us: float
    settle_us: float
    cpu_us: float  # CPU time of this process per pair: what one core could do alone
    holds: int  # counters one admit reserves on


# -- setup ---------------------------------------------------------------------------------
def configure(engine: Engine, users: list[str]) -> None:
    """The policy of a typical deployment, generous enough that nothing is refused."""
    catalog = engine.catalog
    catalog.set_limit("everyone", "*", "tokens", "day", 50_000_000)  # base allowance
    catalog.set_limit("group", GROUP, "tokens", "day", 20_000_000)  # grant on top of base
    catalog.set_limit("role", "user", "tokens", "hour", 10_000_000)  # role hourly allowance
    catalog.set_limit("role", "user", "credits", "month", 10**13)  # micro-credits
    catalog.set_limit("model", MODEL, "tokens", "day", 30_000_000, per_user=True)
    catalog.add_price(
        Price(
            model=MODEL,
            provider="openai",
            input_credits=Decimal(2500),  # $2.50 per 1M input at 1,000 credits per USD
            per_input_tokens=1_000_000,
            output_credits=Decimal(10000),
            per_output_tokens=1_000_000,
            effective_from=datetime.now(UTC) - timedelta(days=HISTORY_DAYS + 1),
        )
    )
    for index, user in enumerate(users):
        catalog.ensure_user(user, "user", groups=[GROUP] if index % 2 else [])
        if index % 10 == 0:
            catalog.top_up(user, 5_000_000_000, note="bench")
    engine.refresh()


def counter_specs(engine: Engine, user: str) -> list[tuple[str, Window, bool]]:
    """(key stem, window, counts credits) of every counter an admit of `user` on MODEL
    touches, from the engine's own resolution so the pre-filled counters are the ones it
    reads (the bench users' roles and groups are fixed by their number)."""
    policy = engine.policy()
    person = User(user, "user", (GROUP,) if int(user[1:]) % 2 else ())
    ctx = AdmitContext(user=user, model=MODEL)
    specs = (
        engine._common_specs(policy, person, ctx)
        + engine._funding_options(policy, person, ctx)[0].specs
    )
    return [(f"{s.prefix}|{s.window.key}|", s.window, s.metric is Metric.CREDITS) for s in specs]


class History:
    """Past usage: ledger rows and the counters they add up to."""

    def __init__(self, engine: Engine, users: list[str], seed: int = 7) -> None:
        self.engine = engine
        self.users = users
        self.random = random.Random(seed)
        self.written = 0
        self.now = time.time()
        self._specs: dict[str, list[tuple[str, Window, bool]]] = {}
        # (id of window, hour) → (bucket, when it expires); windows live as long as _specs
        self._buckets: dict[tuple[int, int], tuple[int, int | None]] = {}
        self._credits: dict[tuple[int, int], int] = {}

    def _bucket(self, window: Window, hour: int) -> tuple[int, int | None]:
        """The bucket of `window` a charge in the given hour since 1970 went to, and when
        that bucket expires."""
        found = self._buckets.get((id(window), hour))
        if found is None:
            bucket = window.bucket(datetime.fromtimestamp(hour * 3600 + 1800, UTC))[0]
            found = self._buckets[(id(window), hour)] = (bucket, window.expires_at(bucket))
        return found

    def _cost(self, price: Price, prompt: int, completion: int) -> int:
        found = self._credits.get((prompt, completion))
        if found is None:
            found = self._credits[(prompt, completion)] = price.cost(Usage(prompt, completion))
        return found

    def rows(self, count: int) -> tuple[list[UsageEvent], dict[str, list[Any]]]:
        """`count` more ledger rows over the last HISTORY_DAYS, and the counters they add
        to: key → [used, expires_at]."""
        price = self.engine.policy().price(MODEL, datetime.now(UTC))
        assert price is not None
        events: list[UsageEvent] = []
        counters: dict[str, list[Any]] = {}
        draw = self.random.random
        for n in range(self.written, self.written + count):
            user = self.users[int(draw() * len(self.users))]
            specs = self._specs.get(user)
            if specs is None:
                specs = self._specs[user] = counter_specs(self.engine, user)
            started = self.now - 60 - draw() * HISTORY_DAYS * 86400
            hour = int(started) // 3600
            prompt, completion = 20 + 10 * int(draw() * 199), 5 + 5 * int(draw() * 160)
            credits = self._cost(price, prompt, completion)
            charges = []
            for stem, window, in_credits in specs:
                bucket, expires = self._bucket(window, hour)
                key = f"{stem}{bucket}"
                amount = credits if in_credits else prompt + completion
                charges.append((key, amount))
                counters.setdefault(key, [0, expires])[0] += amount
            events.append(
                UsageEvent(
                    ticket_id=f"history-{n}",
                    user_id=user,
                    model=MODEL,
                    started_at=started,
                    settled_at=started + 5,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    credits=credits,
                    charges=charges,
                )
            )
        self.written += count
        return events, counters


def fill_sqlite(
    store: SQLiteStore, events: list[UsageEvent], counters: dict[str, list[Any]]
) -> None:
    """Write rows straight into the ledger and counters, in one transaction."""
    conn = sqlite3.connect(store.path, isolation_level=None)
    conn.execute("PRAGMA cache_size=-262144")  # 256 MB: the ledger's indexes take random inserts
    conn.execute("PRAGMA synchronous=OFF")  # this connection only: set-up data, not requests
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO usage_events (ticket_id, user_id, key_id, model, channel, pool, source, "
        "status, estimated, started_at, settled_at, prompt_tokens, completion_tokens, "
        "cached_tokens, credits, excess, charges) "
        "VALUES (?, ?, NULL, ?, NULL, NULL, 'allowance', 'settled', 0, ?, ?, ?, ?, 0, ?, 0, ?)",
        (
            (
                e.ticket_id,
                e.user_id,
                e.model,
                e.started_at,
                e.settled_at,
                e.prompt_tokens,
                e.completion_tokens,
                e.credits,
                orjson.dumps(e.charges).decode(),
            )
            for e in events
        ),
    )
    conn.executemany(
        "INSERT INTO counters (key, used, reserved, expires_at) VALUES (?, ?, 0, ?) "
        "ON CONFLICT(key) DO UPDATE SET used = used + excluded.used",
        sorted((key, used, expires) for key, (used, expires) in counters.items()),
    )
    conn.execute("COMMIT")
    conn.close()


def fill_memory(
    store: MemoryStore, events: list[UsageEvent], counters: dict[str, list[Any]]
) -> None:
    """Put rows straight into the memory store's ledger and counters."""
    start = len(store._events)
    for offset, event in enumerate(events, start + 1):
        event.id = offset
        store._events[event.ticket_id] = event
    for key, (used, _) in counters.items():
        store._counters.setdefault(key, [0, 0])[0] += used


def ledger_rows(engine: Engine) -> int:
    store = engine.store
    if isinstance(store, SQLiteStore):
        return store._conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]
    assert isinstance(store, MemoryStore)
    return len(store._events)


# -- measurement ---------------------------------------------------------------------------
async def pairs(
    engine: Engine, users: list[str], count: int, seed: int, in_flight: int
) -> tuple[float, float, float, float, int]:
    """(seconds in all, in admit, in settle, CPU seconds, counters per admit) for `count`
    pairs, made the way a gateway makes them, by `in_flight` concurrent tasks (each does
    admit then settle, then its next pair). Admit and settle times are summed over
    pairs: at concurrency above 1 they include the wait for the batch's transaction."""
    rnd = random.Random(seed)
    spent = [0.0, 0.0]
    holds = 0
    clock = time.perf_counter

    async def client(numbers: range) -> None:
        nonlocal holds
        for i in numbers:
            ctx = AdmitContext(
                user=users[i % len(users)],
                model=MODEL,
                prompt_tokens=rnd.randint(20, 2000),
                max_tokens=rnd.choice((256, 512, 1024)),
            )
            t0 = clock()
            ticket = await engine.admit(ctx)
            t1 = clock()
            usage = {
                "prompt_tokens": ticket.prompt_tokens,
                "completion_tokens": rnd.randint(1, ticket.max_tokens),
            }
            t2 = clock()
            await engine.settle(ticket, usage)
            t3 = clock()
            spent[0] += t1 - t0
            spent[1] += t3 - t2
            holds = max(holds, len(ticket.holds))

    cpu = time.process_time()
    begin = clock()
    await asyncio.gather(*(client(range(n, count, in_flight)) for n in range(in_flight)))
    return clock() - begin, spent[0], spent[1], time.process_time() - cpu, holds


async def measure(
    engine: Engine, store: str, users: list[str], args: argparse.Namespace, in_flight: int
) -> Result:
    rows = ledger_rows(engine)
    await pairs(engine, users, min(len(users), args.pairs), rows, in_flight)  # warm caches
    best: tuple[float, float, float, float, int] | None = None
    for round_ in range(args.repeat):
        took = await pairs(engine, users, args.pairs, rows + round_ + 1, in_flight)
        if best is None or took[0] < best[0]:
            best = took
    assert best is not None
    total, admit, settle, cpu, holds = best
    per_pair = 1e6 / args.pairs
    return Result(
        store,
        rows,
        in_flight,
        args.pairs / total,
        admit * per_pair,
        settle * per_pair,
        cpu * per_pair,
        holds,
    )


async def bench_store(store: str, args: argparse.Namespace, workdir: Path) -> list[Result]:
    url = "memory://" if store == "memory" else f"sqlite:///{workdir / 'bench.db'}"
    engine = open_engine(url, create=True)
    users = [f"u{i:05d}" for i in range(args.users)]
    ledger_users = [f"u{i:05d}" for i in range(max(args.users, args.ledger_users))]
    results = []
    try:
        configure(engine, users)
        history = History(engine, ledger_users)
        for target in args.rows:
            need = target - ledger_rows(engine)
            started = time.perf_counter()
            while need > 0:
                events, counters = history.rows(min(need, 200_000))
                if isinstance(engine.store, SQLiteStore):
                    fill_sqlite(engine.store, events, counters)
                else:
                    assert isinstance(engine.store, MemoryStore)
                    fill_memory(engine.store, events, counters)
                need -= len(events)
            filled = time.perf_counter() - started
            for in_flight in args.in_flight:
                result = await measure(engine, store, users, args, in_flight)
                results.append(result)
                print(
                    f"  {store:6} {result.rows:>9,} rows (filled in {filled:5.1f} s), "
                    f"{in_flight:3} in flight: {result.pairs_per_second:7,.0f} pairs/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await engine.close()
    return results


# -- report --------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}; "
        f"sum(range(10**7)) takes {calibration():.2f} s of CPU here"
    )


def calibration() -> float:
    """CPU seconds of a fixed pure-Python loop: lets readers compare this machine with
    theirs (and a shared machine now with itself later)."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        sum(range(10**7))
        best = min(best, time.process_time() - start)
    return best


def table(results: list[Result]) -> str:
    """Markdown table; the ratios compare each size with the smallest one of the same store
    and concurrency, by wall-clock throughput and by CPU time per pair (steadier on a
    shared machine)."""
    first = min((r.rows for r in results), default=0)
    lines = [
        "| store | in flight | ledger rows | pairs/s | µs per admit | µs per settle "
        f"| CPU µs per pair | pairs/s vs {first:,} rows | CPU per pair vs {first:,} rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base: dict[tuple[str, int], Result] = {}
    for r in sorted(results, key=lambda r: (r.store, r.in_flight, r.rows)):
        b = base.setdefault((r.store, r.in_flight), r)
        lines.append(
            f"| {r.store} | {r.in_flight} | {r.rows:,} | {r.pairs_per_second:,.0f} "
            f"| {r.admit_us:,.0f} | {r.settle_us:,.0f} | {r.cpu_us:,.0f} "
            f"| {r.pairs_per_second / b.pairs_per_second:.2f} | {r.cpu_us / b.cpu_us:.2f} |"
        )
    return "\n".join(lines)


def verdict(results: list[Result]) -> str:
    """The issue's target, for each concurrency measured."""
    lines = []
    for in_flight in sorted({r.in_flight for r in results if r.store == "sqlite"}):
        sqlite = [r for r in results if r.store == "sqlite" and r.in_flight == in_flight]
        worst = min(sqlite, key=lambda r: r.pairs_per_second)
        ok = worst.pairs_per_second >= TARGET_PAIRS_PER_SECOND
        lines.append(
            f"SQLite target ≥ {TARGET_PAIRS_PER_SECOND:,} pairs/s on one core, "
            f"{in_flight} in flight: {'MET' if ok else 'NOT MET'} "
            f"(slowest: {worst.pairs_per_second:,.0f} pairs/s at {worst.rows:,} rows; "
            f"by CPU time alone {1e6 / max(r.cpu_us for r in sqlite):,.0f} pairs per CPU-second)"
        )
    return "\n".join(lines) or "SQLite not measured."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3000, help="admit+settle pairs per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per cell; best is kept")
    parser.add_argument(
        "--rows",
        type=lambda s: sorted(int(x.replace("_", "")) for x in s.split(",")),
        default=[1_000, 100_000, 1_000_000],
        help="ledger sizes, comma separated (grown in this order)",
    )
    parser.add_argument(
        "--in-flight",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 64],
        help="concurrent tasks making pairs, comma separated (1: one call at a time)",
    )
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["memory", "sqlite"])
    parser.add_argument("--users", type=int, default=1000, help="distinct users admitted")
    parser.add_argument(
        "--ledger-users", type=int, default=10_000, help="distinct users in the ledger"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite file goes")
    args = parser.parse_args(argv)
    for store in args.stores:
        if store not in ("memory", "sqlite"):
            parser.error(f"unknown store {store!r}: use memory and/or sqlite")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join([".venv/bin/python bench/engine.py", *(argv or sys.argv[1:])])
    header = f"{datetime.now(UTC):%Y-%m-%d} · {command}\n{machine()}"
    print(header, file=sys.stderr)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="qg-bench-", dir=args.dir) as tmp:
        for store in args.stores:
            results += asyncio.run(bench_store(store, args, Path(tmp)))
    holds = max((r.holds for r in results), default=0)
    print(
        f"{header}\n\nadmit+settle pairs per second, single process, one event loop, "
        f"{'/'.join(map(str, args.in_flight))} tasks in flight, "
        f"{args.users:,} users round-robin, {holds} counters per admit, "
        f"best of {args.repeat} × {args.pairs:,} pairs\n"
    )
    print(table(results))
    print(f"\n{verdict(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
