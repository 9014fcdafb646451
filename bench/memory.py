"""Worker memory under a deep backlog and a slow receiver: RSS of one worker process with 100,000 pending tasks
and 1,000 requests in flight, each held 5 s by the receiver.

    python3 dev.py bench memory --backend both --tasks 100000 --concurrency 1000 --sleep 5 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Fleet,
    Receiver,
    backends,
    enqueue,
    fresh_database,
    header,
    run_script,
    script_parser,
    table,
    task_item,
)

TARGET_MB = 150.0
MB = 1 << 20


async def memory_once(
    fleet: Fleet, receiver: Receiver, backend: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Backlog in, slow receiver on, one worker started; its RSS sampled for ``args.seconds``."""
    db_url = await fresh_database(backend, f"memory-{backend}", args.pg_url)
    count, enqueue_s = await enqueue(db_url, (task_item(i, receiver.url()) for i in range(args.tasks)))
    await receiver.reset(sleep_s=args.sleep)
    load0 = os.getloadavg()[0]
    worker, _ready = await fleet.worker(
        db_url,
        concurrency=args.concurrency,
        max_seconds=args.seconds + 120,
        name=f"memory-worker-{backend}",
        grace_s=1.0,  # requests still held by the receiver are released, not waited for
    )
    proc = psutil.Process(worker.pid)
    baseline = proc.memory_info().rss
    samples: list[tuple[float, int, int]] = []  # (seconds since start, rss, receiver in flight)
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < args.seconds:
        rss = proc.memory_info().rss
        stats = await receiver.stats()
        samples.append((elapsed, rss, stats["in_flight"]))
        await asyncio.sleep(args.interval)
    final_stats = await receiver.stats()
    uss = proc.memory_full_info().uss
    await worker.stop(timeout=30)
    peak = max(samples, key=lambda s: s[1])
    return {
        "backend": backend,
        "tasks": count,
        "enqueue_rate": count / enqueue_s,
        "baseline": baseline,
        "peak": peak[1],
        "peak_at": peak[0],
        "final": samples[-1][1],
        "uss": uss,
        "max_in_flight": final_stats["max_in_flight"],
        "answered": final_stats["requests"],
        "connections": final_stats["connections"],
        "load": (load0, os.getloadavg()[0]),
        "samples": samples,
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        table(
            ["backend", "pending tasks", "RSS at start", "peak RSS", "peak at", "RSS at end", "USS at end",
             "max in flight at receiver", "answered", "target", "verdict"],
            [
                [r["backend"], r["tasks"], f"{r['baseline'] / MB:.0f} MB", f"{r['peak'] / MB:.0f} MB",
                 f"{r['peak_at']:.0f} s", f"{r['final'] / MB:.0f} MB", f"{r['uss'] / MB:.0f} MB",
                 r["max_in_flight"], r["answered"], f"< {TARGET_MB:g} MB",
                 "pass" if r["peak"] / MB < TARGET_MB else "FAIL"]
                for r in results
            ],
        )
    )  # fmt: skip
    for r in results:
        marks = [s for s in r["samples"] if s[0] >= 0][:: max(1, len(r["samples"]) // 10)]
        trail = ", ".join(f"{s[0]:.0f}s {s[1] / MB:.0f}MB/{s[2]}" for s in marks)
        print(f"\n{r['backend']}: RSS over time (elapsed, RSS/in flight): {trail}")
        print(
            f"{r['backend']}: enqueue {r['enqueue_rate']:,.0f} tasks/s (create_tasks); "
            f"{r['connections']} connections; load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
        )


async def main(args: argparse.Namespace) -> None:
    results = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        receiver = await fleet.receiver(max_seconds=args.timeout)
        for backend in backends(args.backend):
            print(
                f"-- {backend}: {args.tasks:,} pending tasks, receiver holds each request {args.sleep:g} s ..."
            )
            results.append(await memory_once(fleet, receiver, backend, args))
    header(
        f"worker memory: {args.tasks:,} pending tasks, concurrency {args.concurrency}, receiver sleeps "
        f"{args.sleep:g} s per request, RSS sampled for {args.seconds:g} s"
    )
    report(results, args)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/memory.py", __doc__, timeout=900)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=5.0, help="seconds the receiver holds each request")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long RSS is sampled")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main(parse()))
