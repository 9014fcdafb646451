"""Shared machinery of the delivery benchmarks: the loopback receiver, worker and raw-client processes,
database preparation, bulk enqueue and the printing of figures.

Child processes start as ``python -m bench.common receiver|worker|rawclient …`` and talk JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import aiohttp
import orjson
import psutil
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PG_URL = os.environ.get("TASKCENTER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/taskcenter_bench")
LOOPBACK = "127.0.0.1"
BUSINESS = "bench"
HOOK = "/hook"
#: First attempts that fail are retried after one second (the issue's failure scenario).
RETRY_AFTER_1S: dict[str, Any] = {"strategy": "intervals", "intervals": [1, 1]}
BACKENDS = ("sqlite", "postgres")


class BenchError(Exception):
    """A benchmark could not run (a child died, a database is missing, a run did not finish in time)."""


def emit(event_name: str, **data: Any) -> None:
    """One JSON line on stdout: how child processes report to the benchmark script."""
    sys.stdout.write(json.dumps({"event": event_name, **data}) + "\n")
    sys.stdout.flush()


def run_loop(main: Coroutine[Any, Any, None], *, use_uvloop: bool = True) -> None:
    """Run ``main`` on uvloop when asked (and installed), else on asyncio's default loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


# -- the receiver (its own process) -----------------------------------------------------------------


def fails_first_attempt(task_id: str, fraction: float) -> bool:
    """Whether the receiver fails this task's first attempt: a deterministic hash, the same in every run."""
    return fraction > 0 and zlib.crc32(task_id.encode()) % 100_000 < fraction * 100_000


@dataclass
class ReceiverState:
    """What the receiver was told to do and what it saw."""

    fail_fraction: float = 0.0
    sleep_s: float = 0.0
    requests: int = 0
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    first: float = 0.0
    last: float = 0.0
    last_ok: float = 0.0
    arrivals: list[tuple[str, str, float, int]] = field(default_factory=list)
    """(X-Task-Id, X-Task-Attempt, arrival time.time(), status answered) per request."""
    peers: set[Any] = field(default_factory=set)
    """Client (address, port) pairs seen: how many connections the requests came over (keep-alive at work)."""

    def counts(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would deep-copy every arrival on each poll and steal CPU from the worker.
        names = ("fail_fraction", "sleep_s", "requests", "ok", "failed", "in_flight", "max_in_flight")
        counts: dict[str, Any] = {name: getattr(self, name) for name in names}
        counts.update(first=self.first, last=self.last, last_ok=self.last_ok, connections=len(self.peers))
        return counts


STATE = web.AppKey("state", ReceiverState)


async def _deliver(request: web.Request) -> web.Response:
    state = request.app[STATE]
    arrived = time.time()
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        await request.read()
        task_id = request.headers.get("X-Task-Id", "")
        attempt = request.headers.get("X-Task-Attempt", "")
        status = 500 if attempt == "1" and fails_first_attempt(task_id, state.fail_fraction) else 200
        if state.sleep_s:
            await asyncio.sleep(state.sleep_s)
    finally:
        state.in_flight -= 1
    state.requests += 1
    state.first = state.first or arrived
    state.last = max(state.last, arrived)
    if status == 200:
        state.ok += 1
        state.last_ok = max(state.last_ok, arrived)
    else:
        state.failed += 1
    state.arrivals.append((task_id, attempt, arrived, status))
    if request.transport is not None:
        state.peers.add(request.transport.get_extra_info("peername"))
    return web.Response(status=status, text="ok" if status == 200 else "scripted failure")


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].counts())


async def _arrivals(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[STATE].arrivals), content_type="application/json")


async def _reset(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[STATE] = ReceiverState(
        fail_fraction=float(body["fail_fraction"]), sleep_s=float(body["sleep_s"])
    )
    return web.json_response({"ok": True})


async def _receiver_main(args: argparse.Namespace) -> None:
    app = web.Application()
    app[STATE] = ReceiverState(fail_fraction=args.fail_fraction, sleep_s=args.sleep)
    app.router.add_get("/_bench/stats", _stats)
    app.router.add_get("/_bench/arrivals", _arrivals)
    app.router.add_post("/_bench/reset", _reset)
    app.router.add_route("*", "/{tail:.*}", _deliver)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, backlog=4096)
    await site.start()
    emit("ready", pid=os.getpid(), port=runner.addresses[0][1])
    await until_stopped(args.max_seconds)
    await runner.cleanup()


# -- the worker (its own process) --------------------------------------------------------------------


_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def sql_kind(statement: str) -> str:
    """A short label for a statement: verb, table and the markers that tell the queue's statements apart."""
    text = " ".join(statement.split())
    verb = text.split(" ", 1)[0].upper()
    match = _TABLE.search(text)
    label = f"{verb} {match.group(1)}" if match and verb in ("SELECT", "INSERT", "UPDATE", "DELETE") else verb
    upper = text.upper()
    for marker, name in (("MIN(", "min"), ("COUNT(", "count"), ("PG_NOTIFY", "notify")):
        if marker in upper:
            label += f" {name}()"
    for marker in ("RETURNING", "FOR UPDATE", "SKIP LOCKED"):
        if marker in upper:
            label += f" {marker.lower()}"
    return label


