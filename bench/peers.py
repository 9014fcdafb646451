"""Peers, same run: taskcenter against the job queues the performance issue names, each delivering the same
backlog to the same loopback receiver, interleaved with raw-ceiling runs so that all share the same minutes.

    python3 dev.py bench peers --repeat 3

The peers are bench-only and not in the lock file: ``.venv/bin/pip install pgqueuer==1.6.0 arq==0.28.0``.

A round: the raw ceiling, then each system in turn with a raw ceiling after it (the order rotates from round to
round). Each system gets a fresh queue holding ``--tasks`` jobs (enqueued in bulk, not timed) and one worker
process at concurrency 100 whose job POSTs the job's JSON body to the receiver through one shared aiohttp
session and reads the response:

- pgqueuer: its schema installed with ``pgq install`` (and ``pgq autovac``, as its performance guide asks) in
  the bench PostgreSQL database; ``Queries.enqueue`` with lists (bulk); ``QueueManager.run`` over one asyncpg
  connection, ``max_concurrent_tasks`` = concurrency, ``batch_size`` = half of it (the largest it accepts),
  drain mode.
- arq: a dedicated Redis database, flushed first; ``ArqRedis.enqueue_job``; a ``Worker`` with ``max_jobs`` =
  concurrency in burst mode.
- taskcenter on PostgreSQL and SQLite: exactly what ``bench/delivery.py`` runs (its functions, not a copy).

Each worker is timed from its start to the last arrival at the receiver, and to its queue showing every job
done (taskcenter: all tasks succeeded in the database; pgqueuer: its drain-mode run returned; arq: its burst
ended). Each ratio compares with the mean of the two ceilings around the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import sqlalchemy as sa

from bench.common import (
    LOOPBACK,
    BenchError,
    Delivery,
    Fleet,
    MachineCPU,
    Receiver,
    backends,
    cpu_seconds,
    emit,
    fresh_database,
    header,
    postgres_backends,
    postgres_cpu_since,
    run_loop,
    run_script,
    script_parser,
    table,
    task_body,
    until_stopped,
)
from bench.delivery import SHIPPED, AgainstCeiling, Ceiling, deliver
from bench.delivery import ceiling as raw_ceiling

PIP = ".venv/bin/pip install pgqueuer==1.6.0 arq==0.28.0"
REDIS_URL = os.environ.get("TASKCENTER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
ENTRYPOINT = "deliver"
ENQUEUE_BATCH = 1000
PEERS = ("pgqueuer", "arq")
#: What the performance issue reported for each system on its machine, whose raw ceiling it took as ~4,000/s.
ISSUE_CEILING = 4000.0
ISSUE_FIGURES = {"pgqueuer": 1400.0, "arq": 600.0}


@dataclass
class Run(AgainstCeiling):
    """One system's run with the ceilings measured around it."""

    system: str
    delivery: Delivery
    enqueue_rate: float
    store: str
    """Where the queue lives: ``PostgreSQL``, ``Redis`` or ``SQLite`` (its CPU is in the worker's threads)."""
    store_cpu_s: float
    ceilings: list[Ceiling] = field(default_factory=list)

    @property
    def cpu_us(self) -> float:
        return self.delivery.worker_cpu_s / self.delivery.tasks * 1e6


# -- the peers' worker processes -------------------------------------------------------------------------


def _headers(job_id: str, n: int) -> dict[str, str]:
    """The headers the raw client sends, so that the receiver does the same work per request."""
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": job_id,
        "X-Task-Id": job_id,
        "X-Task-Attempt": "0",
        "X-Business-Id": f"peer-{n}",
    }


async def _post(session: aiohttp.ClientSession, url: str, job_id: str, body: bytes, n: int) -> None:
    async with session.post(url, data=body, headers=_headers(job_id, n)) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"receiver answered {resp.status}")


