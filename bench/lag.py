"""Enqueue-to-arrival lag at a steady create rate, and how late scheduled tasks arrive after their time.

    python3 dev.py bench lag --backend both --rate 500 --seconds 20 --scheduled 1000 [--mode auto|inprocess|separate]

Creates go through ``TaskService.create_task`` (the path the REST API takes), one task per call, started on an
open-loop schedule (a create does not wait for the previous one, as independent API clients would not).
Where they run (``--mode``):

- ``separate`` (default on PostgreSQL): a client process creates, a worker process delivers; the worker learns
  of new tasks through LISTEN/NOTIFY. This is the cluster shape (``serve --no-worker`` + ``worker``).
- ``inprocess`` (default on SQLite): creator and dispatcher share one process and event loop, as in the
  embedded ``taskcenter serve``; the in-process notifier wakes the dispatcher. (SQLite has no cross-process
  wake-up, so a separate creator there would only measure the poll interval.)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ENQUEUE_BATCH,
    OUT,
    BenchError,
    Fleet,
    backends,
    bench_business,
    bench_settings,
    emit,
    fresh_database,
    header,
    percentile,
    run_loop,
    run_script,
    script_parser,
    serve_worker,
    table,
    task_item,
)

TARGET_IMMEDIATE_P99_MS = 25.0
TARGET_SCHEDULED_P99_MS = 50.0
MAX_CREATES_IN_FLIGHT = 200


async def create_steadily(
    rt: Any, *, url: str, rate: float, seconds: float, scheduled: int, out: Path, lead_s: float = 1.0
) -> None:
    """Create ``scheduled`` tasks due across the window, then ``rate`` immediate tasks per second for ``seconds``.

    Writes one record per task to ``out`` (JSON):
    ``[uuid, kind, created_at, scheduled_at or null, create call started, create call returned]`` (epoch seconds).
    """
    business = await bench_business(rt)
    records: list[tuple[str, str, float, float | None, float, float]] = []
    start = time.time() + lead_s
    if scheduled:
        # Due from 2 s into the window to 1 s before its end, evenly spread; created in one go beforehand.
        span = max(seconds - 3.0, 1.0)
        due = [start + 2.0 + span * i / scheduled for i in range(scheduled)]
        for first in range(0, scheduled, ENQUEUE_BATCH):
            items = [
                task_item(i, url, prefix="s", scheduled_at=datetime.fromtimestamp(due[i], UTC))
                for i in range(first, min(first + ENQUEUE_BATCH, scheduled))
            ]
            called = time.time()
            results = await rt.service.create_tasks(business, items)
            returned = time.time()
            for item, result in zip(items, results, strict=True):
                if result.get("status") != 201:
                    raise BenchError(f"scheduled create refused: {result}")
                task = result["task"]
                at = item["scheduled_at"].timestamp()
                records.append((task.id, "scheduled", task.created_at.timestamp(), at, called, returned))
    limiter = asyncio.Semaphore(MAX_CREATES_IN_FLIGHT)
    pending: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    async def create_one(n: int) -> None:
        async with limiter:
            called = time.time()
            try:
                task = await rt.service.create_task(business, task_item(n, url, prefix="i"))
            except Exception as exc:
                errors.append(exc)
                return
            records.append((task.id, "immediate", task.created_at.timestamp(), None, called, time.time()))

    total = int(rate * seconds)
    await asyncio.sleep(max(0.0, start - time.time()))
    loop = asyncio.get_running_loop()
    began = loop.time()
    for n in range(total):
        wait = began + n / rate - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        job = asyncio.create_task(create_one(n))
        pending.add(job)
        job.add_done_callback(pending.discard)
    issued = total / max(loop.time() - began, 1e-9)
    if pending:
        await asyncio.gather(*pending)
    completed = total / max(loop.time() - began, 1e-9)
    if errors:
        raise BenchError(f"{len(errors)} creates failed, e.g. {errors[0]!r}")
    out.write_bytes(orjson.dumps(records))
    emit("created", count=len(records), issued=issued, completed=completed, path=str(out))


# -- child processes ---------------------------------------------------------------------------------------


async def _client_main(args: argparse.Namespace) -> None:
    from taskcenter.runtime import Runtime

    rt = Runtime(bench_settings(args.db))
    await rt.start()
    emit("ready")
    try:
        await create_steadily(
            rt,
            url=args.url,
            rate=args.rate,
            seconds=args.seconds,
            scheduled=args.scheduled,
            out=Path(args.out),
        )
    finally:
        await rt.close()


async def _worker_main(args: argparse.Namespace) -> None:
    async def creator(rt: Any) -> None:
        await create_steadily(
            rt,
            url=args.url,
            rate=args.rate,
            seconds=args.seconds,
            scheduled=args.scheduled,
            out=Path(args.out),
        )

    await serve_worker(
        bench_settings(args.db, concurrency=args.concurrency), max_seconds=args.max_seconds, extra=creator
    )


def child(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lag")
    parser.add_argument("role", choices=["client", "worker"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--scheduled", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    run_loop(_client_main(args) if args.role == "client" else _worker_main(args))


# -- the benchmark -----------------------------------------------------------------------------------------


async def lag_once(
    fleet: Fleet, receiver: Any, backend: str, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    db_url = await fresh_database(backend, f"lag-{backend}", args.pg_url, business=True)
    await receiver.reset()
    out = OUT / f"lag-{backend}-{mode}.json"
    out.unlink(missing_ok=True)
    common = [
        "--db", db_url, "--url", receiver.url(), "--rate", str(args.rate), "--seconds", str(args.seconds),
        "--scheduled", str(args.scheduled), "--out", str(out),
    ]  # fmt: skip
    budget = args.seconds + 120
    if mode == "separate":
        worker, _ = await fleet.worker(
            db_url, concurrency=args.concurrency, max_seconds=budget, name=f"lag-worker-{backend}"
        )
        creator = await fleet.spawn(f"lag-client-{backend}", "bench.lag", "client", *common)
    else:
        worker = await fleet.spawn(
            f"lag-worker-{backend}", "bench.lag", "worker", *common, "--max-seconds", str(budget),
            "--concurrency", str(args.concurrency),
        )  # fmt: skip
        creator = worker
        await worker.event("ready", timeout=60)
    created = await creator.event("created", timeout=args.seconds + 90)
    expected = int(created["count"])
    await receiver.wait_ok(expected, timeout=60)
    worker.proc.send_signal(signal.SIGTERM)
    await worker.stop()
    if creator is not worker:
        await creator.stop()
    records = orjson.loads(out.read_bytes())
    first_arrival: dict[str, float] = {}
    for task_id, attempt, at, status in await receiver.arrivals():
        if attempt == "1" and status == 200:
            first_arrival.setdefault(task_id, at)
    arrived = [r for r in records if r[0] in first_arrival]
    return {
        "backend": backend,
        "mode": mode,
        "issued": created["issued"],
        "completed": created["completed"],
        # enqueue-to-arrival: from the created_at the service stamped (before the insert) to the receiver.
        "immediate": [(first_arrival[r[0]] - r[2]) * 1000 for r in arrived if r[1] == "immediate"],
        # The dispatcher's share: from the create call's return (just after its commit) to the receiver.
        "after_commit": [(first_arrival[r[0]] - r[5]) * 1000 for r in arrived if r[1] == "immediate"],
        "scheduled": [(first_arrival[r[0]] - r[3]) * 1000 for r in arrived if r[1] == "scheduled"],
        "calls": [(r[5] - r[4]) * 1000 for r in records if r[1] == "immediate"],
        "missing": expected - len(arrived),
    }


def _row(r: dict[str, Any], what: str, values: list[float], target: float | None) -> list[Any]:
    verdict = ""
    if target is not None:
        verdict = "pass" if values and percentile(values, 99) < target else "FAIL"
    return [
        r["backend"],
        r["mode"],
        what,
        len(values),
        *(f"{percentile(values, q):.1f}" for q in (50, 90, 99)),
        f"{max(values):.1f}" if values else "-",
        f"< {target:g}" if target is not None else "",
        verdict,
    ]


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        rows.append(_row(r, "immediate: created_at -> arrival", r["immediate"], TARGET_IMMEDIATE_P99_MS))
        rows.append(_row(r, "immediate: create returned -> arrival", r["after_commit"], None))
        if r["scheduled"]:
            early = sum(1 for v in r["scheduled"] if v < 0)
            what = f"scheduled: scheduled_at -> arrival ({early} early)"
            rows.append(_row(r, what, r["scheduled"], TARGET_SCHEDULED_P99_MS))
    print(
        table(
            [
                "backend",
                "mode",
                "lag",
                "tasks",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "target p99",
                "verdict",
            ],
            rows,
        )
    )
    print("\nthe creating side (create_task, one task per call, open loop):")
    print(
        table(
            ["backend", "mode", "issued/s", "completed/s", "call p50 ms", "call p99 ms", "call max ms",
             "missing arrivals"],
            [
                [r["backend"], r["mode"], f"{r['issued']:.0f}", f"{r['completed']:.0f}",
                 f"{percentile(r['calls'], 50):.1f}", f"{percentile(r['calls'], 99):.1f}",
                 f"{max(r['calls']):.1f}", r["missing"]]
                for r in results
            ],
        )
    )  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    results = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        receiver = await fleet.receiver(max_seconds=args.timeout)
        for _ in range(args.repeat):
            for backend in backends(args.backend):
                mode = (
                    args.mode
                    if args.mode != "auto"
                    else ("separate" if backend == "postgres" else "inprocess")
                )
                print(
                    f"-- {backend} / {mode}: {args.rate:g} creates/s for {args.seconds:g} s ...", flush=True
                )
                results.append(await lag_once(fleet, receiver, backend, mode, args))
    header(
        f"enqueue-to-arrival lag: {args.rate:g} creates/s for {args.seconds:g} s, "
        f"{args.scheduled} scheduled tasks, worker concurrency {args.concurrency}"
    )
    report(results)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/lag.py", __doc__, timeout=900)
    parser.add_argument("--mode", choices=["auto", "inprocess", "separate"], default="auto")
    parser.add_argument("--rate", type=float, default=500, help="immediate creates per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--scheduled", type=int, default=1000, help="scheduled tasks due across the window")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("client", "worker"):
        child()
    else:
        run_script(main(parse()))
