"""Crash safety of delivery with real ``taskcenter worker`` processes, killed and restarted at random moments.

A few thousand tasks — succeeding, failing and retried, failing for good, outlasting a lease, scheduled,
cancelled on the way — go to a loopback receiver while workers are SIGKILLed (now and then stopped with SIGTERM
instead) and restarted, stalled with SIGSTOP past their leases and continued, and, on PostgreSQL, have their
database connections terminated. Then, from what the receiver got and what the database holds: no task lost,
each reached a final state (or waits for its time) that its kind allows, none was sent before its time, no
(task, attempt) arrived twice, every attempt that arrived is recorded and every recorded answer arrived, the
attempt rows agree with each task's counter, cancelled tasks were not tried again, interrupted attempts come only
from a worker killed, stopped or stalled (never from one alive and well) and no more than it held, only a
stalled worker sends an attempt after its rescue, and a killed worker's leases were rescued within seconds.

PostgreSQL runs three workers on one database. SQLite scales out only on PostgreSQL (docs/operations.md): there
one worker is killed and restarted, with this process creating and cancelling beside it, as an API process would.
The schedule of kills, the tasks and the receiver's delays come from a seed, printed (``TASKCENTER_CHAOS_SEED``
replays it; the timing of real processes does not replay).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import random
import signal
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from aiohttp import web

from taskcenter.errors import InvalidTransition
from taskcenter.runtime import Runtime
from taskcenter.service import Business
from taskcenter.storage.schema import attempts as attempts_table
from taskcenter.storage.schema import tasks as tasks_table
from tests.processes import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Every task's retry policy: quick retries, five attempts.
RETRY = {"strategy": "intervals", "intervals": [0.2, 0.5, 1.0, 1.0]}
LEASE_S = 3.0
RESCUE_INTERVAL_S = 0.5
CONCURRENCY = 10
CLAIM_BATCH = 20
#: What one dispatcher can hold leased: its slots and what it claims ahead of them (dispatcher._claim_loop).
CAPACITY = CONCURRENCY + min(CLAIM_BATCH, 4 * CONCURRENCY)
#: A killed worker's leases are rescued at most this long after the rescue became possible — the lease ran out
#: and a started worker runs (on SQLite the one worker is killed too, and a restarted one takes a while to start;
#: a stalled one may hold the lock or rows the rescue needs): a rescue pass, plus slack for a loaded machine.
RESCUE_LATE_S = RESCUE_INTERVAL_S + 3.0
WORKER_SETTINGS = {
    "lease_s": LEASE_S,
    "rescue_interval_s": RESCUE_INTERVAL_S,
    "claim_batch": CLAIM_BATCH,
    "poll_interval_s": 1.0,
    "shutdown_grace_s": 1.0,
    # One host (the receiver) answers 503 and 400 on purpose: its circuit must not open and defer everything.
    "breaker_failures": 1_000_000,
}


@dataclass(frozen=True)
class Plan:
    """How hard one backend's run pushes."""

    workers: int
    tasks: int
    upfront: int
    """Tasks created before the first worker starts; the rest are created during the chaos."""
    chaos_s: float
    action_every_s: tuple[float, float]
    actions: tuple[tuple[str, float], ...]
    """(action, weight): ``kill`` (SIGKILL, restart), ``term`` (SIGTERM, restart), ``stall`` (SIGSTOP for up to
    two leases, then SIGCONT: a live worker whose leases were rescued meanwhile), ``sever`` (PostgreSQL: terminate
    a worker's database connections)."""


PLANS = {
    "sqlite": Plan(
        workers=1, tasks=1500, upfront=500, chaos_s=24.0, action_every_s=(1.5, 3.5),
        actions=(("kill", 0.6), ("term", 0.15), ("stall", 0.25)),
    ),
    "postgres": Plan(
        workers=3, tasks=2400, upfront=800, chaos_s=26.0, action_every_s=(0.7, 2.0),
        actions=(("kill", 0.45), ("term", 0.1), ("sever", 0.25), ("stall", 0.2)),
    ),
}  # fmt: skip


# -- the receiver --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    task: str
    attempt: int
    kind: str
    at: float
    status: int