async def _pgqueuer_worker(args: argparse.Namespace) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    connection = await asyncpg.connect(args.dsn)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One asyncpg connection for the QueueManager, as pgqueuer's performance guide recommends.
        qm = QueueManager(Queries(AsyncpgDriver(connection)))
        done = 0

        @qm.entrypoint(ENTRYPOINT)
        async def deliver(job: Job) -> None:
            nonlocal done
            await _post(session, args.url, str(job.id), job.payload or b"", int(job.id))
            done += 1

        cpu0 = time.process_time()
        emit("ready", pid=os.getpid(), t=time.time())
        await qm.run(
            batch_size=args.batch,
            max_concurrent_tasks=args.concurrency,
            mode=QueueExecutionMode.drain,
        )
        emit("drained", t=time.time(), cpu_s=time.process_time() - cpu0, jobs=done)
        # Connected until told to stop: the script reads its backend's CPU before it stops the worker.
        await until_stopped(args.max_seconds)
    await connection.close()


async def _arq_worker(args: argparse.Namespace) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def deliver(ctx: dict[str, Any], body: bytes, n: int) -> None:
            await _post(session, args.url, ctx["job_id"], body, n)

        worker = Worker(
            functions=[func(deliver, name=ENTRYPOINT)],
            redis_settings=RedisSettings.from_dsn(args.redis_url),
            max_jobs=args.concurrency,
            burst=True,
            handle_signals=False,
        )
        cpu0 = time.process_time()
        emit("ready", pid=os.getpid(), t=time.time())
        await worker.async_run()
        emit("drained", t=time.time(), cpu_s=time.process_time() - cpu0, jobs=worker.jobs_complete)
        if worker.jobs_failed:
            print(f"arq: {worker.jobs_failed} jobs failed", file=sys.stderr)
        await worker.close()
    await until_stopped(args.max_seconds)


def worker_main(argv: list[str]) -> None:
    """Entry point of a peer's worker process: ``python -m bench.peers worker pgqueuer|arq …``."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers worker")
    parser.add_argument("system", choices=PEERS)
    parser.add_argument("--url", required=True, help="the receiver")
    parser.add_argument("--dsn", help="pgqueuer's PostgreSQL database")
    parser.add_argument("--redis-url", help="arq's Redis database")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50, help="pgqueuer's batch_size")
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    role = _pgqueuer_worker if args.system == "pgqueuer" else _arq_worker
    run_loop(role(args), use_uvloop=not args.no_uvloop)


# -- the benchmark script's side: preparing each queue -----------------------------------------------------


def require_peers(systems: list[str]) -> None:
    """One clear line when a peer this run needs is not installed."""
    missing = []
    for name in (s for s in systems if s in PEERS):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise BenchError(f"{' and '.join(missing)} {verb} not installed (bench-only peers): {PIP}")


def loopback_url(url: str, what: str) -> str:
    host = urlsplit(url).hostname or ""
    if host not in (LOOPBACK, "localhost", "::1"):
        raise BenchError(f"{what} must be on loopback (127.0.0.1), not {host!r}")
    return url


async def run_program(fleet: Fleet, name: str, program: str, *args: str) -> None:
    """Run a program to its end as a child of this run; :class:`BenchError` naming its log if it fails."""
    child = await fleet.spawn_exec(name, program, *args)
    code = await asyncio.wait_for(child.proc.wait(), 120)
    if code != 0:
        raise BenchError(f"{program} {' '.join(args)} exited with {code}: {child.log_tail()}")


def asyncpg_dsn(url: str) -> str:
    """The bench database's URL as asyncpg and pgqueuer take it (no SQLAlchemy driver suffix)."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def prepare_pgqueuer(fleet: Fleet, args: argparse.Namespace, count: int) -> tuple[str, float]:
    """The bench database reset, pgqueuer's schema installed and ``count`` jobs enqueued in bulk."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    await fresh_database("postgres", "peers-pgqueuer", args.pg_url)  # drops and recreates the public schema
    dsn = asyncpg_dsn(args.pg_url)
    pgq = str(Path(sys.executable).parent / "pgq")
    await run_program(fleet, "pgq-install", pgq, "--pg-dsn", dsn, "install")
    await run_program(fleet, "pgq-autovac", pgq, "--pg-dsn", dsn, "autovac")
    connection = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        started = time.perf_counter()
        for first in range(0, count, ENQUEUE_BATCH):
            size = min(ENQUEUE_BATCH, count - first)
            await queries.enqueue(
                [ENTRYPOINT] * size, [task_body(first + i) for i in range(size)], [0] * size
            )
        return dsn, count / (time.perf_counter() - started)
    finally:
        await connection.close()


async def prepare_arq(args: argparse.Namespace, count: int) -> float:
    """The dedicated Redis database flushed and ``count`` jobs enqueued (arq has no bulk enqueue; 100 at once)."""
    from arq.connections import RedisSettings, create_pool

    redis = await create_pool(RedisSettings.from_dsn(args.redis_url))
    try:
        await redis.flushdb()
        started = time.perf_counter()
        for first in range(0, count, 100):
            await asyncio.gather(
                *(
                    redis.enqueue_job(ENTRYPOINT, task_body(n), n)
                    for n in range(first, min(count, first + 100))
                )
            )
        return count / (time.perf_counter() - started)
    finally:
        await redis.aclose()


async def redis_pid(url: str) -> int:
    """The redis-server's process id (for its CPU); :class:`BenchError` if Redis does not answer."""
    from arq.connections import RedisSettings, create_pool
    from redis.exceptions import RedisError

    settings = RedisSettings.from_dsn(url)
    settings.conn_retries = 0
    try:
        redis = await create_pool(settings)
    except (OSError, RedisError) as exc:
        raise BenchError(f"Redis is not reachable at {url}: {exc}") from None
    try:
        return int((await redis.info("server"))["process_id"])
    finally:
        await redis.aclose()


