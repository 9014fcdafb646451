"""Claim cost as the table grows: delivery throughput (and the bare claim statement's latency) with an empty
table, then with 1,000,000 finished tasks (and their attempts) in it, in the same run.

    python3 dev.py bench claim_scaling --backend both --finished 1000000 --tasks 20000
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    LOOPBACK,
    Delivery,
    Fleet,
    Receiver,
    backends,
    bench_business,
    bench_settings,
    deliver_backlog,
    enqueue,
    fresh_database,
    header,
    percentile,
    print_worker_details,
    run_script,
    script_parser,
    table,
    task_item,
)

TOLERANCE = 0.15
_RETRY = '{"strategy": "intervals", "intervals": [1.0, 1.0], "max_attempts": 3, "max_delay": 3600.0}'
_RESPONSE = '{"status_code": 200, "headers": {}, "body": "ok", "truncated": false}'


# -- filling the table with finished tasks -------------------------------------------------------------------

_PG_TASKS = """
INSERT INTO tasks (uuid, business_pk, business_id, type, status, method, url, host, headers, body, content_type,
                   retry, attempts, max_attempts, timeout, priority, follow_redirects, next_attempt_at,
                   last_attempt_at, finished_at, last_response, outcome, created_at, updated_at)
SELECT md5('taskcenter-bench-old-' || g)::uuid, CAST(:biz AS integer), 'old-' || g, 'http', 'succeeded', 'POST',
       CAST(:url AS text), CAST(:host AS text),
       '{}'::jsonb, '{"order": 0, "bench": true}', 'application/json', CAST(:retry AS jsonb), 1, 3, 30, 0, false,
       t, t, t, CAST(:response AS jsonb), 'success', t, t
FROM generate_series(1, CAST(:n AS integer)) AS g,
     LATERAL (SELECT CAST(:start AS timestamptz) + g * interval '1 millisecond' AS t) AS ts
"""
_PG_ATTEMPTS = """
INSERT INTO attempts (task_id, number, started_at, duration_ms, request, response, outcome, worker)
SELECT id, 1, finished_at, 2, jsonb_build_object('method', 'POST', 'url', url), CAST(:response AS jsonb),
       'success', 'bench-old'
FROM tasks WHERE business_id LIKE 'old-%'
"""
# SQLite keeps UTC datetimes as naive ISO text (see UTCDateTime) and UUIDs as 32 hex digits; the zero-padded
# counter cannot collide with a random (version 4) UUID.
_SQLITE_TASKS = """
WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n)
INSERT INTO tasks (uuid, business_pk, business_id, type, status, method, url, host, headers, body, content_type,
                   retry, attempts, max_attempts, timeout, priority, follow_redirects, next_attempt_at,
                   last_attempt_at, finished_at, last_response, outcome, created_at, updated_at)
SELECT printf('%032x', x), :biz, 'old-' || x, 'http', 'succeeded', 'POST', :url, :host, '{}',
       '{"order": 0, "bench": true}', 'application/json', :retry, 1, 3, 30.0, 0, 0,
       t, t, t, :response, 'success', t, t