class Sink:
    """A loopback receiver that answers by path and attempt number, and records every request as it arrives.

    ``/ok`` 200 at once, ``/slow`` 200 after 0.3-1.5 s (so that kills cut requests off), ``/long`` 200 after
    more than a lease (only the heartbeat keeps it), ``/flaky?fail=n`` 503 for attempts up to n then 200, ``/bad``
    400.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.arrivals: list[Arrival] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.time()
        await request.read()
        kind = request.path.strip("/")
        attempt = int(request.headers["X-Task-Attempt"])
        status, delay = 200, 0.0
        if kind == "slow":
            delay = self.rng.uniform(0.3, 1.5)
        elif kind == "long":
            delay = self.rng.uniform(LEASE_S + 0.5, LEASE_S + 2.0)
        elif kind == "flaky":
            status = 503 if attempt <= int(request.query["fail"]) else 200
        elif kind == "bad":
            status = 400
        self.arrivals.append(Arrival(request.headers["X-Task-Id"], attempt, kind, at, status))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status)


# -- the workers ---------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The worker processes: started, killed, restarted; what was done to them is counted."""

    db_url: str
    size: int
    procs: list[WorkerProcess] = field(default_factory=list)
    stopped: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Worker name prefix (``host:pid:``) of each process that ended -> how (``kill``, ``term``, or ``died`` by
    itself) and when (``time.time()`` as the signal was sent, or as it was found dead)."""
    died: list[str] = field(default_factory=list)
    """The output of workers found dead that nobody stopped."""
    stalled: dict[str, list[list[float]]] = field(default_factory=lambda: collections.defaultdict(list))
    """Worker name prefix -> when it was stalled: [SIGSTOP, SIGCONT] (``time.time()``; inf while stopped)."""
    frozen: set[int] = field(default_factory=set)
    """The pids stalled right now."""
    started: set[int] = field(default_factory=set)
    """The pids of workers seen started (their dispatcher said so)."""
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    term_codes: list[int] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    """The output files of every worker started (kept when the test fails)."""

    def start_all(self) -> None:
        self.procs = [self._spawn() for _ in range(self.size)]
        for proc in self.procs:
            proc.wait_ready()

    def up(self) -> bool:
        """Whether a started worker runs, and none is stalled (it may hold the lock or rows a rescue needs)."""
        return not self.frozen and any(p.alive() and self.ready(p) for p in self.procs)

    def ready(self, proc: WorkerProcess) -> bool:
        if proc.proc.pid not in self.started and "started (concurrency" in proc.output():
            self.started.add(proc.proc.pid)
        return proc.proc.pid in self.started

    def _spawn(self) -> WorkerProcess:
        proc = WorkerProcess(self.db_url, concurrency=CONCURRENCY, **WORKER_SETTINGS)
        self.logs.append(proc.log.name)
        return proc

    @staticmethod
    def prefix(proc: WorkerProcess) -> str:
        return f"{socket.gethostname()}:{proc.proc.pid}:"

    def check(self) -> None:
        """Replace (and remember) workers that died by themselves: a worker must survive what is done here."""
        for n, proc in enumerate(self.procs):
            if not proc.alive() and self.prefix(proc) not in self.stopped:
                self.died.append(proc.output()[-4000:])
                self.stopped[self.prefix(proc)] = ("died", time.time())
                self.procs[n] = self._spawn()

    def stop(self, n: int, how: str) -> str:
        """SIGKILL (``kill``) or SIGTERM (``term``) worker ``n`` and start another in its place; its name prefix."""
        proc = self.procs[n]
        name = self.prefix(proc)
        if how == "kill":
            self.stopped[name] = (how, time.time())
            proc.kill()
        else:
            # Until its signal handlers are set (just before its first claim, holding nothing yet) SIGTERM ends a
            # starting worker at once, with -15: stop only a started one this way.
            proc.wait_ready()
            self.stopped[name] = (how, time.time())
            self.term_codes.append(proc.terminate(timeout=30))
        self.counts[how] += 1
        self.procs[n] = self._spawn()
        return name

    def ports(self, n: int) -> list[int]:
        """The local ports of worker ``n``'s TCP connections (its database connections among them)."""
        try:
            conns = psutil.Process(self.procs[n].proc.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return []
        return [c.laddr.port for c in conns if c.raddr]

    def shut_down(self) -> list[int]:
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.terminate(timeout=30))
            except Exception:
                proc.kill()
                codes.append(-9)
        return codes


