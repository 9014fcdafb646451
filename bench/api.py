"""REST API figures of a real ``taskcenter serve`` process (API + dispatcher in one process): create latency at
a steady rate, peak single-create throughput and batch-create throughput, each against its target.

    python3 dev.py bench api --backend both [--rate 500 --seconds 15 --clients 48 --batch-clients 4]

Per backend: a fresh database, a loopback receiver process, ``taskcenter serve`` on 127.0.0.1 and a business
registered through the API. A separate client process (aiohttp, keep-alive, uvloop) drives each phase; its
latencies run from the request's *scheduled* start in the open-loop phase, so a stalled server is not hidden by
a client that stops sending. Baseline in the same run: the same client against the bare receiver (what the client
and loopback alone can do on this machine at that moment).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    LOOPBACK,
    BenchError,
    Child,
    Fleet,
    backends,
    cpu_seconds,
    emit,
    fresh_database,
    header,
    percentile,
    postgres_backends,
    postgres_cpu_since,
    run_loop,
    run_script,
    script_parser,
    table,
)

OPERATOR_KEY = "bench-operator-key-0123456789abcdef"
BUSINESS = "benchapi"
TARGET_P99_MS = 25.0
TARGET_SINGLE_RPS = 1500.0
TARGET_BATCH_TPS = 20000.0


# -- the client process ------------------------------------------------------------------------------------


def _item(n: int, url: str, tag: str) -> dict[str, Any]:
    return {
        "business_id": f"{tag}-{n}-{uuid.uuid4().hex[:8]}",
        "url": url,
        "json": {"order": n, "bench": True},
    }


async def _open_loop(session: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, Any]:
    """``rate`` creates per second for ``warmup`` + ``seconds``, each started on schedule whatever the others are
    doing; the latencies of the first ``warmup`` seconds are kept apart (only their maximum is reported)."""
    statuses: Counter[int] = Counter()
    from_schedule: list[float] = []
    from_send: list[float] = []
    send_lag: list[float] = []
    warmup_ms: list[float] = []
    loop = asyncio.get_running_loop()
    warm = int(args.rate * args.warmup)

    async def one(n: int, due: float) -> None:
        sent = loop.time()
        body = orjson.dumps(_item(n, args.target, "open"))
        async with session.post(args.url + "/api/v1/tasks", data=body) as resp:
            await resp.read()
            statuses[resp.status] += 1
        done = loop.time()
        if n < warm:
            warmup_ms.append((done - due) * 1000)
            return
        from_schedule.append((done - due) * 1000)
        from_send.append((done - sent) * 1000)
        send_lag.append((sent - due) * 1000)

    total = warm + int(args.rate * args.seconds)
    jobs = []
    start = loop.time() + 0.2
    for n in range(total):
        due = start + n / args.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        jobs.append(asyncio.create_task(one(n, due)))
    await asyncio.gather(*jobs)
    seconds = loop.time() - start
    return {"requests": total, "seconds": seconds, "statuses": dict(statuses), "from_schedule": from_schedule,
            "from_send": from_send, "send_lag": send_lag, "warmup_requests": warm,
            "warmup_max_ms": max(warmup_ms, default=0.0)}  # fmt: skip


async def _closed_loop(session: aiohttp.ClientSession, args: argparse.Namespace, path: str) -> dict[str, Any]:
    """``clients`` lanes each sending its next request as soon as the last answered, for ``seconds``."""
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()
    counter = iter(range(10**9))
    created = 0
    end = loop.time() + args.seconds

    async def lane() -> None:
        nonlocal created
        while loop.time() < end:
            n = next(counter)
            if args.batch:
                body = orjson.dumps({"tasks": [_item(n * args.batch + i, args.target, "batch")
                                               for i in range(args.batch)]})  # fmt: skip
            else:
                body = orjson.dumps(_item(n, args.target, "closed"))
            async with session.post(args.url + path, data=body) as resp:
                data = await resp.read()
                statuses[resp.status] += 1
                if resp.status == 200 and args.batch:
                    created += int(orjson.loads(data)["created"])
                elif resp.status in (200, 201):
                    created += 1

    started = loop.time()
    await asyncio.gather(*(lane() for _ in range(args.clients)))
    seconds = loop.time() - started
    return {
        "requests": sum(statuses.values()),
        "created": created,
        "seconds": seconds,
        "statuses": dict(statuses),
    }


async def _client_main(args: argparse.Namespace) -> None:
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    connector = aiohttp.TCPConnector(limit=max(args.clients, 64) if args.mode != "open" else 512)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        cpu0 = time.process_time()
        if args.mode == "open":
            result = await _open_loop(session, args)
        else:
            result = await _closed_loop(session, args, args.path)
        emit("done", cpu_s=time.process_time() - cpu0, **result)


def child(argv: list[str] | None = None) -> None:
    """Entry point of the client process: ``python -m bench.api client …``."""
    parser = argparse.ArgumentParser(prog="python -m bench.api")
    parser.add_argument("role", choices=["client"])
    parser.add_argument("--url", required=True, help="the server's base URL")
    parser.add_argument("--target", required=True, help="the URL tasks point at")
    parser.add_argument("--key", default="")
    parser.add_argument("--mode", choices=["open", "closed"], required=True)
    parser.add_argument("--path", default="/api/v1/tasks")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=0)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--batch", type=int, default=0)
    run_loop(_client_main(parser.parse_args(argv)))


# -- the benchmark script's side ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def start_server(
    fleet: Fleet, backend: str, db_url: str, no_worker: bool, timeout: float
) -> tuple[Child, str]:
    """``taskcenter serve`` (API + dispatcher; with ``no_worker`` the API alone) on a free loopback port; returns
    it and its base URL."""
    port = free_port()
    os.environ.update(
        TASKCENTER_DATABASE_URL=db_url,
        TASKCENTER_OPERATOR_KEY=OPERATOR_KEY,
        TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8",
        TASKCENTER_LOG_LEVEL="WARNING",
    )
    program = str(Path(sys.executable).parent / "taskcenter")
    server = await fleet.spawn_exec(
        f"api-serve-{backend}", program, "serve", "--host", LOOPBACK, "--port", str(port),
        *(["--no-worker"] if no_worker else []),
    )  # fmt: skip
    base = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if server.proc.returncode is not None:
                raise BenchError(
                    f"taskcenter serve exited with {server.proc.returncode}: {server.log_tail()}"
                )
            try:
                async with session.get(base + "/health") as resp:
                    if resp.status == 200:
                        return server, base
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"taskcenter serve not healthy after {timeout:g} s: {server.log_tail()}")
            await asyncio.sleep(0.2)


async def register(base: str) -> str:
    """Register the benchmark business through the API (operator key); returns its API key."""
    body = {"code": BUSINESS, "name": "API benchmark", "rate_limit_per_minute": 1_000_000,
            "max_active_tasks": 10_000_000}  # fmt: skip
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + "/api/v1/businesses", json=body, headers=headers) as resp,
    ):
        data = await resp.json(content_type=None)
        if resp.status != 201:
            raise BenchError(f"registering the business answered {resp.status}: {data}")
        return str(data["api_key"])


async def client_phase(fleet: Fleet, name: str, *args: str, timeout: float) -> dict[str, Any]:
    client = await fleet.spawn(name, "bench.api", "client", *args)
    done = await client.event("done", timeout=timeout)
    await client.stop()
    return done


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


async def measure(fleet: Fleet, backend: str, args: argparse.Namespace, target: str) -> dict[str, Any]:
    """One backend: fresh database, server, business; then the phases asked for (all three by default)."""
    db_url = await fresh_database(backend, f"api-{backend}", args.pg_url)
    pg_name = sa.make_url(db_url).database if backend == "postgres" else None
    server, base = await start_server(fleet, backend, db_url, args.no_worker, timeout=60)

    async def run_client(fleet: Fleet, name: str, *cmd: str, timeout: float) -> dict[str, Any]:
        cpu0, pg0 = cpu_seconds(server.pid), postgres_backends(pg_name) if pg_name else {}
        done = await client_phase(fleet, name, *cmd, timeout=timeout)
        done["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
        done["postgres_cpu_s"] = postgres_cpu_since(pg0, pg_name) if pg_name else None
        return done

    key = await register(base)
    common = ["--url", base, "--target", target, "--key", key]
    result: dict[str, Any] = {"backend": backend}
    if "open" in args.phases:
        print(
            f"-- {backend}: open loop {args.rate:g}/s for {args.warmup:g} + {args.seconds:g} s ...",
            flush=True,
        )
        result["open"] = await run_client(
            fleet, f"api-client-open-{backend}", *common, "--mode", "open", "--rate", str(args.rate),
            "--seconds", str(args.seconds), "--warmup", str(args.warmup), timeout=args.warmup + args.seconds + 120)  # fmt: skip
        result["open_load"] = _load()
        await asyncio.sleep(2)  # let the dispatcher catch up before the next phase
    if "closed" in args.phases:
        print(
            f"-- {backend}: closed loop, {args.clients} clients for {args.closed_seconds:g} s ...", flush=True
        )
        result["closed"] = await run_client(
            fleet, f"api-client-closed-{backend}", *common, "--mode", "closed", "--clients", str(args.clients),
            "--seconds", str(args.closed_seconds), timeout=args.closed_seconds + 120)  # fmt: skip
        result["closed_load"] = _load()
        await asyncio.sleep(2)
    if "batch" in args.phases:
        print(f"-- {backend}: batches of {args.batch}, {args.batch_clients} clients ...", flush=True)
        result["batch"] = await run_client(
            fleet, f"api-client-batch-{backend}", *common, "--mode", "closed", "--path", "/api/v1/tasks/batch",
            "--clients", str(args.batch_clients), "--batch", str(args.batch), "--seconds", str(args.closed_seconds),
            timeout=args.closed_seconds + 180)  # fmt: skip
        result["batch_load"] = _load()
    await server.stop()
    return result


def _statuses(done: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(done["statuses"].items()))


def report(results: list[dict[str, Any]], baseline: dict[str, Any], args: argparse.Namespace) -> None:
    rows = []
    for r in results:
        if "open" in r:
            op = r["open"]
            p50, p90, p99 = (percentile(op["from_schedule"], q) for q in (50, 90, 99))
            rows.append([f"{r['backend']} create latency @ {args.rate:g}/s (from scheduled start, after {args.warmup:g} s)",
                         f"p50 {p50:.1f} / p90 {p90:.1f} / p99 {p99:.1f} ms", f"p99 < {TARGET_P99_MS:g} ms",
                         "pass" if p99 < TARGET_P99_MS else "FAIL", _statuses(op), r["open_load"]])  # fmt: skip
        if "closed" in r:
            cl = r["closed"]
            rate = cl["created"] / cl["seconds"]
            rows.append([f"{r['backend']} single create, {args.clients} clients", f"{rate:,.0f} creates/s",
                         f">= {TARGET_SINGLE_RPS:,.0f}/s", "pass" if rate >= TARGET_SINGLE_RPS else "FAIL",
                         _statuses(cl), r["closed_load"]])  # fmt: skip
        if "batch" in r:
            ba = r["batch"]
            tps = ba["created"] / ba["seconds"]
            verdict = (
                ("pass" if tps >= TARGET_BATCH_TPS else "FAIL")
                if r["backend"] == "postgres"
                else "(no target)"
            )
            rows.append([f"{r['backend']} batch create ({args.batch}/request, {args.batch_clients} clients)",
                         f"{tps:,.0f} tasks/s", f">= {TARGET_BATCH_TPS:,.0f}/s on PostgreSQL", verdict,
                         _statuses(ba), r["batch_load"]])  # fmt: skip
    print(
        table(
            ["measure", "figure", "target", "verdict", "HTTP statuses", "load avg after (1/5/15 min)"], rows
        )
    )
    opened = [r for r in results if "open" in r]
    if opened:
        print("\nopen loop detail (ms; 'from send' leaves out the client's own scheduling lag):")
        detail = []
        for r in opened:
            op = r["open"]
            detail.append([r["backend"], op["requests"], *(f"{percentile(op['from_send'], q):.1f}" for q in (50, 90, 99)),
                           f"{percentile(op['send_lag'], 99):.1f}", f"{max(op['from_schedule']):.0f}"])  # fmt: skip
        print(table(["backend", "requests", "p50 from send", "p90 from send", "p99 from send", "client lag p99",
                     "max from schedule"], detail))  # fmt: skip
        if args.warmup:
            print(f"   ({args.warmup:g} s warm-up at the same rate before these, not in the figures: "
                  + ", ".join(f"{r['backend']} {r['open']['warmup_requests']:,} requests, max "
                              f"{r['open']['warmup_max_ms']:.0f} ms" for r in opened) + ")")  # fmt: skip
    print("\nCPU per created task (1 core = 1e6 us/s): the server process (API + in-process dispatcher together), "
          "and the PostgreSQL backends serving the bench database (their own connections only):")  # fmt: skip
    cpu_rows = []
    for r in results:
        row: list[Any] = [r["backend"]]
        for phase in ("open", "closed", "batch"):
            if phase not in r:
                row.append("-")
                continue
            done = r[phase]
            made = max(1, done.get("created", done["requests"]))
            busy = done["server_cpu_s"] / done["seconds"]
            cell = f"{done['server_cpu_s'] / made * 1e6:,.0f} us (busy {busy:.0%})"
            if done.get("postgres_cpu_s") is not None:
                pg_busy = done["postgres_cpu_s"] / done["seconds"]
                cell += f"; PostgreSQL {done['postgres_cpu_s'] / made * 1e6:,.0f} us (busy {pg_busy:.0%})"
            row.append(cell)
        cpu_rows.append(row)
    print(table(["backend", "open loop", "single create", "batch"], cpu_rows))
    if args.no_worker:
        print("   (serve --no-worker: the API alone, NOT the shipped embedded shape the targets refer to)")
    rate = baseline["requests"] / baseline["seconds"]
    print(f"\nbaseline (same run): the same client, {args.clients} clients, against the bare aiohttp receiver: "
          f"{rate:,.0f} requests/s; client CPU {baseline['cpu_s'] / baseline['requests'] * 1e6:.0f} us/request")  # fmt: skip
    for r in results:
        if "closed" in r:
            cl = r["closed"]
            print(f"   {r['backend']}: single-create rate is {cl['created'] / cl['seconds'] / rate:.0%} of that "
                  f"baseline; client CPU {cl['cpu_s'] / max(1, cl['requests']) * 1e6:.0f} us/request")  # fmt: skip
        if "batch" in r:
            ba = r["batch"]
            print(f"   {r['backend']}: batch client CPU {ba['cpu_s'] / max(1, ba['created']) * 1e6:.0f} us/task "
                  "(building the requests, reading the responses)")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    results = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        receiver_child = await fleet.spawn("api-receiver", "bench.common", "receiver", "--max-seconds",
                                           str(args.timeout))  # fmt: skip
        ready = await receiver_child.event("ready", timeout=30)
        target = f"http://{LOOPBACK}:{ready['port']}/hook"
        print(f"-- baseline: client against the bare receiver, {args.clients} clients ...", flush=True)
        baseline = await client_phase(
            fleet, "api-client-baseline", "--url", target.removesuffix("/hook"), "--target", target, "--mode",
            "closed", "--path", "/hook", "--clients", str(args.clients), "--seconds", "5", timeout=120)  # fmt: skip
        for backend in backends(args.backend):
            results.append(await measure(fleet, backend, args, target))
    shape = "API only: serve --no-worker" if args.no_worker else "API + dispatcher in one process"
    header(f"REST API: taskcenter serve ({shape}), tasks aimed at a loopback receiver")
    report(results, baseline, args)


PHASES = ("open", "closed", "batch")


def _phases(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"phases are {', '.join(PHASES)}; got {text!r}")
    return chosen


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/api.py", __doc__, timeout=900)
    parser.add_argument("--rate", type=float, default=500, help="open-loop creates per second")
    parser.add_argument("--seconds", type=float, default=15, help="open-loop duration")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2,
        help="open-loop seconds at the same rate before the measured ones (connections, first statements; "
        "their latencies are left out, their maximum printed)",
    )
    parser.add_argument("--clients", type=int, default=48, help="closed-loop single-create clients")
    parser.add_argument("--closed-seconds", type=float, default=10, help="closed-loop and batch duration")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per batch request")
    parser.add_argument("--batch-clients", type=int, default=4)
    parser.add_argument(
        "--phases",
        type=_phases,
        default=PHASES,
        help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all; e.g. --phases batch)",
    )
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="diagnosis: serve --no-worker (the API without its dispatcher)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        child()
    else:
        run_script(main(parse()))