@dataclass
class SqlCounter:
    """Counts the statements (and rows bound to them) a worker's engines execute, and the commits."""

    statements: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)
    commits: int = 0
    pings: int = 0
    """Pool pre-pings (``pool_pre_ping``): on asyncpg each is BEGIN + ``;`` + ROLLBACK, three round trips."""

    def attach(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine, "before_cursor_execute", self._on_execute)
        event.listen(engine.sync_engine, "commit", self._on_commit)
        dialect = engine.sync_engine.dialect
        original = dialect.do_ping

        def counted_ping(dbapi_connection: Any) -> bool:
            self.pings += 1
            return bool(original(dbapi_connection))

        dialect.do_ping = counted_ping  # type: ignore[method-assign]

    def _on_execute(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
    ) -> None:
        kind = sql_kind(statement)
        self.statements[kind] += 1
        self.rows[kind] += len(parameters) if executemany and parameters else 1

    def _on_commit(self, _conn: Any) -> None:
        self.commits += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "statements": dict(self.statements),
            "rows": dict(self.rows),
            "commits": self.commits,
            "pings": self.pings,
        }


@dataclass
class QueueTrace:
    """Timings of the queue's SQL calls and of the dispatcher's slot occupancy, taken inside the worker.

    The storage functions are wrapped where the dispatcher and its housekeeping look them up (the modules
    ``taskcenter.storage.queue``, ``.results`` and ``.leases``), so the source stays untouched; a function that
    does not exist (renamed, moved) is simply not traced.
    """

    calls: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Per function: (seconds, rows) of every call."""
    occupancy: list[int] = field(default_factory=list)
    """Requests in flight, sampled every ``sample_s`` while the dispatcher runs."""
    lag_ms: list[float] = field(default_factory=list)
    """How late each sample's timer fired: the event loop's scheduling delay."""
    sample_s: float = 0.005

    def wrap(
        self,
        names: Iterable[tuple[str, str]] = (
            ("queue", "claim"),
            ("results", "finish"),
            ("queue", "finish_and_claim"),
            ("queue", "next_due"),
            ("leases", "extend_leases"),
            ("leases", "release"),
            ("leases", "rescue"),
        ),
    ) -> None:
        import importlib

        for module_name, name in names:
            module = importlib.import_module(f"taskcenter.storage.{module_name}")
            original = getattr(module, name, None)
            if original is not None:
                setattr(module, name, self._timed(name, original))

    def _timed(self, name: str, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        record = self.calls.setdefault(name, [])

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = await func(*args, **kwargs)
            if isinstance(result, tuple):  # finish_and_claim: (Written, claimed rows)
                rows = len(result[1])
            else:
                rows = len(result) if isinstance(result, Sequence) else len(kwargs.get("results") or ())
            record.append((time.perf_counter() - started, rows))
            return result

        return timed

    async def sample(self, dispatcher: Any) -> None:
        sending = getattr(dispatcher, "_sending", None)
        if sending is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.sample_s
            await asyncio.sleep(self.sample_s)
            self.lag_ms.append(max(0.0, loop.time() - due) * 1000)
            self.occupancy.append(len(sending))

    def summary(self) -> dict[str, Any]:
        ops = {}
        for name, calls in self.calls.items():
            if calls:
                ms = [c[0] * 1000 for c in calls]
                ops[name] = {
                    "calls": len(calls),
                    "rows": sum(c[1] for c in calls),
                    "total_s": sum(ms) / 1000,
                    "mean_ms": sum(ms) / len(ms),
                    "p50_ms": percentile(ms, 50),
                    "p99_ms": percentile(ms, 99),
                    "max_ms": max(ms),
                }
        # From the first to the last sample with anything in flight: the idle start and tail are not delivery.
        busy = [i for i, n in enumerate(self.occupancy) if n]
        window = slice(busy[0], busy[-1] + 1) if busy else slice(0, 0)
        occ, lag = self.occupancy[window], self.lag_ms[window]
        return {
            "ops": ops,
            "occupancy_mean": sum(occ) / len(occ) if occ else 0.0,
            "occupancy_samples": len(occ),
            "loop_lag_ms": {"mean": sum(lag) / len(lag), "p99": percentile(lag, 99)} if lag else {},
        }


#: What-if switches for the worker process: each changes the running code in memory (never the source) to
#: measure what a change would be worth before anyone makes it.
EXPERIMENTS = {
    "no-traffic": "dispatcher.traffic = None: claims skip admission, results skip breaker bookkeeping",
    "no-pre-ping": "the pool stops pre-pinging connections on checkout (asyncpg: BEGIN; ; ROLLBACK each)",
    "gc-default": "the cyclic GC's young-generation threshold back at Python's default (700)",
    "switch-1ms": "sys.setswitchinterval(0.001): a thread waiting for the GIL (aiosqlite's) gets it within 1 ms, not 5",
}


def apply_experiments(rt: Any, dispatcher: Any, names: Iterable[str]) -> None:
    """Switch on the named :data:`EXPERIMENTS` in this worker."""
    for name in names:
        if name == "no-traffic":
            dispatcher.traffic = None
        elif name == "no-pre-ping":
            for engine in {rt.db.write_engine, rt.db.read_engine}:
                engine.sync_engine.pool._pre_ping = False
        elif name == "gc-default":
            gc.set_threshold(700, 10, 10)
        elif name == "switch-1ms":
            sys.setswitchinterval(0.001)
        else:
            raise BenchError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")


def script_parser(prog: str, description: str | None, *, timeout: float) -> argparse.ArgumentParser:
    """A benchmark script's parser with the options every script shares: ``--backend``, ``--pg-url`` and
    ``--timeout`` (the hard limit on the whole script, in seconds)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--pg-url", default=PG_URL, help="PostgreSQL database (its name must contain 'bench')"
    )
    parser.add_argument(
        "--timeout", type=float, default=timeout, help="hard limit on the whole script, seconds"
    )
    return parser