FROM (SELECT x, strftime('%Y-%m-%d %H:%M:%f', :start, '+' || (x / 1000.0) || ' seconds') AS t FROM g)
"""
_SQLITE_ATTEMPTS = """
INSERT INTO attempts (task_id, number, started_at, duration_ms, request, response, outcome, worker)
SELECT id, 1, finished_at, 2, json_object('method', 'POST', 'url', url), :response, 'success', 'bench-old'
FROM tasks WHERE business_id LIKE 'old-%'
"""


async def fill_finished(db_url: str, n: int, url: str, host: str) -> float:
    """Insert ``n`` succeeded tasks with one attempt each by bulk SQL, then refresh statistics; returns seconds."""
    from taskcenter.runtime import Runtime

    rt = Runtime(bench_settings(db_url))
    await rt.start()
    try:
        business = await bench_business(rt)
        start = datetime.now(UTC) - timedelta(days=30)
        params: dict[str, Any] = {
            "biz": business.pk, "url": url, "host": host, "retry": _RETRY, "response": _RESPONSE, "n": n,
        }  # fmt: skip
        began = time.perf_counter()
        if rt.db.is_postgres:
            async with rt.db.write() as conn:
                await conn.execute(sa.text(_PG_TASKS), {**params, "start": start})
                await conn.execute(sa.text(_PG_ATTEMPTS), {"response": _RESPONSE})
            # What autovacuum would have done to a table that grew this slowly: visibility map and statistics.
            async with rt.db.write_engine.connect() as conn:
                autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(sa.text("VACUUM ANALYZE tasks"))
                await autocommit.execute(sa.text("VACUUM ANALYZE attempts"))
                # ...and the checkpoints it would have gone through: otherwise the checkpoint that the fill's ~1 GB
                # of WAL forces lands inside the measured phase and writes the whole fill out meanwhile.
                await autocommit.execute(sa.text("CHECKPOINT"))
        else:
            path = sa.make_url(db_url).database or ""
            sqlite_start = start.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
            await asyncio.to_thread(_fill_sqlite, path, {**params, "start": sqlite_start})
        return time.perf_counter() - began
    finally:
        await rt.close()


def _fill_sqlite(path: str, params: dict[str, Any]) -> None:
    conn = sqlite3.connect(path, timeout=60)
    try:
        with conn:
            conn.execute(_SQLITE_TASKS, params)
            conn.execute(_SQLITE_ATTEMPTS, {"response": params["response"]})
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def table_size(db_url: str) -> int:
    from taskcenter.storage.database import Database

    db = Database(db_url, pool_size=1)
    try:
        async with db.read() as conn:
            return int((await conn.execute(sa.text("SELECT count(*) FROM tasks"))).scalar() or 0)
    finally:
        await db.close()


# -- the bare claim statement ------------------------------------------------------------------------------


async def probe_claims(db_url: str, *, rounds: int, batch: int) -> list[float]:
    """Milliseconds per ``queue.claim`` of ``batch`` tasks (no traffic admission), each batch released again.

    Runs with nothing else on the database, so it is the statement's own cost. Empty if the queue API changed.
    """
    from taskcenter.storage import leases, queue
    from taskcenter.storage.database import Database

    db = Database(db_url)
    timings: list[float] = []
    try:
        for _ in range(rounds):
            now = datetime.now(UTC)
            began = time.perf_counter()
            try:
                rows = await queue.claim(db, worker="bench-probe", now=now, limit=batch, lease_s=30.0)
            except TypeError:
                return []
            timings.append((time.perf_counter() - began) * 1000)
            await leases.release(db, worker="bench-probe", now=now, deferrals=[(r["id"], now) for r in rows])
    finally:
        await db.close()
    return timings


# -- the benchmark -----------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One delivery on whatever the table held, with the bare-claim probes and PostgreSQL's I/O counters."""

    name: str
    delivery: Delivery
    probes: list[float]
    size: int
    io: dict[str, int]

    def per_task(self, counter: str) -> str:
        value = self.io.get(counter)
        return "-" if value is None else f"{value / self.delivery.tasks:.2f}"


_PG_IO = """
SELECT s.n_tup_upd, s.n_tup_hot_upd, io.heap_blks_read, io.heap_blks_hit, io.idx_blks_read, io.idx_blks_hit
FROM pg_stat_user_tables s JOIN pg_statio_user_tables io USING (relid) WHERE s.relname = :table
"""
_IO_NAMES = ("updates", "hot_updates", "heap_read", "heap_hit", "idx_read", "idx_hit")


async def pg_io(db_url: str) -> dict[str, int]:
    """Cumulative update and buffer counters of ``tasks`` plus ``attempts`` (empty on SQLite)."""
    if not db_url.startswith("postgres"):
        return {}
    from taskcenter.storage.database import Database

    db = Database(db_url, pool_size=1)
    totals = dict.fromkeys(_IO_NAMES, 0)
    try:
        async with db.read() as conn:
            for name in ("tasks", "attempts"):
                row = (await conn.execute(sa.text(_PG_IO), {"table": name})).first()
                for key, value in zip(_IO_NAMES, row or (), strict=False):
                    totals[key] += int(value or 0)
    finally:
        await db.close()
    return totals