async def run_peer(fleet: Fleet, receiver: Receiver, system: str, args: argparse.Namespace) -> Run:
    """A fresh queue holding the backlog, then one worker process of ``system`` delivering it."""
    count = args.tasks
    worker_args = ["worker", system, "--url", receiver.url(), "--concurrency", str(args.concurrency)]
    timeout = max(180.0, count / 50)
    worker_args += ["--max-seconds", str(timeout + 60)]
    pg_name = ""
    if system == "pgqueuer":
        dsn, enqueue_rate = await prepare_pgqueuer(fleet, args, count)
        worker_args += ["--dsn", dsn, "--batch", str(args.pgqueuer_batch)]
        pg_name = sa.make_url(args.pg_url).database or ""
        store, store_pid = "PostgreSQL", 0
    else:
        enqueue_rate = await prepare_arq(args, count)
        worker_args += ["--redis-url", args.redis_url]
        store, store_pid = "Redis", await redis_pid(args.redis_url)
    await receiver.reset()
    load0 = os.getloadavg()[0]
    pg0, rec0, store0 = postgres_backends(pg_name) if pg_name else {}, cpu_seconds(receiver.child.pid), 0.0
    if store_pid:
        store0 = cpu_seconds(store_pid)
    worker = await fleet.spawn("worker-" + system, "bench.peers", *worker_args)
    ready = await worker.event("ready", timeout=60)
    machine0 = MachineCPU.mark()
    stats = await receiver.wait_ok(count, timeout=timeout)
    drained = await worker.event("drained", timeout=timeout)
    machine = MachineCPU.since(machine0)
    receiver_cpu = cpu_seconds(receiver.child.pid) - rec0
    store_cpu = postgres_cpu_since(pg0, pg_name) if pg_name else cpu_seconds(store_pid) - store0
    load1 = os.getloadavg()[0]
    await worker.stop()
    ok_ids = Counter(a[0] for a in await receiver.arrivals() if a[3] == 200)
    result = Delivery(
        tasks=count,
        arrival_s=stats["last_ok"] - ready["t"],
        done_s=drained["t"] - ready["t"],
        requests=stats["requests"],
        connections=stats["connections"],
        duplicates=sum(ok_ids.values()) - len(ok_ids),
        worker_cpu_s=drained["cpu_s"],
        receiver_cpu_s=receiver_cpu,
        postgres_cpu_s=store_cpu if pg_name else 0.0,
        load=(load0, load1),
        machine=machine,
    )
    return Run(system, result, enqueue_rate, store, store_cpu)