def bench_settings(db_url: str, **overrides: Any) -> Any:
    """Worker settings: the loopback receiver let through the SSRF guard, everything else at its default."""
    from taskcenter.config import Settings

    values: dict[str, Any] = {
        "database_url": db_url,
        "allow_networks": "127.0.0.0/8",
        "log_format": "console",
    }
    values.update(overrides)
    return Settings(**values)


async def until_stopped(max_seconds: float, on_stop: Callable[[], None] | None = None) -> None:
    """Wait for SIGTERM/SIGINT, the parent's death or ``max_seconds``, whichever comes first; then ``on_stop``."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    parent = os.getppid()
    deadline = loop.time() + max_seconds
    while not stopped.is_set() and loop.time() < deadline and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), timeout=0.5)
    if on_stop is not None:
        on_stop()


async def serve_worker(
    settings: Any,
    *,
    max_seconds: float,
    extra: Callable[[Any], Coroutine[Any, Any, None]] | None = None,
    experiments: Iterable[str] = (),
) -> None:
    """Run one dispatcher until told to stop; report ``ready`` and ``stopped`` (with SQL counts) on stdout.

    ``extra`` runs beside the dispatcher on the same loop (the in-process creator of the lag benchmark).
    """
    from taskcenter.heap import settle_heap
    from taskcenter.runtime import Runtime

    rt = Runtime(settings)
    await rt.start()
    counter = SqlCounter()
    counter.attach(rt.db.write_engine)
    if rt.db.read_engine is not rt.db.write_engine:
        counter.attach(rt.db.read_engine)
    trace = QueueTrace()
    trace.wrap()
    dispatcher = rt.dispatcher()
    watchdog = asyncio.create_task(until_stopped(max_seconds, dispatcher.stop))
    helpers = [asyncio.create_task(trace.sample(dispatcher))]
    if extra is not None:
        helpers.append(asyncio.create_task(extra(rt)))
    settle_heap()  # as `taskcenter serve` and `taskcenter worker` do once started
    apply_experiments(rt, dispatcher, experiments)  # after settle_heap, so that they may undo what it set
    cpu0 = time.process_time()
    emit("ready", pid=os.getpid(), t=time.time(), config=asdict(settings.dispatch()))
    try:
        await rt.run_dispatcher(dispatcher)
    finally:
        for task in (watchdog, *helpers):
            task.cancel()
        await asyncio.gather(watchdog, *helpers, return_exceptions=True)
    emit(
        "stopped",
        delivered=dispatcher.delivered,
        cpu_s=time.process_time() - cpu0,
        sql=counter.as_dict(),
        trace=trace.summary(),
    )
    await rt.close()


def parse_settings(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` settings overrides; a value that parses as JSON is taken as such (numbers, booleans)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


async def _worker_main(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {"concurrency": args.concurrency, **parse_settings(args.set)}
    if args.shutdown_grace is not None:
        overrides["shutdown_grace_s"] = args.shutdown_grace
    await serve_worker(
        bench_settings(args.db, **overrides), max_seconds=args.max_seconds, experiments=args.experiment
    )


# -- the raw ceiling: a bare aiohttp client (its own process) ---------------------------------------------


def task_body(n: int) -> bytes:
    """The JSON body every benchmark task carries (the raw client sends the same bytes)."""
    return orjson.dumps({"order": n, "bench": True})


async def raw_client(url: str, total: int, concurrency: int) -> dict[str, Any]:
    """POST ``total`` requests with ``concurrency`` in flight over one pooled session; return the rate."""
    statuses: Counter[int] = Counter()
    numbers = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def lane() -> None:
            for n in numbers:
                task_id = str(uuid.uuid4())
                headers = {
                    "Content-Type": "application/json",
                    "Idempotency-Key": task_id,
                    "X-Task-Id": task_id,
                    "X-Task-Attempt": "0",  # never one of the receiver's scripted failures
                    "X-Business-Id": f"raw-{n}",
                }
                async with session.post(url, data=task_body(n), headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"requests": total, "seconds": seconds, "rps": total / seconds, "statuses": dict(statuses)}


async def _rawclient_main(args: argparse.Namespace) -> None:
    cpu0 = time.process_time()
    result = await raw_client(args.url, args.requests, args.concurrency)
    emit("done", cpu_s=time.process_time() - cpu0, **result)


# -- the benchmark script's side: child processes --------------------------------------------------------


class Child:
    """A benchmark subprocess that reports JSON lines on stdout; its stderr goes to ``bench/out/<name>.log``."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def event(self, name: str, timeout: float) -> dict[str, Any]:
        """The next ``name`` event; :class:`BenchError` if the child dies or stays silent for ``timeout``."""
        stdout = self.proc.stdout
        if stdout is None:
            raise BenchError(f"{self.name} has no stdout pipe")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await stdout.readline()
                    if not line:
                        code = await self.proc.wait()
                        raise BenchError(
                            f"{self.name} exited with code {code} before {name!r}: {self.log_tail()}"
                        )
                    with contextlib.suppress(ValueError):
                        message: dict[str, Any] = json.loads(line)
                        if message.get("event") == name:
                            return message
        except TimeoutError:
            raise BenchError(
                f"{self.name} sent no {name!r} within {timeout:g} s: {self.log_tail()}"
            ) from None

    def log_tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            await self.proc.wait()

    async def stop_worker(self, timeout: float = 20.0) -> dict[str, Any]:
        """A worker's end: SIGTERM, its ``stopped`` report (``{}``, with a warning, if none came), then :meth:`stop`."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            stopped = await self.event("stopped", timeout=60)
        except BenchError as exc:  # the figures stand; only the worker's own counters are missing
            print(f"   warning: {exc}", flush=True)
            stopped = {}
        await self.stop(timeout)
        return stopped

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class Fleet:
    """The children of one benchmark run: all stopped when the block exits, however it exits.

    A SIGALRM backstop kills them and the script if even the cleanup hangs (``hard_timeout_s`` + 60 s).
    """

    def __init__(self, hard_timeout_s: float) -> None:
        self.children: list[Child] = []
        self.hard_timeout_s = hard_timeout_s
        self._lock: Any = None

    async def __aenter__(self) -> Self:
        OUT.mkdir(parents=True, exist_ok=True)
        # One benchmark at a time: they share the bench database (each resets it) and two at once would each
        # measure the other.
        self._lock = (OUT / "bench.lock").open("a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise BenchError(f"another benchmark is running ({holder}); run one at a time") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}: {' '.join(sys.argv)}")
        self._lock.flush()
        signal.signal(signal.SIGALRM, self._backstop)
        signal.alarm(int(self.hard_timeout_s) + 60)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for child in reversed(self.children):
                await child.stop()
        finally:
            signal.alarm(0)
            self._lock.truncate(0)
            self._lock.close()  # releases the flock

    def _backstop(self, _signum: int, _frame: FrameType | None) -> None:
        for child in self.children:
            child.kill()
        sys.stderr.write("benchmark exceeded its hard timeout; children killed\n")
        os._exit(3)

    async def spawn(self, name: str, module: str, *args: str) -> Child:
        """Start ``python -m module args…`` with the repository importable."""
        return await self.spawn_exec(name, sys.executable, "-m", module, *args)

    async def spawn_exec(self, name: str, program: str, *args: str) -> Child:
        """Start any program as a child of this run (stdout piped, stderr to ``bench/out/<name>.log``)."""
        log_path = OUT / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                program,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=env,
                limit=16 << 20,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    async def receiver(self, *, max_seconds: float) -> Receiver:
        child = await self.spawn("receiver", "bench.common", "receiver", "--max-seconds", str(max_seconds))
        ready = await child.event("ready", timeout=30)
        return Receiver(child, int(ready["port"]))

    async def worker(
        self,
        db_url: str,
        *,
        concurrency: int,
        max_seconds: float,
        name: str = "worker",
        grace_s: float | None = None,
        settings: Mapping[str, Any] | None = None,
        experiments: Iterable[str] = (),
    ) -> tuple[Child, dict[str, Any]]:
        """Start a worker process (``settings``: overrides of taskcenter's Settings) and wait until it is ready."""
        args = [
            "worker",
            "--db",
            db_url,
            "--concurrency",
            str(concurrency),
            "--max-seconds",
            str(max_seconds),
        ]
        if grace_s is not None:
            args += ["--shutdown-grace", str(grace_s)]
        for key, value in (settings or {}).items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        for experiment in experiments:
            args += ["--experiment", experiment]
        child = await self.spawn(name, "bench.common", *args)
        return child, await child.event("ready", timeout=60)

    async def raw_ceiling(self, url: str, *, requests: int, concurrency: int) -> dict[str, Any]:
        child = await self.spawn(
            "rawclient",
            "bench.common",
            "rawclient",
            url,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
        )
        done = await child.event("done", timeout=max(60.0, requests / 200))
        await child.stop()
        return done


@dataclass
class Receiver:
    """The benchmark script's handle on the receiver process."""

    child: Child
    port: int

    def url(self, path: str = HOOK) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    async def _call(self, method: str, path: str, payload: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url(path), json=payload) as resp,
        ):
            resp.raise_for_status()
            return orjson.loads(await resp.read())

    async def reset(self, *, fail_fraction: float = 0.0, sleep_s: float = 0.0) -> None:
        """Forget what was seen and answer from now on as told."""
        await self._call("POST", "/_bench/reset", {"fail_fraction": fail_fraction, "sleep_s": sleep_s})

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/_bench/stats")
        return result

    async def arrivals(self) -> list[tuple[str, str, float, int]]:
        """(task id, attempt, arrival time, status) of every request since the last reset."""
        return [tuple(a) for a in await self._call("GET", "/_bench/arrivals")]

    async def wait_ok(self, count: int, timeout: float, poll_s: float = 0.05) -> dict[str, Any]:
        """Poll until ``count`` requests were answered 200; :class:`BenchError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats()
            if stats["ok"] >= count:
                return stats
            if time.monotonic() > deadline:
                raise BenchError(
                    f"receiver saw {stats['ok']} of {count} successful deliveries after {timeout:g} s"
                )
            await asyncio.sleep(poll_s)


# -- one worker delivering a backlog ---------------------------------------------------------------------


@dataclass
class Delivery:
    """What one worker process did with a backlog: times from its start, resources used, its own counters."""

    tasks: int
    arrival_s: float
    """From the worker's start to the last successful arrival at the receiver."""
    done_s: float
    """From the worker's start until the database showed every task succeeded."""
    requests: int
    connections: int
    duplicates: int
    worker_cpu_s: float
    receiver_cpu_s: float
    postgres_cpu_s: float
    """CPU of the PostgreSQL backends serving the benchmark database (background writers not included)."""
    load: tuple[float, float]
    """One-minute load average before and after: how busy the shared machine was."""
    machine: MachineCPU | None = None
    """The whole machine's CPU from the worker's start to the last task succeeded."""
    main_thread_cpu_s: float = 0.0
    """The worker's main thread alone (the event loop, where every request and all of taskcenter's own Python
    runs): the thread one process cannot spread over cores, so its CPU per task bounds the worker."""
    main_thread_queued_s: float | None = None
    """How long the main thread was ready to run but waited for a core (Linux schedstat; None elsewhere)."""
    sql: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)

    @property
    def arrival_rate(self) -> float:
        return self.tasks / self.arrival_s

    @property
    def done_rate(self) -> float:
        return self.tasks / self.done_s


