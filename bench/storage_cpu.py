"""The database's CPU per task for the worker's claim and finish, and the worker's main thread around them, without
the network: each backend's share of the delivery benchmark's CPU bill, measured where it is repeatable.

    python3 dev.py bench storage_cpu --backend both --tasks 20000 --rounds 3 [--drop-index ix_tasks_host ...]

The delivery benchmark prints the CPU of PostgreSQL's backends per task (~100-130 us) beside the worker's, but on
a 2-core machine busy with a worker, a receiver and PostgreSQL at once that figure moves by tens of microseconds
between runs, and it does not say which statement spends it. This script runs the dispatcher's own claim and
write paths on a fresh database of ``--tasks`` due tasks, one batch after another as a worker under load does
(claim ``--batch``, record a 200 answer for each claimed task, write the batch), and times each side:

- the database: PostgreSQL's backend processes of the bench database (``psutil``), or SQLite's driver threads
  (the worker process's CPU less its main thread's; SQLite runs the statements in aiosqlite's thread);
- the worker's main thread (``time.thread_time``): building and parsing the statements' data, the event loop.

Traffic control is off (``dispatcher.traffic = None``): a new host's slow-start window would hold most of a batch
back when no answers ever come. Its admission costs a statement or two per claim, not per task. The outbound
requests are built and recorded as the worker does, but never sent. ``--drop-index`` drops indexes before the
run, to price them (a what-if: the shipped schema keeps them, for the API's queries).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
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
    postgres_backends,
    postgres_cpu_since,
    run_script,
    script_parser,
    table,
    task_item,
)

RESPONSE_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": "2", "Server": "receiver"}


@dataclass
class Costs:
    """CPU seconds per phase of one round, on each side."""

    tasks: int = 0
    database: dict[str, float] = field(default_factory=dict)
    main: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, database: float, main: float) -> None:
        self.database[phase] = self.database.get(phase, 0.0) + database
        self.main[phase] = self.main.get(phase, 0.0) + main


class Meter:
    """CPU so far of the database's side: PostgreSQL's backends of one database, or this process's other threads."""

    def __init__(self, postgres_db: str | None) -> None:
        self._postgres_db = postgres_db
        self._process = psutil.Process()

    def database(self) -> dict[int, float] | float:
        if self._postgres_db is not None:
            return postgres_backends(self._postgres_db)
        times = self._process.cpu_times()  # the driver threads': all but the main thread
        return float(times.user + times.system) - time.thread_time()

    def database_since(self, before: dict[int, float] | float) -> float:
        if isinstance(before, dict):
            assert self._postgres_db is not None
            return postgres_cpu_since(before, self._postgres_db)
        now = self.database()
        assert isinstance(now, float)
        return now - before


async def one_round(backend: str, args: argparse.Namespace) -> Costs:
    from taskcenter.domain.outcome import AttemptResult
    from taskcenter.runtime import Runtime

    url = await fresh_database(backend, "storage-cpu", args.pg_url, business=True)
    rt = Runtime(bench_settings(url))
    await rt.start()
    try:
        for index in args.drop_index:
            async with rt.db.write() as conn:
                await conn.execute(sa.text(f'DROP INDEX "{index}"'))
        business = await rt.service.business(BUSINESS)
        items = [task_item(n, "http://127.0.0.1:9/hook") for n in range(args.tasks)]
        for start in range(0, len(items), 1000):
            await rt.service.create_tasks(business, items[start : start + 1000])
        await rt.policies.reload()  # as run_dispatcher's first load: the business's signer is known
        dispatcher = rt.dispatcher(concurrency=100)
        dispatcher.traffic = None
        # As Dispatcher.run sets it: on SQLite each claim writes the waiting results in its own hop.
        dispatcher._recorder.combine = not rt.db.is_postgres
        meter = Meter(sa.make_url(url).database if rt.db.is_postgres else None)
        attempt = AttemptResult(200, RESPONSE_HEADERS)
        response = {"status_code": 200, "headers": RESPONSE_HEADERS, "body": "ok", "truncated": False}
        costs = Costs()
        claim_phase = "claim" if rt.db.is_postgres else "finish + claim (one hop)"
        while True:
            db0, main0 = meter.database(), time.thread_time()
            rows = await dispatcher._claim(args.batch)
            main1 = time.thread_time()
            costs.add(claim_phase, meter.database_since(db0), main1 - main0)
            if not rows:
                break
            costs.tasks += len(rows)
            main0 = time.thread_time()
            started = dispatcher.clock()
            for row in rows:
                outbound = dispatcher._outbound(row, 1)
                record = dispatcher._request_record(outbound)
                dispatcher._record(row, 1, started, attempt, record, response, 3, None)
            costs.add("build and record the attempts", 0.0, time.thread_time() - main0)
            if rt.db.is_postgres:  # the write loop's turn: one statement per batch
                db0, main0 = meter.database(), time.thread_time()
                batch, events = dispatcher._recorder.take()
                written = await dispatcher._recorder.write(batch)
                await dispatcher._recorder.after_write(batch, events, written)
                main1 = time.thread_time()
                costs.add("finish", meter.database_since(db0), main1 - main0)
        if costs.tasks != args.tasks:
            raise BenchError(f"claimed {costs.tasks} of {args.tasks} tasks")
        return costs
    finally:
        await rt.close()


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[Costs]] = {}
    # Fleet takes the one-benchmark-at-a-time lock (this resets the bench database too); it starts no children.
    async with Fleet(args.timeout), asyncio.timeout(args.timeout):
        for backend in backends(args.backend):
            for _ in range(args.rounds):
                results.setdefault(backend, []).append(await one_round(backend, args))
    dropped = f"; indexes dropped: {', '.join(args.drop_index)}" if args.drop_index else ""
    header(
        f"the database's CPU per task for claim and finish, no network: {args.tasks:,} tasks in batches of "
        f"{args.batch}, median of {args.rounds} rounds{dropped}"
    )
    rows = []
    for backend, rounds in results.items():
        side = "PostgreSQL backends" if backend == "postgres" else "SQLite driver threads"
        for phase in rounds[0].main:
            database = [r.database[phase] / r.tasks * 1e6 for r in rounds]
            main_thread = [r.main[phase] / r.tasks * 1e6 for r in rounds]
            rows.append(
                [
                    backend,
                    phase,
                    f"{statistics.median(database):.1f} us ({side})" if any(database) else "-",
                    f"{statistics.median(main_thread):.1f} us",
                ]
            )
        total_db = statistics.median(sum(r.database.values()) / r.tasks * 1e6 for r in rounds)
        total_main = statistics.median(sum(r.main.values()) / r.tasks * 1e6 for r in rounds)
        rows.append([backend, "all of it", f"{total_db:.1f} us", f"{total_main:.1f} us"])
    print(table(["backend", "phase", "database CPU / task", "worker main thread / task"], rows))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/storage_cpu.py", __doc__, timeout=900)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=250, help="tasks per claim and per write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--drop-index", action="append", default=[], metavar="NAME", help="drop this index first (repeatable)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main(parse()))