async def run_system(fleet: Fleet, receiver: Receiver, system: str, args: argparse.Namespace) -> Run:
    print(f"-- {system}: {args.tasks:,} tasks ...", flush=True)
    if system in PEERS:
        return await run_peer(fleet, receiver, system, args)
    backend = system.removeprefix("taskcenter-")
    run = await deliver(fleet, receiver, backend, "plain", SHIPPED, args)
    store = "PostgreSQL" if backend == "postgres" else "SQLite"
    return Run(system, run.delivery, run.enqueue_rate, store, run.delivery.postgres_cpu_s)


async def round_once(
    fleet: Fleet, receiver: Receiver, systems: list[str], args: argparse.Namespace
) -> list[Run]:
    """Ceiling, then each system followed by a ceiling."""
    runs = []
    before = await raw_ceiling(fleet, receiver, args.tasks, args.concurrency)
    for system in systems:
        run = await run_system(fleet, receiver, system, args)
        after = await raw_ceiling(fleet, receiver, args.tasks, args.concurrency)
        run.ceilings = [before, after]
        runs.append(run)
        before = after
    return runs


# -- figures ---------------------------------------------------------------------------------------------


def issue_figure(system: str) -> str:
    """What the issue reported for this system, and its ratio to the issue's ~4,000/s ceiling."""
    if system in ISSUE_FIGURES:
        rate = ISSUE_FIGURES[system]
        return f"~{rate:,.0f}/s ({rate / ISSUE_CEILING:.0%})"
    return "target >= 50 %" if system.startswith("taskcenter") else "-"


def report(runs: list[Run]) -> None:
    print(
        table(
            ["run", "raw ceiling req/s (before / after)", "tasks/s (to last arrival)", "ratio",
             "tasks/s (to queue done)", "ratio", "enqueue tasks/s (not timed)"],
            [
                [r.system, " / ".join(f"{c.rps:,.0f}" for c in r.ceilings), r.delivery.arrival_rate,
                 f"{r.ratio:.0%}", r.delivery.done_rate, f"{r.ratio_done:.0%}", r.enqueue_rate]
                for r in runs
            ],
        )
    )  # fmt: skip
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.system, []).append(r)
    print(
        "\nmedian over the rounds (the issue's figures: its peers on its machine, ratio to its ~4,000/s ceiling):"
    )
    print(
        table(
            ["system", "rounds", "median raw ceiling", "median tasks/s (arrival)", "median ratio (arrival)",
             "min / max ratio", "median ratio (queue done)", "issue's figure"],
            [
                [name, len(g), statistics.median(r.ceiling for r in g),
                 statistics.median(r.delivery.arrival_rate for r in g), f"{statistics.median(r.ratio for r in g):.0%}",
                 f"{min(r.ratio for r in g):.0%} / {max(r.ratio for r in g):.0%}",
                 f"{statistics.median(r.ratio_done for r in g):.0%}", issue_figure(name)]
                for name, g in groups.items()
            ],
        )
    )  # fmt: skip
    print(
        "\nCPU cost: 'worker bound (1 core)' is 1e6 / (worker CPU per task), the rate one worker process could reach"
    )
    print("if only its own CPU limited it.")
    print(
        table(
            ["run", "worker CPU/task", "raw client CPU/request", "worker bound (1 core)", "of ceiling",
             "worker busy"],
            [
                [r.system, f"{r.cpu_us:.0f} us", f"{statistics.fmean(c.client_cpu_us for c in r.ceilings):.0f} us",
                 f"{1e6 / r.cpu_us:,.0f}/s", f"{1e6 / r.cpu_us / r.ceiling:.0%}",
                 f"{r.delivery.worker_cpu_s / r.delivery.done_s:.0%}"]
                for r in runs
            ],
        )
    )  # fmt: skip
    cores = runs[0].delivery.machine.cores if runs and runs[0].delivery.machine else 1
    print(
        f"\nThe whole machine from the worker's start to its queue done ({cores} cores); 'store' is the queue's"
    )
    print(
        "database server (PostgreSQL's backends for the bench database, or redis-server; SQLite runs in the worker)."
    )
    print(
        table(
            ["run", f"machine busy (of {cores} cores)", "steal", "all CPU/task", "worker", "receiver", "store",
             "rest (kernel, this script, others)", f"bound at that cost ({cores} cores)", "of ceiling"],
            [machine_row(r) for r in runs],
        )
    )  # fmt: skip
    print()
    print(
        table(
            ["run", "requests", "connections", "duplicates", "worker CPU", "receiver CPU", "store CPU",
             "load before/after"],
            [
                [r.system, r.delivery.requests, r.delivery.connections, r.delivery.duplicates,
                 f"{r.delivery.worker_cpu_s:.1f} s", f"{r.delivery.receiver_cpu_s:.1f} s",
                 f"{r.store_cpu_s:.1f} s ({r.store})" if r.store_cpu_s else f"- ({r.store})",
                 f"{r.delivery.load[0]:.1f} / {r.delivery.load[1]:.1f}"]
                for r in runs
            ],
        )
    )  # fmt: skip