async def deliver_backlog(
    fleet: Fleet,
    receiver: Receiver,
    db_url: str,
    count: int,
    *,
    concurrency: int,
    name: str,
    timeout: float,
    fail_fraction: float = 0.0,
    settings: Mapping[str, Any] | None = None,
    experiments: Iterable[str] = (),
    profile: str | None = None,
) -> Delivery:
    """Start a worker on a database holding ``count`` due tasks and time it until all of them succeeded.

    With ``profile`` (a file stem), py-spy samples the worker into ``bench/out/<stem>.txt`` (collapsed stacks)
    and ``<stem>.svg`` (flame graph).
    """
    await receiver.reset(fail_fraction=fail_fraction)
    load0 = os.getloadavg()[0]
    pg_name = (sa.make_url(db_url).database or "") if db_url.startswith("postgres") else ""
    pg0, rec0 = postgres_backends(pg_name) if pg_name else {}, cpu_seconds(receiver.child.pid)
    worker, ready = await fleet.worker(
        db_url,
        concurrency=concurrency,
        max_seconds=timeout,
        name=name,
        settings=settings,
        experiments=experiments,
    )
    worker_cpu0 = cpu_seconds(worker.pid)  # start-up (imports, schema check) is not delivery
    main0, queued0 = main_thread_cpu_seconds(worker.pid), main_thread_queued_seconds(worker.pid)
    machine0 = MachineCPU.mark()
    spies = await attach_profilers(fleet, worker.pid, profile) if profile else []
    stats = await receiver.wait_ok(count, timeout=timeout)
    done_t = await wait_status_count(db_url, "succeeded", count, timeout=timeout)
    machine = MachineCPU.since(machine0)
    worker_cpu = cpu_seconds(worker.pid) - worker_cpu0
    main_cpu = main_thread_cpu_seconds(worker.pid) - main0
    queued1 = main_thread_queued_seconds(worker.pid)
    queued = queued1 - queued0 if queued0 is not None and queued1 is not None else None
    receiver_cpu = cpu_seconds(receiver.child.pid) - rec0
    pg_cpu = postgres_cpu_since(pg0, pg_name) if pg_name else 0.0
    load1 = os.getloadavg()[0]
    stopped = await worker.stop_worker()
    for spy in spies:  # py-spy writes its files when the worker exits
        await asyncio.wait_for(spy.proc.wait(), 60)
    ok_ids = Counter(a[0] for a in await receiver.arrivals() if a[3] == 200)
    return Delivery(
        tasks=count,
        arrival_s=stats["last_ok"] - ready["t"],
        done_s=done_t - ready["t"],
        requests=stats["requests"],
        connections=stats["connections"],
        duplicates=sum(ok_ids.values()) - len(ok_ids),
        worker_cpu_s=worker_cpu,
        receiver_cpu_s=receiver_cpu,
        postgres_cpu_s=pg_cpu,
        load=(load0, load1),
        machine=machine,
        main_thread_cpu_s=main_cpu,
        main_thread_queued_s=queued,
        sql=stopped.get("sql", {}),
        trace=stopped.get("trace", {}),
    )


