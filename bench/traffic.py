"""Traffic-control figures: fairness between businesses, the cost of a sick host to a healthy one, and the
cost of per-host limiter bookkeeping, each against its target with its baseline measured in the same run.

    python3 dev.py bench traffic --backend both [--part fairness|sick|limiter|admission|rate|all]

- fairness: business A holds a backlog (bulk-created, not timed) that one worker process drains; meanwhile this
  script creates business B's tasks one at a time at a steady rate (``TaskService.create_task``, the API's path).
  B's start lag = arrival at the receiver − the task's due time (``next_attempt_at`` as stored).
- sick: healthy host H (a receiver answering 200) alone and with sick host S's tasks mixed in (a second receiver
  process holding every request past the task's timeout), alternately: alone, mixed, alone, mixed, ... alone
  (``--sick-rounds`` mixed runs of ~10 s each). Each mixed run's H rate is compared with the mean of the two runs
  alone beside it; the verdict is on the median of those per-round costs. The worker's and PostgreSQL's CPU per H
  task, the claims and PostgreSQL's row updates of ``tasks`` show where a cost comes from.
- limiter: tasks spread over many hosts (one receiver process listening on many ports) delivered with no host
  policies, with a generous policy on every host (a rate that never binds), and with none again.
- admission: statements and CPU per claim of the dispatcher's claim with traffic-control admission, in this
  process, without and with those policies (nothing is sent): the limiter's bookkeeping alone, free of the noise
  of a whole delivery run.
- rate: one host with a policy of ``--rate-limit``/s and ``--rate-burst``, ``--rate-tasks`` tasks due at once,
  delivered by 1, 2 and 3 worker processes sharing the database (PostgreSQL; SQLite, one writer, with one): the
  busiest one-second window of arrivals against rate + burst (windows starting in the first second, when cold
  dispatchers send the first burst, with the tests' 5 % slack for jitter), and the long-run rate after the first
  burst against the limit (within 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    LOOPBACK,
    STATE,
    BenchError,
    Child,
    Fleet,
    Receiver,
    ReceiverState,
    _arrivals,
    _deliver,
    _reset,
    _stats,
    backends,
    bench_settings,
    cpu_seconds,
    deliver_backlog,
    emit,
    enqueue,
    fresh_database,
    header,
    percentile,
    postgres_backends,
    postgres_cpu_since,
    run_loop,
    run_script,
    script_parser,
    table,
    task_item,
    until_stopped,
)

TARGET_FAIR_P99_MS = 500.0
TARGET_SICK_COST = 0.10
TARGET_LIMITER_COST = 0.10
TARGET_RATE_ERROR = 0.05
#: Windows starting in the run's first second may exceed rate + burst by this much (tests/test_traffic.py's
#: assert_within_rate): the first burst leaves cold dispatchers, and arrival times carry the send path's jitter.
RATE_FIRST_SLACK = 0.05
BUSINESS_B = "bench-b"


# -- a receiver listening on many ports (its own process) ---------------------------------------------------


async def _receivers_main(args: argparse.Namespace) -> None:
    """One aiohttp app (bench.common's receiver handlers, one shared state) on ``ports`` loopback ports."""
    app = web.Application()
    app[STATE] = ReceiverState()
    app.router.add_get("/_bench/stats", _stats)
    app.router.add_get("/_bench/arrivals", _arrivals)
    app.router.add_post("/_bench/reset", _reset)
    app.router.add_route("*", "/{tail:.*}", _deliver)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for _ in range(args.ports):
        await web.TCPSite(runner, LOOPBACK, 0, backlog=1024).start()
    emit("ready", ports=[a[1] for a in runner.addresses])
    await until_stopped(args.max_seconds)
    await runner.cleanup()


def child(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic")
    parser.add_argument("role", choices=["receivers"])
    parser.add_argument("--ports", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=900)
    run_loop(_receivers_main(parser.parse_args(argv)))


# -- helpers -----------------------------------------------------------------------------------------------


async def receiver(fleet: Fleet, name: str, max_seconds: float, sleep_s: float = 0.0) -> Receiver:
    proc = await fleet.spawn(name, "bench.common", "receiver", "--max-seconds", str(max_seconds),
                             "--sleep", str(sleep_s))  # fmt: skip
    ready = await proc.event("ready", timeout=30)
    return Receiver(proc, int(ready["port"]))


def load() -> str:
    import os

    return "/".join(f"{x:.1f}" for x in os.getloadavg())


async def stop_worker(worker: Child) -> None:
    await worker.stop(timeout=30)


# -- fairness ----------------------------------------------------------------------------------------------


async def fairness(fleet: Fleet, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    from taskcenter.runtime import Runtime
    from taskcenter.storage.schema import businesses

    rec = await receiver(fleet, f"traffic-receiver-fair-{backend}", args.timeout)
    db_url = await fresh_database(backend, f"traffic-fair-{backend}", args.pg_url)
    print(
        f"-- {backend} fairness: bulk-creating A's backlog of {args.backlog:,} tasks (not timed) ...",
        flush=True,
    )
    count, _ = await enqueue(db_url, (task_item(i, rec.url(), prefix="a") for i in range(args.backlog)))
    rt = Runtime(bench_settings(db_url))
    await rt.start()
    try:
        await rt.service.ensure_business(BUSINESS_B)
        async with rt.db.write() as conn:
            await conn.execute(sa.update(businesses).where(businesses.c.code == BUSINESS_B).values(
                max_active_tasks=100_000_000, rate_limit_per_minute=100_000_000, max_in_flight=None))  # fmt: skip
        business_b = await rt.service.business(BUSINESS_B, refresh=True)
        worker, _ready = await fleet.worker(db_url, concurrency=args.concurrency, max_seconds=args.timeout,
                                            name=f"traffic-worker-fair-{backend}", grace_s=1.0)  # fmt: skip
        await asyncio.sleep(2.0)  # the worker is draining A's backlog at full speed
        a_before = (await rec.stats())["ok"]
        t_start = time.time()
        print(f"-- {backend} fairness: B creates {args.b_rate:g}/s for {args.b_seconds:g} s ...", flush=True)
        due: dict[str, float] = {}
        returned: dict[str, float] = {}  # when the create call returned: the task was committed by then
        calls: list[float] = []
        n_b = int(args.b_rate * args.b_seconds)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(n_b):
            delay = start + n / args.b_rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            called = time.time()
            task = await rt.service.create_task(business_b, task_item(n, rec.url(), prefix="b"))
            returned[task.id] = time.time()
            calls.append((returned[task.id] - called) * 1000)
            when = task.next_attempt_at or task.created_at
            due[task.id] = when.replace(tzinfo=when.tzinfo or UTC).timestamp()
        deadline = time.monotonic() + args.b_wait
        while True:
            arrived = {a[0]: a[2] for a in await rec.arrivals() if a[0] in due}
            if len(arrived) == len(due) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        t_end = time.time()
        a_after = (await rec.stats())["ok"]
        await stop_worker(worker)
    finally:
        await rt.close()
        await rec.child.stop()
    lags = [(arrived[i] - due[i]) * 1000 for i in due if i in arrived]
    after_commit = [(arrived[i] - returned[i]) * 1000 for i in due if i in arrived]
    return {"backend": backend, "b_tasks": n_b, "b_arrived": len(lags), "lags": lags, "backlog": count,
            "calls": calls, "after_commit": after_commit,
            "a_rate": (a_after - a_before) / (t_end - t_start), "load": load()}  # fmt: skip


# -- sick host ---------------------------------------------------------------------------------------------


async def _table_writes(db_url: str) -> dict[str, int]:
    """PostgreSQL's own count of the rows written to ``tasks`` (the statistics collector's, flushed when the
    worker's backends exit): updates, and how many of them were HOT (no index entry written)."""
    import asyncpg

    url = sa.make_url(db_url)
    conn = await asyncpg.connect(host=url.host or LOOPBACK, port=url.port or 5432, user=url.username or "postgres",
                                 password=url.password, database=url.database)  # fmt: skip
    try:
        row = await conn.fetchrow(
            "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tasks'"
        )
    finally:
        await conn.close()
    return {"ins": row["n_tup_ins"], "upd": row["n_tup_upd"], "hot": row["n_tup_hot_upd"]} if row else {}


async def healthy_rate(
    fleet: Fleet, backend: str, h: Receiver, s: Receiver, args: argparse.Namespace, *, mixed: bool, label: str
) -> dict[str, Any]:
    """H's delivery rate from the worker's start to H's last task answered (S's tasks mixed in or not), with
    what the worker and PostgreSQL spent meanwhile."""
    await h.reset()
    await s.reset(sleep_s=args.sick_hold)
    db_url = await fresh_database(backend, f"traffic-sick-{backend}", args.pg_url)
    every = round(1 / args.sick_share) if mixed else 0

    def items() -> Any:
        for n in range(args.sick_tasks):
            yield task_item(n, h.url(), prefix="h", timeout=args.sick_timeout)
            if every and n % every == 0:
                yield task_item(n, s.url(), prefix="s", timeout=args.sick_timeout)

    count, _ = await enqueue(db_url, items())
    pg_name = (sa.make_url(db_url).database or "") if backend == "postgres" else ""
    load0 = load()
    pg0 = postgres_backends(pg_name) if pg_name else {}
    worker, ready = await fleet.worker(db_url, concurrency=args.concurrency, max_seconds=args.timeout,
                                       name=f"traffic-worker-sick-{backend}-{label.replace(' ', '')}",
                                       grace_s=1.0)  # fmt: skip
    cpu0 = cpu_seconds(worker.pid)  # start-up (imports, schema check) is not delivery
    stats = await h.wait_ok(args.sick_tasks, timeout=max(120.0, args.sick_tasks / 50))
    worker_cpu = cpu_seconds(worker.pid) - cpu0
    pg_cpu = postgres_cpu_since(pg0, pg_name) if pg_name else 0.0
    s_stats = await s.stats()
    stopped = await worker.stop_worker(timeout=30)
    writes: dict[str, int] = {}
    if pg_name:
        await asyncio.sleep(0.5)  # the exited backends' statistics reach the views
        writes = await _table_writes(db_url)
    claims = stopped.get("trace", {}).get("ops", {}).get("claim", {})
    seconds = stats["last_ok"] - ready["t"]
    return {"label": label, "mixed": mixed, "tasks": count, "h_tasks": args.sick_tasks, "seconds": seconds,
            "rate": args.sick_tasks / seconds, "s_requests": s_stats["requests"] + s_stats["in_flight"],
            "worker_us": worker_cpu / args.sick_tasks * 1e6, "pg_us": pg_cpu / args.sick_tasks * 1e6,
            "claims": claims.get("calls", 0), "claimed": claims.get("rows", 0), "writes": writes,
            "load": f"{load0} -> {load()}"}  # fmt: skip


def sick_plan(rounds: int) -> list[tuple[str, bool]]:
    """H alone, then each round H + S followed by H alone: every mixed run has a run alone on each side."""
    plan = [("H alone 1", False)]
    for n in range(1, rounds + 1):
        plan += [(f"H + S {n}", True), (f"H alone {n + 1}", False)]
    return plan


async def sick_host(fleet: Fleet, backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    h = await receiver(fleet, f"traffic-receiver-h-{backend}", args.timeout)
    s = await receiver(fleet, f"traffic-receiver-s-{backend}", args.timeout, sleep_s=args.sick_hold)
    runs = []
    try:
        for label, mixed in sick_plan(args.sick_rounds):
            print(f"-- {backend} sick host: {label} ...", flush=True)
            run = await healthy_rate(fleet, backend, h, s, args, mixed=mixed, label=label)
            print(
                f"   {run['rate']:,.0f} H tasks/s over {run['seconds']:.1f} s, load {run['load']}", flush=True
            )
            runs.append({"backend": backend, **run})
    finally:
        await h.child.stop()
        await s.child.stop()
    return runs


def sick_rounds(runs: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each mixed run's cost to H against the mean of the runs alone just before and just after it."""
    costs = []
    for i, r in enumerate(runs):
        if r["mixed"]:
            alone = [runs[j]["rate"] for j in (i - 1, i + 1) if 0 <= j < len(runs) and not runs[j]["mixed"]]
            costs.append(1 - r["rate"] / statistics.fmean(alone))
    return costs


# -- limiter overhead --------------------------------------------------------------------------------------


async def add_policies(db_url: str, hosts: list[str]) -> None:
    """A generous policy on every host: a rate and in-flight cap far above what the run reaches."""
    from taskcenter.storage.database import Database
    from taskcenter.storage.schema import host_policies

    db = Database(db_url, pool_size=1)
    now = datetime.now(UTC)
    try:
        async with db.write() as conn:
            await conn.execute(sa.insert(host_policies), [
                {"host": h, "rate_per_second": 1_000_000.0, "burst": 1_000_000, "max_in_flight": 100_000,
                 "updated_at": now} for h in hosts])  # fmt: skip
    finally:
        await db.close()


async def limiter(fleet: Fleet, backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    proc = await fleet.spawn(f"traffic-receivers-{backend}", "bench.traffic", "receivers", "--ports",
                             str(args.hosts), "--max-seconds", str(args.timeout))  # fmt: skip
    ports = [int(p) for p in (await proc.event("ready", timeout=60))["ports"]]
    rec = Receiver(proc, ports[0])
    urls = [f"http://{LOOPBACK}:{p}/hook" for p in ports]
    runs = []
    try:
        for label, policies in (("no policies", False), ("generous policy on every host", True),
                                ("no policies (again)", False)):  # fmt: skip
            print(f"-- {backend} limiter: {label}, {args.limiter_tasks:,} tasks over {len(ports)} hosts ...",
                  flush=True)  # fmt: skip
            db_url = await fresh_database(backend, f"traffic-limiter-{backend}", args.pg_url)
            count, _ = await enqueue(
                db_url, (task_item(n, urls[n % len(urls)]) for n in range(args.limiter_tasks))
            )
            if policies:
                await add_policies(db_url, [f"{LOOPBACK}:{p}" for p in ports])
            d = await deliver_backlog(fleet, rec, db_url, count, concurrency=args.concurrency,
                                      name=f"traffic-worker-limiter-{backend}", timeout=max(120.0, count / 50))  # fmt: skip
            runs.append({"backend": backend, "label": label, "policies": policies, "tasks": count,
                         "arrival_rate": d.arrival_rate, "done_rate": d.done_rate,
                         "cpu_us": d.worker_cpu_s / count * 1e6, "load": load()})  # fmt: skip
    finally:
        await proc.stop()
    return runs


# -- rate accuracy across worker processes -----------------------------------------------------------------


async def set_rate_policy(db_url: str, host: str, rate: float, burst: int) -> None:
    from taskcenter.storage.database import Database
    from taskcenter.storage.schema import host_policies

    db = Database(db_url, pool_size=1)
    try:
        async with db.write() as conn:
            await conn.execute(sa.insert(host_policies).values(
                host=host, rate_per_second=rate, burst=burst, updated_at=datetime.now(UTC)))  # fmt: skip
    finally:
        await db.close()


def busiest_second(times: Sequence[float], *, later: bool) -> int:
    """The most arrivals in a one-second window ``[t, t + 1)`` starting at an arrival: within the first second
    of the run (``later=False``), or after it."""
    first = times[0]
    counts = [
        bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times) if (t >= first + 1.0) == later
    ]
    return max(counts, default=0)


async def rate_accuracy(fleet: Fleet, backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rec = await receiver(fleet, f"traffic-receiver-rate-{backend}", args.timeout)
    runs = []
    try:
        for workers in (1, 2, 3) if backend == "postgres" else (1,):
            print(f"-- {backend} rate: {args.rate_tasks:,} tasks, {args.rate_limit:g}/s burst {args.rate_burst}, "
                  f"{workers} worker process(es) ...", flush=True)  # fmt: skip
            db_url = await fresh_database(backend, f"traffic-rate-{backend}", args.pg_url)
            count, _ = await enqueue(
                db_url, (task_item(n, rec.url(), prefix="r") for n in range(args.rate_tasks))
            )
            await set_rate_policy(db_url, f"{LOOPBACK}:{rec.port}", args.rate_limit, args.rate_burst)
            await rec.reset()
            procs = [
                (await fleet.worker(db_url, concurrency=args.concurrency, max_seconds=args.timeout,
                                    name=f"traffic-worker-rate-{backend}-{n}", grace_s=1.0))[0]
                for n in range(workers)
            ]  # fmt: skip
            try:
                await rec.wait_ok(count, timeout=count / args.rate_limit * 2 + 30)
            finally:
                for proc in procs:
                    await stop_worker(proc)
            times = sorted(a[2] for a in await rec.arrivals() if a[3] == 200)
            after = times[args.rate_burst :]
            runs.append({"backend": backend, "workers": workers, "tasks": count, "arrived": len(times),
                         "first": busiest_second(times, later=False), "later": busiest_second(times, later=True),
                         "long_run": (len(after) - 1) / (after[-1] - after[0]), "load": load()})  # fmt: skip
    finally:
        await rec.child.stop()
    return runs


# -- admission cost (in this process) ---------------------------------------------------------------------


async def admission(backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Statements and CPU per claim of a dispatcher's claim with traffic-control admission, in this process.

    ``args.admission_claims`` batches of 100 due tasks over 50 hosts, with no host policies and with a generous
    policy on every host; statements counted at the write engine (the claim included), CPU as process time (SQLite's
    thread included). Nothing is sent: this isolates what admission costs a claim.
    """
    from taskcenter.config import Settings
    from taskcenter.runtime import Runtime
    from taskcenter.storage import queue

    # Nothing is ever answered here: the slow-host window would hold everything after a while.
    no_window = {"host_slow_window": 0} if "host_slow_window" in Settings.model_fields else {}
    runs = []
    hosts = [f"{LOOPBACK}:{20000 + i}" for i in range(50)]
    for policies in (False, True):
        db_url = await fresh_database(backend, f"traffic-admission-{backend}", args.pg_url, business=True)
        count, _ = await enqueue(
            db_url, (task_item(n, f"http://{hosts[n % 50]}/hook") for n in range(100 * args.admission_claims))
        )
        if policies:
            await add_policies(db_url, hosts)
        rt = Runtime(bench_settings(db_url, **no_window))
        await rt.start()
        try:
            await rt.policies.load()
            dispatcher = rt.dispatcher()
            statements = 0

            def counted(*_args: Any) -> None:
                nonlocal statements
                statements += 1

            sa.event.listen(rt.db.write_engine.sync_engine, "before_cursor_execute", counted)
            per_claim: list[int] = []
            cpu: list[float] = []
            for _ in range(args.admission_claims):
                statements = 0
                cpu0 = time.process_time()
                rows = await queue.claim(rt.db, worker=dispatcher.name, now=datetime.now(UTC), limit=100,
                                         lease_s=60, businesses=rt.policies.business_pks(),
                                         admission=dispatcher._admit)  # fmt: skip
                cpu.append(time.process_time() - cpu0)
                per_claim.append(statements)
                if len(rows) != 100:
                    raise BenchError(f"admission: a claim let {len(rows)} of 100 tasks through, not all")
        finally:
            await rt.close()
        runs.append({"backend": backend, "policies": policies, "first": per_claim[0],
                     "statements": statistics.median(per_claim[1:]), "cpu_ms": statistics.median(cpu) * 1000,
                     "tasks": count, "load": load()})  # fmt: skip
    return runs


# -- report ------------------------------------------------------------------------------------------------


def report(fair: list[dict[str, Any]], sick: list[dict[str, Any]], lim: list[dict[str, Any]],
           args: argparse.Namespace, adm: list[dict[str, Any]] | None = None,
           rate: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    if fair:
        print(f"\nfairness: A's backlog drained by one worker (concurrency {args.concurrency}); B creates "
              f"{args.b_rate:g}/s for {args.b_seconds:g} s; B's start lag = arrival - due time")  # fmt: skip
        print(table(["backend", "A backlog", "B arrived", "B lag p50", "B lag p99", "B lag max", "A rate meanwhile",
                     "target", "verdict", "load avg"], [
            [r["backend"], r["backlog"], f"{r['b_arrived']} of {r['b_tasks']}",
             f"{percentile(r['lags'], 50):.0f} ms", f"{percentile(r['lags'], 99):.0f} ms",
             f"{max(r['lags'], default=float('nan')):.0f} ms", f"{r['a_rate']:,.0f}/s",
             f"p99 < {TARGET_FAIR_P99_MS:g} ms",
             "pass" if r["b_arrived"] == r["b_tasks"] and percentile(r["lags"], 99) < TARGET_FAIR_P99_MS else "FAIL",
             r["load"]] for r in fair]))  # fmt: skip
        print("   where B's lag went: the create call itself (this script's process writing beside the worker) and "
              "arrival - create returned (the task was committed by then):")  # fmt: skip
        print(table(["backend", "create call p50", "create call p99", "after commit p50", "after commit p99"], [
            [r["backend"], f"{percentile(r['calls'], 50):.0f} ms", f"{percentile(r['calls'], 99):.0f} ms",
             f"{percentile(r['after_commit'], 50):.0f} ms", f"{percentile(r['after_commit'], 99):.0f} ms"]
            for r in fair]))  # fmt: skip
    if sick:
        print(f"\nsick host: S holds every request {args.sick_hold:g} s, task timeout {args.sick_timeout:g} s; "
              f"{args.sick_tasks:,} H tasks, S tasks ~{args.sick_share:.0%} of H's when mixed; runs alone and "
              "mixed alternate, each mixed run against the mean of the runs alone on either side of it; CPU per H "
              "task from the worker's start to H's last arrival")  # fmt: skip
        rows = []
        verdicts = []
        for backend in dict.fromkeys(r["backend"] for r in sick):
            runs = [r for r in sick if r["backend"] == backend]
            costs = iter(sick_rounds(runs))
            for r in runs:
                cost = next(costs) if r["mixed"] else None
                w = r["writes"]
                rows.append([backend, r["label"], r["tasks"], f"{r['seconds']:.1f} s", f"{r['rate']:,.0f}/s",
                             r["s_requests"] if r["mixed"] else "-", "-" if cost is None else f"{cost:+.1%}",
                             f"{r['worker_us']:.0f} us", f"{r['pg_us']:.0f} us" if r["pg_us"] else "-",
                             f"{r['claims']:,} / {r['claimed']:,}",
                             f"{w['upd']:,} ({w['upd'] - w['hot']:,})" if w else "-", r["load"]])  # fmt: skip
            round_costs = sick_rounds(runs)
            alone = [r["rate"] for r in runs if not r["mixed"]]
            median = statistics.median(round_costs)
            overall = 1 - statistics.fmean(r["rate"] for r in runs if r["mixed"]) / statistics.fmean(alone)
            verdicts.append([backend, len(round_costs), f"{median:+.1%}",
                             f"{min(round_costs):+.1%} .. {max(round_costs):+.1%}", f"{overall:+.1%}",
                             f"{min(alone):,.0f} .. {max(alone):,.0f}/s ({max(alone) / min(alone) - 1:.0%})",
                             f"< {TARGET_SICK_COST:.0%}", "pass" if median < TARGET_SICK_COST else "FAIL"])  # fmt: skip
        print(table(["backend", "run", "tasks", "H time", "H rate", "S requests", "cost to H (vs runs alone beside)",
                     "worker CPU/H task", "PostgreSQL CPU/H task", "claims / tasks claimed",
                     "tasks rows updated (not HOT)", "load avg"], rows))  # fmt: skip
        print(table(["backend", "rounds", "cost to H, median", "spread of the rounds", "all mixed vs all alone",
                     "runs alone (spread)", "target", "verdict"], verdicts))  # fmt: skip
    if lim:
        print(f"\nlimiter overhead: {args.limiter_tasks:,} tasks over {args.hosts} hosts (ports), one worker, "
              f"concurrency {args.concurrency}; rate to all succeeded in the database")  # fmt: skip
        rows = []
        for backend in dict.fromkeys(r["backend"] for r in lim):
            runs = [r for r in lim if r["backend"] == backend]
            none = statistics.fmean(r["done_rate"] for r in runs if not r["policies"])
            for r in runs:
                cost = 1 - r["done_rate"] / none
                rows.append([backend, r["label"], f"{r['arrival_rate']:,.0f}/s", f"{r['done_rate']:,.0f}/s",
                             f"{r['cpu_us']:.0f} us", f"{cost:+.1%}" if r["policies"] else "-",
                             f"< {TARGET_LIMITER_COST:.0%}" if r["policies"] else "",
                             ("pass" if cost < TARGET_LIMITER_COST else "FAIL") if r["policies"] else "",
                             r["load"]])  # fmt: skip
        print(table(["backend", "run", "to last arrival", "to all succeeded", "worker CPU/task",
                     "cost (vs mean without)", "target", "verdict", "load avg"], rows))  # fmt: skip
    if rate:
        bound = args.rate_limit + args.rate_burst
        first_bound = max(bound + 1, math.ceil(bound * (1 + RATE_FIRST_SLACK)))
        print(f"\nrate accuracy: one host, policy {args.rate_limit:g}/s burst {args.rate_burst}, {args.rate_tasks:,} "
              f"tasks due at once, worker processes sharing the database (concurrency {args.concurrency} each); "
              f"busiest one-second window of arrivals at the receiver, among those starting in the run's first "
              f"second (cold dispatchers, the first burst; allowed {RATE_FIRST_SLACK:.0%} over rate + burst for the "
              f"send path's jitter, as the tests allow) and among those starting later (no slack); long-run rate "
              f"after the first burst")  # fmt: skip
        print(table(["backend", "workers", "arrived", "busiest 1 s, first second", "busiest 1 s, later",
                     "long-run rate", "error", "target", "verdict", "load avg"], [
            [r["backend"], r["workers"], f"{r['arrived']:,} of {r['tasks']:,}", r["first"], r["later"],
             f"{r['long_run']:.1f}/s", f"{r['long_run'] / args.rate_limit - 1:+.1%}",
             f"<= {first_bound}, then <= {bound:g}; {args.rate_limit:g}/s ± {TARGET_RATE_ERROR:.0%}",
             "pass" if r["arrived"] == r["tasks"] and r["first"] <= first_bound and r["later"] <= bound
             and abs(r["long_run"] / args.rate_limit - 1) <= TARGET_RATE_ERROR else "FAIL", r["load"]]
            for r in rate]))  # fmt: skip
    if adm:
        print(f"\nadmission: {args.admission_claims} claims of 100 due tasks over 50 hosts in this process; "
              "statements at the write engine (claim included), CPU = process time per claim (median)")  # fmt: skip
        print(table(["backend", "host policies", "statements, first claim", "statements per claim after",
                     "CPU per claim", "load avg"], [
            [r["backend"], "generous, every host" if r["policies"] else "none", r["first"], f"{r['statements']:g}",
             f"{r['cpu_ms']:.2f} ms", r["load"]] for r in adm]))  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    parts = ["fairness", "sick", "limiter", "admission", "rate"] if args.part == "all" else [args.part]
    fair: list[dict[str, Any]] = []
    sick: list[dict[str, Any]] = []
    lim: list[dict[str, Any]] = []
    adm: list[dict[str, Any]] = []
    rate: list[dict[str, Any]] = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        for backend in backends(args.backend):
            if "fairness" in parts:
                fair.append(await fairness(fleet, backend, args))
            if "sick" in parts:
                sick += await sick_host(fleet, backend, args)
            if "limiter" in parts:
                lim += await limiter(fleet, backend, args)
            if "admission" in parts:
                adm += await admission(backend, args)
            if "rate" in parts:
                rate += await rate_accuracy(fleet, backend, args)
    header("traffic control: fairness, sick host, limiter overhead (one worker process each), admission cost, "
           "rate accuracy across worker processes")  # fmt: skip
    report(fair, sick, lim, args, adm, rate)
    if any(r["b_arrived"] < r["b_tasks"] for r in fair):
        raise BenchError(f"some of B's tasks had not arrived {args.b_wait:g} s after the last was created")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/traffic.py", __doc__, timeout=1200)
    parser.add_argument(
        "--part", choices=["fairness", "sick", "limiter", "admission", "rate", "all"], default="all"
    )
    parser.add_argument("--concurrency", type=int, default=100, help="the worker's requests in flight")
    parser.add_argument("--backlog", type=int, default=100_000, help="fairness: business A's backlog")
    parser.add_argument("--b-rate", type=float, default=20, help="fairness: B's creates per second")
    parser.add_argument("--b-seconds", type=float, default=10, help="fairness: how long B creates")
    parser.add_argument(
        "--b-wait", type=float, default=120, help="fairness: how long to wait for B's last task to arrive"
    )
    parser.add_argument(
        "--sick-tasks", type=int, default=30_000, help="sick: tasks to the healthy host per run (~10 s a run)"
    )
    parser.add_argument(
        "--sick-rounds", type=int, default=3, help="sick: runs with S, each between two runs of H alone"
    )
    parser.add_argument("--sick-share", type=float, default=0.1, help="sick: S tasks per H task when mixed")
    parser.add_argument("--sick-timeout", type=float, default=2.0, help="sick: every task's timeout, seconds")
    parser.add_argument("--sick-hold", type=float, default=10.0, help="sick: how long S holds each request")
    parser.add_argument("--hosts", type=int, default=50, help="limiter: hosts (receiver ports)")
    parser.add_argument("--limiter-tasks", type=int, default=10_000, help="limiter: tasks per run")
    parser.add_argument(
        "--admission-claims", type=int, default=40, help="admission: claims measured per variant"
    )
    parser.add_argument("--rate-limit", type=float, default=200.0, help="rate: the host's policy, per second")
    parser.add_argument("--rate-burst", type=int, default=20, help="rate: the host's burst")
    parser.add_argument("--rate-tasks", type=int, default=3000, help="rate: tasks per run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "receivers":
        child()
    else:
        run_script(main(parse()))
