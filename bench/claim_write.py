"""What the claim's write costs the database per task, in the shipped schema and in two shapes a schema redesign
could take — a what-if that prices the redesign before anyone builds it.

    python3 dev.py bench claim_write --backend both --tasks 20000 --rounds 3

The shipped claim marks each claimed task ``processing`` and sets its lease on the task's own row. On
PostgreSQL that is an update that changes an indexed column (``status``), so it is never HOT: the new row
version takes an entry in every full index of ``tasks`` and in the partial ones it enters. The finish rewrites
the row again (the outcome). ``storage_cpu`` puts the claim at ~48 us of PostgreSQL CPU per task and the finish
at ~45; this script splits off the claim's write and asks what it would cost if the lease lived

- ``hot`` (PostgreSQL only): in columns of ``tasks`` that no index names, with room on each page
  (``fillfactor`` 50), so that the claim is a HOT update that touches no index; or
- ``lease-table``: in a narrow table of its own (task id, owner, expiry), one small row inserted per claimed
  task and deleted by the finish.

Either would keep ``status`` at ``pending`` during an attempt and make ``processing`` mean "has a live lease":
every reader of the state (the API, the in-flight counts of traffic control, the rescue of expired leases) would
change with it. That is the redesign this prices; nothing here builds it.

Each round: a fresh database of ``--tasks`` due tasks created through ``TaskService.create_tasks`` (real rows),
then on one connection, batch after batch of ``--batch`` ids in id order, the variant's claim write, each in its
own transaction; then the finish of every batch (``status`` to ``succeeded``, as the shipped finish's row write,
without the attempt rows, plus the variant's lease clean-up). The selection of due ids is left out: it is the
same index walk in every variant (the lease table's would add an anti-join past the tasks in flight). The CPU is
PostgreSQL's backend's (psutil), or on SQLite this process's (the statements run in its thread). PostgreSQL's
count of HOT updates is printed beside it, as proof of what each variant did.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import sqlalchemy as sa

from bench.common import (
    BUSINESS,
    BenchError,
    Fleet,
    backends,
    bench_settings,
    fresh_database,
    header,
    run_script,
    script_parser,
    table,
    task_item,
)

VARIANTS = ("rewrite", "hot", "lease-table")
OWNER = "bench-host:1:abcdef"

_PG_SETUP = {
    "rewrite": [],
    "hot": [
        "ALTER TABLE tasks ADD COLUMN claim_owner varchar(100), ADD COLUMN claim_until timestamptz",
        "ALTER TABLE tasks SET (fillfactor = 50)",
        "VACUUM FULL tasks",
    ],
    "lease-table": [
        "CREATE TABLE leases (task_id bigint PRIMARY KEY, owner varchar(100) NOT NULL,"
        " expires_at timestamptz NOT NULL)"
    ],
}
_PG_CLAIM = {
    "rewrite": "UPDATE tasks SET status = 'processing', lease_owner = $1, lease_expires_at = $2, updated_at = $3,"
    " held_by = NULL WHERE id = ANY($4::bigint[])",
    "hot": "UPDATE tasks SET claim_owner = $1, claim_until = $2, updated_at = $3 WHERE id = ANY($4::bigint[])",
    "lease-table": "INSERT INTO leases (task_id, owner, expires_at) SELECT unnest($4::bigint[]), $1, $2"
    " WHERE $3::timestamptz IS NOT NULL",
}
_FINISH_SET = (
    "status = 'succeeded', attempts = attempts + 1, finished_at = $1, last_attempt_at = $1, updated_at = $1,"
    " outcome = 'success', last_response = $2::jsonb"
)
_PG_FINISH = {
    "rewrite": [
        f"UPDATE tasks SET {_FINISH_SET}, lease_owner = NULL, lease_expires_at = NULL"
        " WHERE id = ANY($3::bigint[])"
    ],
    "hot": [
        f"UPDATE tasks SET {_FINISH_SET}, claim_owner = NULL, claim_until = NULL WHERE id = ANY($3::bigint[])"
    ],
    "lease-table": [
        f"UPDATE tasks SET {_FINISH_SET} WHERE id = ANY($3::bigint[])",
        "DELETE FROM leases WHERE task_id = ANY($3::bigint[]) AND $1::timestamptz IS NOT NULL AND $2::text IS NOT NULL",
    ],
}
#: How many tasks the claims leased, per variant: checked after the claims (the finish then leaves none).
_LEASED = {
    "rewrite": "SELECT count(*) FROM tasks WHERE status = 'processing' AND lease_owner = '" + OWNER + "'",
    "hot": "SELECT count(*) FROM tasks WHERE claim_owner = '" + OWNER + "'",
    "lease-table": "SELECT count(*) FROM leases WHERE owner = '" + OWNER + "'",
}
_SUCCEEDED = "SELECT count(*) FROM tasks WHERE status = 'succeeded'"
_SQLITE_SETUP = {
    "rewrite": [],
    "lease-table": [
        "CREATE TABLE leases (task_id INTEGER PRIMARY KEY, owner VARCHAR(100) NOT NULL,"
        " expires_at DATETIME NOT NULL)"
    ],
}
_SQLITE_CLAIM = {
    "rewrite": "UPDATE tasks SET status = 'processing', lease_owner = ?1, lease_expires_at = ?2, updated_at = ?3,"
    " held_by = NULL WHERE id IN (SELECT value FROM json_each(?4))",
    "lease-table": "INSERT INTO leases (task_id, owner, expires_at) SELECT value, ?1, ?2 FROM json_each(?4)"
    " WHERE ?3 IS NOT NULL",
}
_SQLITE_FINISH_SET = _FINISH_SET.replace("$1", "?1").replace("$2::jsonb", "?2")
_SQLITE_FINISH = {
    "rewrite": [
        f"UPDATE tasks SET {_SQLITE_FINISH_SET}, lease_owner = NULL, lease_expires_at = NULL"
        " WHERE id IN (SELECT value FROM json_each(?3))"
    ],
    "lease-table": [
        f"UPDATE tasks SET {_SQLITE_FINISH_SET} WHERE id IN (SELECT value FROM json_each(?3))",
        "DELETE FROM leases WHERE task_id IN (SELECT value FROM json_each(?3)) AND ?1 IS NOT NULL"
        " AND ?2 IS NOT NULL",
    ],
}
RESPONSE = '{"status_code": 200, "headers": {"Content-Type": "text/plain"}, "body": "ok", "truncated": false}'


async def fill(backend: str, args: argparse.Namespace) -> str:
    """A fresh database holding ``--tasks`` due tasks, created as the API creates them."""
    from taskcenter.runtime import Runtime

    url = await fresh_database(backend, "claim-write", args.pg_url, business=True)
    rt = Runtime(bench_settings(url))
    await rt.start()
    try:
        business = await rt.service.business(BUSINESS)
        items = [task_item(n, "http://127.0.0.1:9/hook") for n in range(args.tasks)]
        for start in range(0, len(items), 1000):
            await rt.service.create_tasks(business, items[start : start + 1000])
    finally:
        await rt.close()
    return url


async def postgres_round(url: str, variant: str, args: argparse.Namespace) -> tuple[float, float, int, int]:
    """(claim CPU s, finish CPU s, updates, HOT updates) of the claim writes, on one backend."""
    import asyncpg

    parsed = sa.make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        for statement in _PG_SETUP[variant]:
            await conn.execute(statement)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("CHECKPOINT")  # no checkpoint's full-page images inside the timed part
        backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        ids = [r[0] for r in await conn.fetch("SELECT id FROM tasks ORDER BY id")]
        batches = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]
        now = datetime.now(UTC)
        until = now + timedelta(seconds=60)

        async def updates() -> tuple[int, int]:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            row = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tasks'"
            )
            return int(row[0]), int(row[1])

        upd0, hot0 = await updates()
        claim = await _timed(
            lambda: cpu(backend),
            [lambda b=b: _pg_tx(conn, [(_PG_CLAIM[variant], (OWNER, until, now, b))]) for b in batches],
        )
        upd1, hot1 = await updates()
        _check(variant, "leased", await conn.fetchval(_LEASED[variant]), len(ids))
        finish = await _timed(
            lambda: cpu(backend),
            [
                lambda b=b: _pg_tx(conn, [(s, (now, RESPONSE, b)) for s in _PG_FINISH[variant]])
                for b in batches
            ],
        )
        _check(variant, "leased after the finish", await conn.fetchval(_LEASED[variant]), 0)
        _check(variant, "succeeded", await conn.fetchval(_SUCCEEDED), len(ids))
        return claim, finish, upd1 - upd0, hot1 - hot0
    finally:
        await conn.close()


def _check(variant: str, what: str, found: int, expected: int) -> None:
    if found != expected:
        raise BenchError(f"{variant}: {found:,} tasks {what}, expected {expected:,}")


async def _pg_tx(conn: object, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    async with conn.transaction():  # type: ignore[attr-defined]
        for sql, params in statements:
            await conn.execute(sql, *params)  # type: ignore[attr-defined]


async def _timed(clock: Callable[[], float], steps: list[Callable[[], Awaitable[None]]]) -> float:
    before = clock()
    for step in steps:
        await step()
    return clock() - before


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def sqlite_round(url: str, variant: str, args: argparse.Namespace) -> tuple[float, float, int, int]:
    """(claim CPU s, finish CPU s, -, -): the statements run in this thread, as on the writer's connection."""
    import orjson

    conn = sqlite3.connect(sa.make_url(url).database or "", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        for statement in _SQLITE_SETUP[variant]:
            conn.execute(statement)
        ids = [r[0] for r in conn.execute("SELECT id FROM tasks ORDER BY id")]
        batches = [orjson.dumps(ids[i : i + args.batch]).decode() for i in range(0, len(ids), args.batch)]
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
        until = (datetime.now(UTC) + timedelta(seconds=60)).replace(tzinfo=None).isoformat(sep=" ")

        def run(statements: list[tuple[str, tuple[object, ...]]]) -> None:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")

        before = time.thread_time()
        for b in batches:
            run([(_SQLITE_CLAIM[variant], (OWNER, until, now, b))])
        claim = time.thread_time() - before
        _check(variant, "leased", conn.execute(_LEASED[variant]).fetchone()[0], len(ids))
        before = time.thread_time()
        for b in batches:
            run([(s, (now, RESPONSE, b)) for s in _SQLITE_FINISH[variant]])
        finish = time.thread_time() - before
        _check(variant, "leased after the finish", conn.execute(_LEASED[variant]).fetchone()[0], 0)
        _check(variant, "succeeded", conn.execute(_SUCCEEDED).fetchone()[0], len(ids))
        return claim, finish, 0, 0
    finally:
        conn.close()


async def main(args: argparse.Namespace) -> None:
    results: dict[tuple[str, str], list[tuple[float, float, int, int]]] = {}
    # Fleet takes the one-benchmark-at-a-time lock; it starts no children.
    async with Fleet(args.timeout), asyncio.timeout(args.timeout):
        for _ in range(args.rounds):
            for backend in backends(args.backend):
                for variant in args.variant or VARIANTS:
                    if backend == "sqlite" and variant == "hot":
                        continue  # SQLite rewrites a row in place: no HOT to ask for
                    url = await fill(backend, args)
                    if backend == "postgres":
                        figures = await postgres_round(url, variant, args)
                    else:
                        figures = await asyncio.to_thread(sqlite_round, url, variant, args)
                    results.setdefault((backend, variant), []).append(figures)
    header(
        f"the claim's write per task, shipped and what-if: {args.tasks:,} tasks in batches of {args.batch}, "
        f"median of {args.rounds} rounds"
    )
    rows = []
    for (backend, variant), rounds in results.items():
        claim = statistics.median(r[0] for r in rounds) / args.tasks * 1e6
        finish = statistics.median(r[1] for r in rounds) / args.tasks * 1e6
        hot = f"{rounds[-1][3]:,} of {rounds[-1][2]:,}" if backend == "postgres" else "-"
        side = "PostgreSQL backend" if backend == "postgres" else "this thread (SQLite)"
        rows.append(
            [backend, variant, f"{claim:.1f} us", f"{finish:.1f} us", f"{claim + finish:.1f} us", hot, side]
        )
    print(
        table(
            [
                "backend",
                "variant",
                "claim write / task",
                "finish write / task",
                "both",
                "HOT updates (claim)",
                "CPU of",
            ],
            rows,
        )
    )
    if any(
        r[2] == 0 and r[3] == 0
        for (b, v), rs in results.items()
        if b == "postgres" and v != "lease-table"
        for r in rs
    ):
        raise BenchError("PostgreSQL counted no updates of tasks: the statistics were not flushed")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/claim_write.py", __doc__, timeout=900)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=250, help="tasks per claim and per finish")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variant", action="append", choices=VARIANTS, help="run only this variant (repeatable)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main(parse()))