async def attach_profilers(fleet: Fleet, pid: int, stem: str) -> list[Child]:
    """py-spy on a worker: collapsed stacks (for :func:`summarise_profile`) and a flame graph, until it exits."""
    spy = str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    args = ["record", "--pid", str(pid), "--rate", "100", "--nonblocking"]
    raw = await fleet.spawn_exec(
        f"py-spy-{stem}-raw", spy, *args, "--threads", "--format", "raw", "-o", f"{OUT / stem}.txt"
    )
    svg = await fleet.spawn_exec(f"py-spy-{stem}-svg", spy, *args, "-o", f"{OUT / stem}.svg")
    await asyncio.sleep(0.5)  # let py-spy attach before the backlog drains
    return [raw, svg]


def _lag(trace: Mapping[str, Any]) -> str:
    lag = trace.get("loop_lag_ms") or {}
    return f"{lag['mean']:.1f} / {lag['p99']:.1f}" if lag else "-"


def print_worker_details(labelled: Sequence[tuple[str, Delivery]]) -> None:
    """Inside-the-worker figures: resources, queue call timings, slot occupancy and the SQL it issued."""
    print(
        table(
            ["run", "requests", "connections", "duplicates", "worker CPU", "CPU/task", "receiver CPU",
             "postgres CPU", "load before/after", "SQL stmts/task", "commits/task", "pre-pings/task", "mean in flight",
             "loop lag mean / p99 ms"],
            [
                [label, d.requests, d.connections, d.duplicates,
                 f"{d.worker_cpu_s:.1f} s ({d.worker_cpu_s / d.done_s:.0%} of a core)",
                 f"{d.worker_cpu_s / d.tasks * 1e6:.0f} us", f"{d.receiver_cpu_s:.1f} s",
                 f"{d.postgres_cpu_s:.1f} s" if d.postgres_cpu_s else "-",
                 f"{d.load[0]:.1f} / {d.load[1]:.1f}",
                 f"{sum(d.sql.get('statements', {}).values()) / d.tasks:.3f}",
                 f"{d.sql.get('commits', 0) / d.tasks:.3f}", f"{d.sql.get('pings', 0) / d.tasks:.3f}",
                 f"{d.trace.get('occupancy_mean', 0):.1f}", _lag(d.trace)]
                for label, d in labelled
            ],
        )
    )  # fmt: skip
    rows = []
    for label, d in labelled:
        for name, op in d.trace.get("ops", {}).items():
            rows.append(
                [label, name, op["calls"], f"{op['rows'] / op['calls']:.0f}" if op["rows"] else "-",
                 f"{op['mean_ms']:.1f}", f"{op['p50_ms']:.1f}", f"{op['p99_ms']:.1f}", f"{op['max_ms']:.0f}",
                 f"{op['total_s']:.2f} s"]
            )  # fmt: skip
    if rows:
        print(
            "\nqueue calls inside the worker (wall time, waiting for the pool and the event loop included):"
        )
        print(
            table(
                ["run", "call", "calls", "rows/call", "mean ms", "p50 ms", "p99 ms", "max ms", "total"], rows
            )
        )
    for label, d in labelled:
        statements, bound = d.sql.get("statements", {}), d.sql.get("rows", {})
        if statements:
            print(f"\nSQL the worker issued ({label}, {d.tasks:,} tasks):")
            print(
                table(
                    ["statement", "executions", "rows bound", "per 1000 tasks"],
                    [
                        [kind, n, bound.get(kind, 0), f"{n / d.tasks * 1000:.1f}"]
                        for kind, n in sorted(statements.items(), key=lambda kv: -kv[1])
                    ],
                )
            )