# -- the run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cancel:
    attempts: int
    """The task's attempts when its cancel committed (read in the cancel's transaction)."""
    returned_at: float


@dataclass
class Run:
    rt: Runtime
    biz: Business
    sink: Sink
    fleet: Fleet
    plan: Plan
    rng: random.Random
    kinds: dict[str, str] = field(default_factory=dict)
    """Task uuid -> its kind: ok, slow, long, flaky, bad, scheduled (due within the run), future (due in an hour)."""
    scheduled_at: dict[str, float] = field(default_factory=dict)
    cancels: dict[str, Cancel] = field(default_factory=dict)
    rescue_waits: list[tuple[float, float]] = field(default_factory=list)
    """For each kill: seconds until no task was leased by the killed worker, and how much of that came after
    its leases had run out while a started worker ran (see ``RESCUE_LATE_S``)."""
    severed: int = 0
    checks: set[asyncio.Task[None]] = field(default_factory=set)

    def item(self, n: int) -> dict[str, Any]:
        roll = self.rng.random()
        data: dict[str, Any] = {"business_id": f"c{n}", "retry": RETRY}
        if roll < 0.42:
            kind, path = "ok", "/ok"
        elif roll < 0.45:
            kind, path = "long", "/long"
        elif roll < 0.55:
            kind, path = "slow", "/slow"
        elif roll < 0.70:
            kind, path = "flaky", f"/flaky?fail={self.rng.randint(1, 3)}"
        elif roll < 0.75:
            kind, path = "bad", "/bad"
        elif roll < 0.95:
            kind, path = "scheduled", "/ok"
            data["delay"] = round(self.rng.uniform(1.0, self.plan.chaos_s), 3)
        else:
            kind, path = "future", "/ok"
            data["delay"] = 3600
        data["url"] = self.sink.url(path)
        data["metadata"] = {"kind": kind}
        return data

    async def create(self, start: int, count: int) -> None:
        items = [self.item(n) for n in range(start, start + count)]
        for made in await self.rt.service.create_tasks(self.biz, items):
            task = made["task"]
            self.kinds[task.id] = task.metadata["kind"]
            if task.scheduled_at is not None:
                self.scheduled_at[task.id] = task.scheduled_at.timestamp()

    async def cancel_some(self) -> None:
        """Cancel a few tasks picked at random (many have finished already: those refuse)."""
        for uuid in self.rng.sample(sorted(self.kinds), 3):
            if uuid in self.cancels:
                continue
            try:
                task = await self.rt.service.cancel(self.biz, uuid)
            except InvalidTransition:
                continue
            self.cancels[uuid] = Cancel(task.attempts, time.time())

    async def leased_by(self, prefix: str) -> int:
        async with self.rt.db.read() as conn:
            return int(
                (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(tasks_table)
                        .where(tasks_table.c.lease_owner.startswith(prefix))
                    )
                ).scalar_one()
            )

    def watch_rescue(self, prefix: str, since: float) -> None:
        """Time how long the killed worker's leases stay behind."""

        async def watch() -> None:
            expired = since + LEASE_S  # its last heartbeat was at most this long before the kill
            up_since: float | None = None
            late = 0.0
            while await self.leased_by(prefix):
                now = time.monotonic()
                if self.fleet.up():
                    up_since = up_since or now
                    late = max(late, now - max(expired, up_since))
                else:
                    up_since = None
                await asyncio.sleep(0.2)
            self.rescue_waits.append((time.monotonic() - since, late))

        task = asyncio.create_task(watch())
        self.checks.add(task)

    async def sever(self, n: int) -> None:
        """Terminate worker ``n``'s connections to this database (this database's backends only)."""
        ports = self.fleet.ports(n)
        if not ports:
            return
        async with self.rt.db.autocommit() as conn:
            killed = (
                await conn.execute(
                    sa.text(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND client_port = ANY(:ports)"
                    ),
                    {"ports": ports},
                )
            ).scalar_one()
        self.severed += int(killed)
        self.fleet.counts["sever"] += 1

    def stall(self, n: int) -> None:
        """SIGSTOP worker ``n`` now and SIGCONT it a random while later (up to two leases): its leases run out
        while it is stopped, others rescue and send its tasks again, and then it goes on as if nothing happened."""
        pid = self.fleet.procs[n].proc.pid
        if pid in self.fleet.frozen:
            return
        pause_s = self.rng.uniform(0.5, 2 * LEASE_S)
        window = [time.time(), math.inf]
        os.kill(pid, signal.SIGSTOP)
        self.fleet.frozen.add(pid)
        self.fleet.stalled[self.fleet.prefix(self.fleet.procs[n])].append(window)
        self.fleet.counts["stall"] += 1

        async def resume() -> None:
            try:
                await asyncio.sleep(pause_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                window[1] = time.time()
                self.fleet.frozen.discard(pid)

        task = asyncio.create_task(resume())
        self.checks.add(task)

    async def act(self) -> None:
        actions, weights = zip(*self.plan.actions, strict=True)
        action = self.rng.choices(actions, weights)[0]
        n = self.rng.randrange(len(self.fleet.procs))
        await asyncio.to_thread(self.fleet.check)
        if action == "sever":
            # A worker still starting ends on a database error (one line, exit 1, holding nothing yet), as it does
            # when the database cannot be reached: cut off only a started one.
            if self.fleet.ready(self.fleet.procs[n]):
                await self.sever(n)
            return
        if action == "stall":
            self.stall(n)
            return
        if action == "term" and self.fleet.procs[n].proc.pid in self.fleet.frozen:
            action = "kill"  # a stopped process would hold its SIGTERM until it is continued
        since = time.monotonic()
        prefix = await asyncio.to_thread(self.fleet.stop, n, action)
        if action == "kill":
            self.watch_rescue(prefix, since)

    async def chaos(self) -> None:
        """Act at random moments while creating the rest of the tasks and cancelling some now and then."""
        plan = self.plan
        start = time.monotonic()
        end = start + plan.chaos_s
        created = plan.upfront
        trickle = plan.tasks - plan.upfront
        next_act = start + self.rng.uniform(*plan.action_every_s)
        while (now := time.monotonic()) < end:
            # The rest of the tasks arrive evenly over the first three quarters of the chaos.
            due = plan.upfront + min(trickle, int(trickle * (now - start) / (plan.chaos_s * 0.75)))
            if due > created:
                await self.create(created, due - created)
                created = due
            if self.rng.random() < 0.3:
                await self.cancel_some()
            if now >= next_act:
                await self.act()
                next_act = time.monotonic() + self.rng.uniform(*plan.action_every_s)
            await asyncio.sleep(0.1)
        if created < plan.tasks:
            await self.create(created, plan.tasks - created)

    async def settle(self, timeout: float) -> None:
        """Wait until no task is leased and each is final or waits for a time past the run."""
        deadline = time.monotonic() + timeout
        while True:
            soon = datetime.now(UTC) + timedelta(minutes=10)
            async with self.rt.db.read() as conn:
                open_ = (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(tasks_table)
                        .where(
                            sa.or_(
                                tasks_table.c.lease_owner.is_not(None),
                                tasks_table.c.status == "processing",
                                sa.and_(
                                    tasks_table.c.status.in_(["pending", "retrying"]),
                                    tasks_table.c.next_attempt_at < soon,
                                ),
                            )
                        )
                    )
                ).scalar_one()
            if not open_:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{open_} tasks still open {timeout} s after the chaos ended")
            await asyncio.to_thread(self.fleet.check)
            await asyncio.sleep(0.3)


