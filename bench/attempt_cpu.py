"""taskcenter's own CPU per task, without the network: the dispatcher's per-attempt work and a batch's finish
encoding, in this process, on rows claimed from a SQLite file.

    python3 dev.py bench attempt_cpu --tasks 2000 --rounds 15

The delivery benchmark's CPU per task moves by tens of microseconds between neighbouring runs on a shared machine;
this measures the part that is taskcenter's own Python — building the outbound request (``_outbound``), the
attempt's request record (``_request_record``), classifying and recording the result (``_record``: retry
decision, metrics, the ``Finished`` row) and encoding a batch of results for either backend's finish — with
``time.process_time`` around each stage, so a change to that code can be priced to a microsecond or so. What it
leaves out is what the delivery benchmark measures: aiohttp, the event loop, the database drivers and round
trips, the claim's parsing and admission. The URLs are never contacted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header, run_script, table

RESPONSE_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": "2", "Server": "receiver"}


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Per stage, CPU microseconds per task in each round."""
    from taskcenter.config import Settings
    from taskcenter.domain.outcome import AttemptResult
    from taskcenter.runtime import Runtime
    from taskcenter.storage import queue
    from taskcenter.storage import results as result_sql

    with tempfile.TemporaryDirectory() as scratch:
        rt = Runtime(
            Settings(database_url=f"sqlite:///{scratch}/attempt-cpu.db", allow_networks="127.0.0.0/8")
        )
        await rt.start()
        try:
            business = await rt.service.ensure_business(
                "bench", rate_limit_per_minute=100_000_000, max_active_tasks=100_000_000
            )
            items = [
                {
                    "business_id": f"order-{n}",
                    "url": "http://127.0.0.1:9/hook",
                    "json": {"order": n, "paid": True},
                }
                for n in range(args.tasks)
            ]
            for start in range(0, len(items), 1000):
                await rt.service.create_tasks(business, items[start : start + 1000])
            await rt.policies.reload()  # the business is new since start: its signer is known after a load
            dispatcher = rt.dispatcher(concurrency=100)
            rows = await queue.claim(
                rt.db, worker=dispatcher.name, now=datetime.now(UTC), limit=args.tasks, lease_s=600
            )
        finally:
            await rt.close()
    response = {"status_code": 200, "headers": RESPONSE_HEADERS, "body": "ok", "truncated": False}
    attempt = AttemptResult(200, RESPONSE_HEADERS)
    started = datetime.now(UTC)
    figures: dict[str, list[float]] = {}

    def timed(stage: str, work: Callable[..., Any], *args: Any) -> Any:
        t0 = time.process_time()
        done = work(*args)
        figures.setdefault(stage, []).append((time.process_time() - t0) / len(rows) * 1e6)
        return done

    for _ in range(args.rounds):
        dispatcher._recorder.waiting.clear()
        dispatcher._recorder.waiting_events.clear()
        outbound = timed("_outbound", _outbounds, dispatcher, rows)
        records = timed("_request_record", _request_records, dispatcher, outbound)
        timed("_record", _recorded, dispatcher, rows, records, started, attempt, response)
        results = list(dispatcher._recorder.waiting)
        timed("finish encoding, SQLite", result_sql.prepare_sqlite, results, None)
        timed(
            "finish encoding, PostgreSQL",
            result_sql._postgres_finish_params,
            dispatcher.name,
            started,
            results,
        )
    return figures


def _outbounds(dispatcher: Any, rows: list[Any]) -> list[Any]:
    return [dispatcher._outbound(row, 1) for row in rows]


def _request_records(dispatcher: Any, outbound: list[Any]) -> list[Any]:
    return [dispatcher._request_record(o) for o in outbound]


def _recorded(
    dispatcher: Any, rows: list[Any], records: list[Any], started: datetime, attempt: Any, response: Any
) -> None:
    for row, record in zip(rows, records, strict=True):
        dispatcher._record(row, 1, started, attempt, record, response, 3, None)


async def main(args: argparse.Namespace) -> None:
    figures = await measure(args)
    header(f"taskcenter's own CPU per task, no network: {args.tasks:,} claimed rows, {args.rounds} rounds")
    print(
        table(
            ["stage", "median us/task", "min us/task", "max us/task"],
            [
                [stage, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}"]
                for stage, v in figures.items()
            ],
        )
    )
    per_round = [
        sum(r)
        for r in zip(*(v for k, v in figures.items() if k != "finish encoding, PostgreSQL"), strict=True)
    ]
    print(
        f"\nper task on SQLite (all but the PostgreSQL encoding): median {statistics.median(per_round):.2f} us"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/attempt_cpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main(parse()))