# -- databases -------------------------------------------------------------------------------------------


async def ensure_pg_database(url: str) -> None:
    """Create the benchmark's PostgreSQL database if missing; refuse any database not named for benchmarks."""
    import asyncpg

    parsed = sa.make_url(url)
    name = parsed.database or ""
    if "bench" not in name:
        raise BenchError(
            f"refusing to reset database {name!r}: a benchmark database needs 'bench' in its name"
        )
    conn = await asyncpg.connect(
        host=parsed.host or LOOPBACK,
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        database="postgres",
    )
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def fresh_database(backend: str, name: str, pg_url: str = PG_URL, *, business: bool = False) -> str:
    """An empty, migrated database: a new SQLite file under bench/out, or the bench PostgreSQL database reset.

    With ``business``, the benchmark's business system is registered too. Do that when a worker starts before
    the first task is created: a worker that met the business later would apply the default business limits
    (1,000 callbacks a minute) until its policy refresh, and the tasks it deferred meanwhile stay deferred.
    """
    from taskcenter.storage.database import Database

    if backend == "sqlite":
        path = OUT / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    elif backend == "postgres":
        url = pg_url
        await ensure_pg_database(url)
        db = Database(url)
        async with db.write() as conn:
            await conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(sa.text("CREATE SCHEMA public"))
        await db.close()
    else:
        raise BenchError(f"unknown backend {backend!r}")
    db = Database(url)
    try:
        await db.migrate()
    finally:
        await db.close()
    if business:
        from taskcenter.runtime import Runtime

        rt = Runtime(bench_settings(url))
        try:
            await bench_business(rt)
        finally:
            await rt.close()
    return url


async def bench_business(rt: Any) -> Any:
    """The benchmark's business system, with limits far above anything a benchmark reaches."""
    from taskcenter.storage.schema import businesses

    await rt.service.ensure_business(BUSINESS)
    async with rt.db.write() as conn:
        await conn.execute(
            sa.update(businesses)
            .where(businesses.c.code == BUSINESS)
            .values(max_active_tasks=100_000_000, rate_limit_per_minute=100_000_000, max_in_flight=None)
        )
    return await rt.service.business(BUSINESS, refresh=True)