# -- what is checked ------------------------------------------------------------------------------------


def _violations(label: str, items: Iterable[Any], found: dict[str, list[Any]], limit: int = 5) -> None:
    listed = list(items)
    if listed:
        found[label] = listed[:limit] + ([f"... {len(listed)} in all"] if len(listed) > limit else [])


async def _database(rt: Runtime) -> tuple[dict[str, Mapping[str, Any]], dict[str, list[Mapping[str, Any]]]]:
    async with rt.db.read() as conn:
        rows = (await conn.execute(sa.select(tasks_table))).mappings().all()
        tries = (
            (
                await conn.execute(
                    sa.select(attempts_table).order_by(attempts_table.c.task_id, attempts_table.c.id)
                )
            )
            .mappings()
            .all()
        )
    by_pk = {row["id"]: str(row["uuid"]) for row in rows}
    attempts: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for a in tries:
        attempts[by_pk[a["task_id"]]].append(a)
    return {str(row["uuid"]): row for row in rows}, attempts


FINAL = {"succeeded", "failed", "cancelled"}
#: What each kind of task may end as when it was not cancelled: (status, outcome) pairs. A task whose budget
#: the kills spent (each kill charges the tasks its worker held an interrupted attempt) fails ``interrupted``.
ENDS = {
    "ok": {("succeeded", "success"), ("failed", "interrupted")},
    "slow": {("succeeded", "success"), ("failed", "interrupted")},
    "long": {("succeeded", "success"), ("failed", "interrupted")},
    "scheduled": {("succeeded", "success"), ("failed", "interrupted")},
    "flaky": {("succeeded", "success"), ("failed", "interrupted"), ("failed", "server_error")},
    "bad": {("failed", "client_error"), ("failed", "interrupted")},
    "future": {("pending", None)},
}