def machine_row(run: Run) -> list[Any]:
    d, m = run.delivery, run.delivery.machine
    if m is None:
        return [run.system, *["-"] * 9]
    per_task = m.busy_s / d.tasks * 1e6
    parts = [d.worker_cpu_s, d.receiver_cpu_s, run.store_cpu_s]
    rest = max(0.0, m.busy_s - sum(parts)) / d.tasks * 1e6
    bound = m.cores * 1e6 / per_task if per_task else 0.0
    return [
        run.system, f"{m.busy_s / m.wall_s / m.cores:.0%}", f"{m.steal_s / m.wall_s / m.cores:.0%}",
        f"{per_task:.0f} us", *(f"{p / d.tasks * 1e6:.0f} us" if p else "-" for p in parts), f"{rest:.0f} us",
        f"{bound:,.0f}/s", f"{bound / run.ceiling:.0%}",
    ]  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    systems = args.system or [*PEERS, *(f"taskcenter-{b}" for b in backends(args.backend))]
    require_peers(systems)
    loopback_url(args.redis_url, "--redis-url")
    loopback_url(asyncpg_dsn(args.pg_url), "--pg-url")
    if "arq" in systems:
        await redis_pid(args.redis_url)  # before anything starts: Redis answers
    runs: list[Run] = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        receiver = await fleet.receiver(max_seconds=args.timeout)
        for n in range(args.repeat):
            order = systems[n % len(systems) :] + systems[: n % len(systems)]  # each round starts elsewhere
            runs += await round_once(fleet, receiver, order, args)
    header(f"peers, same run: one worker process each, concurrency {args.concurrency}, {args.tasks:,} tasks")
    print(
        f"   pgqueuer: batch_size={args.pgqueuer_batch}, max_concurrent_tasks={args.concurrency}, drain mode, "
        f"one asyncpg connection; arq: max_jobs={args.concurrency}, burst, Redis {args.redis_url}"
    )
    report(runs)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/peers.py", __doc__, timeout=3600)
    parser.add_argument(
        "--system",
        action="append",
        choices=[*PEERS, "taskcenter-postgres", "taskcenter-sqlite"],
        help="run only these (repeatable; default: pgqueuer, arq and taskcenter on --backend)",
    )
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--pgqueuer-batch",
        type=int,
        default=None,
        help="pgqueuer's batch_size (default: half the concurrency, the largest max_concurrent_tasks allows)",
    )
    parser.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help="arq's Redis database, FLUSHED before each arq run (default db 13; TASKCENTER_BENCH_REDIS_URL)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over every system")
    # What bench/delivery.py's functions read: the plain scenario only.
    parser.set_defaults(fail_fraction=0.0, breaker_failures=0)
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.concurrency < 2 or args.repeat < 1:
        parser.error("--tasks and --repeat must be at least 1, --concurrency at least 2")
    if args.pgqueuer_batch is None:
        args.pgqueuer_batch = args.concurrency // 2
    if not 1 <= args.pgqueuer_batch <= args.concurrency // 2:
        parser.error("--pgqueuer-batch must be between 1 and half the concurrency (pgqueuer's own rule)")
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        run_script(main(parse()))