def task_item(n: int, url: str, *, prefix: str = "t", **extra: Any) -> dict[str, Any]:
    """One create request as the API would receive it."""
    return {
        "business_id": f"{prefix}-{n}",
        "url": url,
        "json": {"order": n, "bench": True},
        "retry": RETRY_AFTER_1S,
        **extra,
    }


#: The API's largest batch (``POST /tasks/batch``).
ENQUEUE_BATCH = 1000


async def enqueue(
    db_url: str, items: Iterable[Mapping[str, Any]], *, batch: int = ENQUEUE_BATCH
) -> tuple[int, float]:
    """Create tasks through ``TaskService.create_tasks`` in batches; returns (count, seconds)."""
    from taskcenter.runtime import Runtime

    rt = Runtime(bench_settings(db_url))
    await rt.start()
    count = 0
    try:
        business = await bench_business(rt)
        started = time.perf_counter()
        chunk: list[Mapping[str, Any]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == batch:
                count += await _create(rt, business, chunk)
                chunk = []
        if chunk:
            count += await _create(rt, business, chunk)
        return count, time.perf_counter() - started
    finally:
        await rt.close()


async def _create(rt: Any, business: Any, chunk: Sequence[Mapping[str, Any]]) -> int:
    results = await rt.service.create_tasks(business, chunk)
    refused = [r for r in results if r.get("status") != 201]
    if refused:
        raise BenchError(f"{len(refused)} of {len(chunk)} creates refused, e.g. {refused[0]}")
    return len(results)


async def count_status(db_url: str, status: str) -> int:
    """How many tasks have ``status`` (a fresh connection: the script holds none between polls)."""
    from taskcenter.storage.database import Database
    from taskcenter.storage.schema import tasks

    db = Database(db_url, pool_size=1)
    try:
        async with db.read() as conn:
            return int(
                (
                    await conn.execute(
                        sa.select(sa.func.count()).select_from(tasks).where(tasks.c.status == status)
                    )
                ).scalar()
                or 0
            )
    finally:
        await db.close()


async def wait_status_count(
    db_url: str, status: str, count: int, timeout: float, poll_s: float = 0.05
) -> float:
    """Poll until ``count`` tasks have ``status``; returns the time.time() at which that was seen."""
    from taskcenter.storage.database import Database
    from taskcenter.storage.schema import tasks

    db = Database(db_url, pool_size=1)
    query = sa.select(sa.func.count()).select_from(tasks).where(tasks.c.status == status)
    deadline = time.monotonic() + timeout
    try:
        while True:
            async with db.read() as conn:
                seen = int((await conn.execute(query)).scalar() or 0)
            if seen >= count:
                return time.time()
            if time.monotonic() > deadline:
                raise BenchError(f"{seen} of {count} tasks reached {status} after {timeout:g} s")
            await asyncio.sleep(poll_s)
    finally:
        await db.close()


# -- figures ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass(frozen=True)
class MachineCPU:
    """The whole machine's CPU over a window: every process and the kernel, from ``psutil.cpu_times()``."""

    wall_s: float
    busy_s: float
    """CPU seconds spent on anything but idle and I/O wait, over all cores."""
    steal_s: float
    """CPU seconds the hypervisor gave to other guests while this one wanted them (the shared host's noise)."""
    cores: int

    @classmethod
    def since(cls, before: tuple[float, Any]) -> MachineCPU:
        t0, c0 = before
        t1, c1 = time.monotonic(), psutil.cpu_times()
        idle = (c1.idle - c0.idle) + (getattr(c1, "iowait", 0.0) - getattr(c0, "iowait", 0.0))
        steal = getattr(c1, "steal", 0.0) - getattr(c0, "steal", 0.0)
        total = sum(c1) - sum(c0) - (getattr(c1, "guest", 0.0) - getattr(c0, "guest", 0.0))
        total -= getattr(c1, "guest_nice", 0.0) - getattr(c0, "guest_nice", 0.0)  # both already in user/nice
        return cls(t1 - t0, max(0.0, total - idle - steal), max(0.0, steal), psutil.cpu_count() or 1)

    @staticmethod
    def mark() -> tuple[float, Any]:
        return time.monotonic(), psutil.cpu_times()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread so far (Linux: its thread id is the pid; 0 if gone)."""
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return 0.0
    return next((float(t.user_time + t.system_time) for t in threads if t.id == pid), 0.0)


def main_thread_queued_seconds(pid: int) -> float | None:
    """Seconds a process's main thread has spent runnable but waiting for a core (Linux ``schedstat``), or None."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def postgres_backends(database: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend process serving ``database`` (by its process title)."""
    found: dict[int, float] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(proc.info.get("cmdline") or ())
        if (proc.info.get("name") or "").startswith("postgres") and f" {database} " in title:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                found[proc.pid] = times.user + times.system
    return found


def postgres_cpu_since(before: Mapping[int, float], database: str) -> float:
    """CPU the backends of ``database`` used since ``before`` (a :func:`postgres_backends` snapshot).

    Backends that exited meanwhile are missed; a worker's own connections live until it stops, after this.
    """
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in postgres_backends(database).items())