def _prefix(worker: str | None) -> str:
    """``host:pid:`` of a worker name ``host:pid:random``."""
    return (worker or "").rsplit(":", 1)[0] + ":"


def _interrupted_by_chaos(fleet: Fleet, attempt: Mapping[str, Any]) -> bool:
    """Whether an interrupted attempt is explained by what was done to its worker: cut off by a SIGTERM's grace
    period, or rescued (its ``started_at`` is the rescue's time) after its worker was killed, or while it was
    stalled (or just after: a worker that continues renews its leases with its next heartbeat)."""
    worker = _prefix(attempt["worker"])
    how, when = fleet.stopped.get(worker, ("", math.inf))
    if attempt["error"] == "worker shut down before the response arrived":
        return how == "term"
    at = attempt["started_at"].timestamp()
    if how in ("kill", "died") and at >= when:
        return True
    return any(start <= at <= end + RESCUE_LATE_S for start, end in fleet.stalled.get(worker, ()))


def check(
    run: Run,
    tasks: Mapping[str, Mapping[str, Any]],
    attempts: Mapping[str, list[Mapping[str, Any]]],
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Every invariant, as the violations found (none when all hold), and the figures of the run."""
    found: dict[str, list[Any]] = {}
    now = datetime.now(UTC)
    arrivals = run.sink.arrivals
    arrived: dict[str, list[Arrival]] = collections.defaultdict(list)
    for a in arrivals:
        arrived[a.task].append(a)
    pairs = collections.Counter((a.task, a.attempt) for a in arrivals)
    answered = {(a.task, a.attempt): a.status for a in arrivals}
    recorded = {(u, a["number"]): a for u, rows in attempts.items() for a in rows}
    last = {u: max(rows, key=lambda a: a["number"]) for u, rows in attempts.items() if rows}

    # Nothing lost, everything final (or waiting for its time), as its kind allows.
    _violations("created, not in the database", (u for u in run.kinds if u not in tasks), found)
    _violations("in the database, never created", (u for u in tasks if u not in run.kinds), found)
    _violations(
        "not final",
        (
            (u, r["status"], r["attempts"], r["lease_owner"])
            for u, r in tasks.items()
            if r["status"] not in FINAL and not (r["status"] == "pending" and r["next_attempt_at"] > now)
        ),
        found,
    )
    _violations(
        "an end its kind does not allow",
        (
            (u, run.kinds[u], r["status"], r["outcome"], r["attempts"])
            for u, r in tasks.items()
            if r["status"] != "cancelled" and (r["status"], r["outcome"]) not in ENDS[run.kinds.get(u, "ok")]
        ),
        found,
    )
    _violations(
        "cancelled, but not by this test",
        (u for u, r in tasks.items() if r["status"] == "cancelled" and u not in run.cancels),
        found,
    )

    # The attempt rows and the counter: numbers 1..attempts, each once; the task's outcome is its last one's.
    _violations(
        "attempt numbers not 1..attempts",
        (
            (
                u,
                r["attempts"],
                [
                    (a["number"], a["outcome"], a["worker"], a["started_at"].isoformat())
                    for a in attempts.get(u, [])
                ],
            )
            for u, r in tasks.items()
            if sorted(a["number"] for a in attempts.get(u, [])) != list(range(1, r["attempts"] + 1))
        ),
        found,
    )
    _violations(
        "outcome differs from the last attempt's",
        (
            (u, r["outcome"], last[u]["outcome"])
            for u, r in tasks.items()
            if r["attempts"] and u in last and last[u]["outcome"] != r["outcome"]
        ),
        found,
    )

    # The receiver against the database: nothing sent twice, all that arrived recorded, all recorded answers real.
    _violations("arrived more than once", ((p, n) for p, n in pairs.items() if n > 1), found)
    _violations("arrived, never recorded", (p for p in pairs if p not in recorded), found)
    _violations(
        "an answer recorded that did not arrive (or another status)",
        (
            (p, a["outcome"], (a["response"] or {}).get("status_code"), answered.get(p))
            for p, a in recorded.items()
            if a["outcome"] != "interrupted" and (a["response"] or {}).get("status_code") != answered.get(p)
        ),
        found,
    )
    _violations(
        "an outcome this receiver never causes",
        (
            (p, a["outcome"], a["error"])
            for p, a in recorded.items()
            if a["outcome"] not in {"success", "client_error", "server_error", "interrupted"}
        ),
        found,
    )
    _violations(
        "sent before its time",
        (
            (a.task, a.attempt, run.scheduled_at[a.task], a.at)
            for a in arrivals
            if a.task in run.scheduled_at and a.at < run.scheduled_at[a.task] - 0.001
        ),
        found,
    )

    # Stale sends: an attempt that arrived after the rescue that recorded it interrupted. A killed worker sends
    # nothing after its kill; a stalled one, continued, gives back unsent what it had claimed once its leases may
    # have run out (it looks just before each request: tests/test_engine.py, the stalled worker), but a request
    # already on its way when the stall hit (past that look: a connection being opened) still goes: only those
    # are allowed.
    stale = [
        (a, recorded[(a.task, a.attempt)])
        for a in arrivals
        if (a.task, a.attempt) in recorded
        and recorded[(a.task, a.attempt)]["outcome"] == "interrupted"
        and recorded[(a.task, a.attempt)]["error"] != "worker shut down before the response arrived"
        and a.at > recorded[(a.task, a.attempt)]["started_at"].timestamp()
    ]
    _violations(
        "sent after its rescue, by a worker that was not stalled",
        (
            (a.task, a.attempt, r["worker"], r["started_at"].isoformat(), a.at)
            for a, r in stale
            if _prefix(r["worker"]) not in run.fleet.stalled
        ),
        found,
    )
    stale_pairs = {(a.task, a.attempt) for a, _r in stale}

    # Cancelled: never tried again; after the cancel returned, only the attempt then in flight may arrive (or a
    # stalled worker's stale send, above).
    after_cancel = []
    for u, c in run.cancels.items():
        row = tasks.get(u)
        if row is None:
            continue
        if row["status"] != "cancelled" or row["attempts"] > c.attempts + 1:
            found.setdefault("tried again after its cancel", []).append(
                (u, row["status"], c.attempts, row["attempts"])
            )
        for a in arrived.get(u, []):
            if a.at > c.returned_at:
                after_cancel.append(a)
                if a.attempt != c.attempts + 1 and (a.task, a.attempt) not in stale_pairs:
                    found.setdefault("sent after its cancel returned", []).append((u, c.attempts, a.attempt))

    # Interrupted attempts: cut off by a SIGTERM's grace period, or rescued from a worker after it was killed or
    # while it was stalled — never from a worker alive and well — and each time at most what one worker holds:
    # its slots, what it claimed ahead, and results finished but not written yet (at most a slot's worth more).
    interrupted = [(p, a) for p, a in recorded.items() if a["outcome"] == "interrupted"]
    _violations(
        "interrupted while its worker was alive and well",
        (
            (p, a["worker"], a["started_at"].isoformat(), a["error"])
            for p, a in interrupted
            if not _interrupted_by_chaos(run.fleet, a)
        ),
        found,
    )
    per_worker = collections.Counter(_prefix(a["worker"]) for _p, a in interrupted)
    stalled = run.fleet.stalled
    _violations(
        "more interrupted attempts than a worker holds",
        (
            (w, n)
            for w, n in per_worker.items()
            if n > 2 * CAPACITY * ((w in run.fleet.stopped) + len(stalled.get(w, ())))
        ),
        found,
    )
    _violations("workers that died by themselves", run.fleet.died, found, limit=2)
    _violations("SIGTERM exit codes", (c for c in run.fleet.term_codes if c != 0), found)
    _violations(
        "a killed worker's leases stayed behind (s, s late)",
        ((round(w, 1), round(late, 1)) for w, late in run.rescue_waits if late > RESCUE_LATE_S),
        found,
    )
    _violations(
        "leases left at the end", ((u, r["lease_owner"]) for u, r in tasks.items() if r["lease_owner"]), found
    )

    statuses = collections.Counter(r["status"] for r in tasks.values())
    waits = sorted(w for w, _late in run.rescue_waits)
    figures = {
        "tasks": len(tasks),
        "statuses": dict(statuses),
        "arrivals": len(arrivals),
        "attempts recorded": len(recorded),
        "kills": run.fleet.counts["kill"],
        "sigterms": run.fleet.counts["term"],
        "stalls": run.fleet.counts["stall"],
        "severs": run.fleet.counts["sever"],
        "connections terminated": run.severed,
        "interrupted": len(interrupted),
        "interrupted that arrived": sum(1 for p, _a in interrupted if p in pairs),
        "interrupted, most of one worker": max(per_worker.values(), default=0),
        "failed interrupted": sum(
            1 for r in tasks.values() if (r["status"], r["outcome"]) == ("failed", "interrupted")
        ),
        "scheduled": len(run.scheduled_at),
        "scheduled, earliest arrival past its time s": round(
            min(
                (a.at - run.scheduled_at[a.task] for a in arrivals if a.task in run.scheduled_at), default=0.0
            ),
            3,
        ),
        "cancelled": len(run.cancels),
        "sent after a cancel returned (the attempt in flight, or stale)": len(after_cancel),
        "sent after its rescue (stale, by a stalled worker)": len(stale),
        "rescue wait s (min/median/max)": (
            [round(waits[0], 1), round(waits[len(waits) // 2], 1), round(waits[-1], 1)] if waits else []
        ),
        "rescue late s (max)": round(max((late for _w, late in run.rescue_waits), default=0.0), 1),
    }
    return found, figures


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_workers_killed_at_random_lose_no_task_and_send_no_attempt_twice(
    runtime: Runtime, db_url: str, backend: str
) -> None:
    seed = int(os.environ.get("TASKCENTER_CHAOS_SEED") or random.randrange(1 << 32))
    print(f"chaos seed {seed} ({backend}); TASKCENTER_CHAOS_SEED={seed} replays it")
    rng = random.Random(seed)
    plan = PLANS[backend]
    sink = Sink(random.Random(rng.random()))
    await sink.start()
    biz = await runtime.service.ensure_business("chaos", rate_limit_per_minute=600_000)
    fleet = Fleet(db_url, plan.workers)
    run = Run(runtime, biz, sink, fleet, plan, rng)
    started = time.monotonic()
    try:
        await run.create(0, plan.upfront)
        await asyncio.to_thread(fleet.start_all)
        await run.chaos()
        # The last stalled worker continued, the last killed one's leases rescued:
        await asyncio.wait_for(asyncio.gather(*run.checks), timeout=60)
        await asyncio.to_thread(fleet.check)
        await run.settle(timeout=60)
        await asyncio.sleep(0.5)  # a request still on its way would have arrived by now
    finally:
        for task in run.checks:
            task.cancel()  # a stalled worker is continued
        await asyncio.gather(*run.checks, return_exceptions=True)
        codes = await asyncio.to_thread(fleet.shut_down)
        await sink.close()
    tasks, attempts = await _database(runtime)
    found, figures = check(run, tasks, attempts)
    figures["seconds"] = round(time.monotonic() - started, 1)
    print(f"chaos {backend} seed {seed}: {figures}")
    if found or codes != [0] * len(codes):
        print("the workers' output:", *fleet.logs)
    else:
        for name in fleet.logs:
            os.unlink(name)
    assert codes == [0] * len(codes), codes
    assert not found, f"seed {seed}: {found}\n{figures}"