async def phase(fleet: Fleet, receiver: Receiver, db_url: str, name: str, args: argparse.Namespace) -> Phase:
    """A fresh backlog of ``args.tasks`` on whatever the table holds, probed, then delivered by one worker."""
    label = f"{name}-{time.monotonic_ns()}"
    count, _ = await enqueue(db_url, (task_item(i, receiver.url(), prefix=label) for i in range(args.tasks)))
    size = await table_size(db_url)
    probes = await probe_claims(db_url, rounds=args.probes, batch=100)
    await asyncio.sleep(1.5)  # let PostgreSQL's statistics collector catch up before the snapshot
    io0 = await pg_io(db_url)
    delivery = await deliver_backlog(
        fleet,
        receiver,
        db_url,
        count,
        concurrency=args.concurrency,
        name=f"claim-worker-{name}",
        timeout=max(120.0, args.tasks / 100),
    )
    await asyncio.sleep(1.5)
    io1 = await pg_io(db_url)
    return Phase(name, delivery, probes, size, {k: io1[k] - io0.get(k, 0) for k in io1})


async def scaling_once(
    fleet: Fleet, receiver: Receiver, backend: str, args: argparse.Namespace
) -> dict[str, Any]:
    db_url = await fresh_database(backend, f"claim-{backend}", args.pg_url)
    empty = await phase(fleet, receiver, db_url, "empty", args)
    print(f"   filling {args.finished:,} finished tasks ...", flush=True)
    fill_s = await fill_finished(db_url, args.finished, receiver.url(), f"{LOOPBACK}:{receiver.port}")
    full = await phase(fleet, receiver, db_url, "full", args)
    return {"backend": backend, "fill_s": fill_s, "phases": [empty, full]}


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        empty, full = r["phases"]
        for ph in (empty, full):
            d, is_full = ph.delivery, ph is full
            ratio = d.done_rate / empty.delivery.done_rate
            probe = (
                percentile(ph.probes, 50) / percentile(empty.probes, 50)
                if ph.probes and empty.probes
                else None
            )
            rows.append(
                [r["backend"], ph.name, ph.size, d.arrival_rate, d.done_rate,
                 f"{percentile(ph.probes, 50):.1f} / {percentile(ph.probes, 99):.1f}" if ph.probes else "-",
                 f"{ratio:.0%}" if is_full else "", f"{probe:.0%}" if is_full and probe else "",
                 ("pass" if abs(ratio - 1) <= TOLERANCE else "FAIL") if is_full else ""]
            )  # fmt: skip
    print(
        table(
            ["backend", "table", "tasks in table", "tasks/s (to last arrival)", "tasks/s (to all succeeded)",
             "bare claim of 100: p50 / p99 ms", "throughput full/empty", "claim p50 full/empty",
             f"verdict (within {TOLERANCE:.0%})"],
            rows,
        )
    )  # fmt: skip
    for r in results:
        print(f"{r['backend']}: filling took {r['fill_s']:.0f} s")
    io_rows = [
        [f"{r['backend']} {ph.name}", ph.per_task("updates"), ph.per_task("hot_updates"), ph.per_task("heap_read"),
         ph.per_task("idx_read"), ph.per_task("idx_hit"), f"{ph.delivery.postgres_cpu_s / ph.delivery.tasks * 1e6:.0f} us"]
        for r in results for ph in r["phases"] if ph.io
    ]  # fmt: skip
    if io_rows:
        print(
            "\nPostgreSQL per delivered task (tasks + attempts tables; blocks are 8 kB, 'read' = not in shared buffers):"
        )
        print(
            table(
                ["run", "row updates", "of which HOT", "heap blocks read", "index blocks read", "index blocks hit",
                 "backend CPU"],
                io_rows,
            )
        )  # fmt: skip
    print()
    print_worker_details([(f"{r['backend']} {ph.name}", ph.delivery) for r in results for ph in r["phases"]])


async def main(args: argparse.Namespace) -> None:
    results = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        receiver = await fleet.receiver(max_seconds=args.timeout)
        for _ in range(args.repeat):
            for backend in backends(args.backend):
                print(f"-- {backend}: empty table, then {args.finished:,} finished tasks ...", flush=True)
                results.append(await scaling_once(fleet, receiver, backend, args))
    header(
        f"claim cost vs table size: {args.tasks:,} tasks delivered by one worker (concurrency {args.concurrency}) "
        f"on an empty table and with {args.finished:,} finished tasks"
    )
    report(results)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/claim_scaling.py", __doc__, timeout=1800)
    parser.add_argument(
        "--finished", type=int, default=1_000_000, help="finished tasks added between the phases"
    )
    parser.add_argument("--tasks", type=int, default=20000, help="tasks delivered in each phase")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--probes", type=int, default=30, help="bare claims timed in each phase")
    parser.add_argument("--repeat", type=int, default=1, help="times the whole empty/fill/full sequence runs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main(parse()))