def machine() -> str:
    """One line about where the figures came from."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {sys.version.split()[0]}, load average {load}"
    )


def revision() -> str:
    """The commit the figures belong to (``-dirty`` when the tree had uncommitted changes)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude", "*"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def header(title: str) -> None:
    print(
        f"\n== {title} ==\n   {time.strftime('%Y-%m-%d %H:%M:%S')}; commit {revision()}; {machine()}",
        flush=True,
    )


def backends(choice: str) -> list[str]:
    return list(BACKENDS) if choice == "both" else [choice]


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")
_AREAS = (
    ("taskcenter/storage/", "taskcenter.storage"),
    ("taskcenter/", "taskcenter (other)"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"),
    ("aiosqlite/", "aiosqlite"),
    ("sqlite3/", "sqlite3"),
    ("aiohttp/", "aiohttp"),
    ("yarl/", "yarl/multidict"),
    ("multidict/", "yarl/multidict"),
    ("asyncio/", "asyncio"),
    ("prometheus_client/", "prometheus_client"),
    ("json/", "json"),
    ("uuid.py", "uuid"),
    ("datetime", "datetime"),
)


_WRAPPERS = ("_run_module_as_main ", "_run_code ", "Runner.run ", "run (asyncio/runners.py")


def _frame_key(frame: str) -> tuple[str, str]:
    """(function with its file, area) of one py-spy frame ``func (file:line)``."""
    match = _FRAME.match(frame)
    func, path = (match.group("func"), match.group("file")) if match else (frame, "")
    area = next((name for prefix, name in _AREAS if prefix in path), path.split("/")[0] or "other")
    if area.startswith("taskcenter"):
        area = "taskcenter." + path.removeprefix("taskcenter/").removesuffix(".py").replace("/", ".")
    return f"{func} ({path})", area


def summarise_profile(raw: Path, top: int = 20) -> str:
    """Where a worker's sampled CPU went, from py-spy's ``--format raw --threads`` output.

    Four tables: self time by area (package or taskcenter module), self time by function, inclusive time by
    function (a function counts once per sample however deep it recurs) and the same for taskcenter's own
    functions only. Percentages are of all non-idle samples.
    """
    self_fn: Counter[str] = Counter()
    self_area: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    incl_own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            threads[frames[0].split(": ", 1)[-1]] += count
            frames = frames[1:]
        total += count
        # The runner and script frames sit under every sample; what they do themselves is the event loop's C code.
        keys = [_frame_key(f) for f in frames if not f.startswith(_WRAPPERS) and "(bench/" not in f]
        if not keys:
            keys = [("(event loop / C code, no Python frame)", "event loop (C)")]
        elif frames[-1].startswith("Runner.run "):
            keys.append(("(event loop / C code, no Python frame)", "event loop (C)"))
        fn, area = keys[-1]
        self_fn[fn] += count
        self_area[area] += count
        for key in {k for k, _ in keys}:
            incl_fn[key] += count
            if "(taskcenter/" in key:
                incl_own[key] += count
    if not total:
        return f"(no samples in {raw})"

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, f"{n / total:.1%}"] for name, n in counter.most_common(top)]

    parts = [
        f"{total} samples; threads: " + ", ".join(f"{t} {n / total:.0%}" for t, n in threads.most_common()),
        table(["area (self time)", "share"], share(self_area)),
        table(["function (self time)", "share"], share(self_fn)),
        table(["function (inclusive)", "share"], share(incl_fn)),
        table(["taskcenter function (inclusive)", "share"], share(incl_own)),
    ]
    return "\n\n".join(parts)


def run_script(main: Coroutine[Any, Any, None]) -> None:
    """Run a benchmark script's main coroutine; expected failures end in one short line, exit code 1."""
    from taskcenter.errors import TaskCenterError

    try:
        asyncio.run(main)
    except (BenchError, TaskCenterError) as exc:
        print(f"benchmark failed: {str(exc)[:2000]}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S')}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child processes."""
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    sub = parser.add_subparsers(dest="role", required=True)
    rec = sub.add_parser("receiver", help="the loopback receiver")
    rec.add_argument("--fail-fraction", type=float, default=0.0)
    rec.add_argument("--sleep", type=float, default=0.0)
    rec.add_argument("--max-seconds", type=float, default=900)
    wrk = sub.add_parser("worker", help="one taskcenter dispatcher")
    wrk.add_argument("--db", required=True)
    wrk.add_argument("--concurrency", type=int, default=100)
    wrk.add_argument("--shutdown-grace", type=float, default=None)
    wrk.add_argument("--max-seconds", type=float, default=900)
    wrk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a Settings override")
    wrk.add_argument("--experiment", action="append", default=[], choices=sorted(EXPERIMENTS))
    raw = sub.add_parser("rawclient", help="bare aiohttp client (the raw ceiling)")
    raw.add_argument("url")
    raw.add_argument("--requests", type=int, default=20000)
    raw.add_argument("--concurrency", type=int, default=100)
    for p in (rec, wrk, raw):
        p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    roles = {"receiver": _receiver_main, "worker": _worker_main, "rawclient": _rawclient_main}
    run_loop(roles[args.role](args), use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
