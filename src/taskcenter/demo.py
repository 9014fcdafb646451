"""``taskcenter demo``'s engine: a scripted run of the whole delivery path on a throw-away SQLite database, against
a receiver on loopback that answers each task as its scenario says, so that every task's fate is known beforehand.

No Rich or Typer here (``cli_demo.py`` presents it): :class:`Demo` reports :class:`Snapshot` s while it runs and
hands back one :class:`TaskResult` per task.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from taskcenter.audit import AuditLog
from taskcenter.businesses import BusinessService
from taskcenter.config import Settings
from taskcenter.runtime import Runtime
from taskcenter.signing import generate_secret
from taskcenter.storage.schema import tasks as tasks_table
from taskcenter.verify import InvalidSignature, verify

BUSINESS = "demo"
FINISHED = ("succeeded", "failed", "cancelled")
DEADLINE_S = 60.0
"""The demo gives up when its tasks have not all finished this long after they were created."""
RETRY = {"strategy": "intervals", "intervals": [1, 1], "max_delay": 5}
"""Every demo task's retry policy: three attempts a second apart (a ``Retry-After`` is capped at 5 s)."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """How the receiver treats one kind of task, and the fate the demo expects for it."""

    name: str
    what: str
    """One line for the summary: what the receiver does."""
    status: str
    """The final status expected."""
    outcomes: tuple[str, ...]
    """The outcome expected of each attempt, in order."""
    delay_s: float = 0.0
    timeout_s: float = 5.0
    blocked: bool = False
    """Sent to 127.0.0.2, which the demo business may not reach: the SSRF guard refuses it."""


# fmt: off
SCENARIOS = (
    Scenario("ok", "answers 200", "succeeded", ("success",)),
    Scenario("scheduled", "created with a 3 s delay, answers 200", "succeeded", ("success",), delay_s=3),
    Scenario("flaky", "500 on the first attempt, then 200", "succeeded", ("server_error", "success")),
    Scenario("throttled", "429 with Retry-After: 1, then 200", "succeeded", ("rate_limited", "success")),
    Scenario("slow", "first answer after 3 s (timeout 1 s), then 200", "succeeded", ("timeout", "success"),
             timeout_s=1),
    Scenario("down", "500 every time: three attempts, then failed", "failed", ("server_error",) * 3),
    Scenario("gone", "410 Gone: the receiver stops it", "failed", ("stopped",)),
    Scenario("stale-secret", "checks the signature with an old secret: 401", "failed", ("client_error",)),
    Scenario("blocked", "to 127.0.0.2, outside the allowed 127.0.0.1/32", "failed", ("blocked",),
             blocked=True),
)
# fmt: on
_BY_NAME = {s.name: s for s in SCENARIOS}
SLOW_ANSWER_S = 3.0


class _IsolatedSettings(Settings):
    """Settings from the arguments only: the demo reads no ``TASKCENTER_*`` variable and no taskcenter.toml, so
    it can never touch the configured database nor run with a relaxed SSRF guard."""

    model_config = SettingsConfigDict(toml_file=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def demo_settings(database: Path) -> Settings:
    """The demo's settings: its own SQLite file, the SSRF guard on with nothing allowed globally (the demo
    business opens 127.0.0.1/32 alone), and a short shutdown.

    Its one receiver host fails on purpose (500s, timeouts) between its successes, so two host guards that
    protect other hosts' slots from a failing one are off here: the breaker (it would hold every task of the
    host for its 30 s cool-down) and the slow-host window (halved per failure while a slow answer is awaited,
    it sent a thousand tasks a few at a time: 37 s instead of 5). Neither changes a task's fate, only when.
    """
    return _IsolatedSettings(
        database_url=f"sqlite:///{database}",
        ssrf_guard=True,
        breaker_failures=1_000_000,
        host_slow_window=0,
        shutdown_grace_s=2.0,
    )


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 (a free port): ``POST /hook/<scenario>`` answers as the scenario says for
    the attempt in ``X-Task-Attempt``, after checking the Standard Webhooks signature with the business's secret."""

    secret: str
    stale_secret: str = field(default_factory=generate_secret)
    requests: int = 0
    answers: collections.Counter[int] = field(default_factory=collections.Counter)
    """Answers given, by status code (0: none, the client gave up waiting)."""
    valid_signatures: int = 0
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{scenario}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, scenario: Scenario) -> str:
        host = "127.0.0.2" if scenario.blocked else "127.0.0.1"
        return f"http://{host}:{self.port}/hook/{scenario.name}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        try:
            verify(self.secret, request.headers, body)
            self.valid_signatures += 1
        except InvalidSignature:
            return self._answer(401, "signature does not match")
        scenario = _BY_NAME.get(request.match_info["scenario"])
        attempt = int(request.headers.get("X-Task-Attempt", "1"))
        if scenario is None:
            return self._answer(404, "no such scenario")
        if scenario.name == "stale-secret":
            try:
                verify(self.stale_secret, request.headers, body)
            except InvalidSignature:
                return self._answer(401, "signature does not match (checked with a stale secret)")
        if scenario.name == "slow" and attempt == 1:
            try:
                await asyncio.wait_for(self._closing.wait(), SLOW_ANSWER_S)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                self.answers[0] += 1  # taskcenter's timeout struck first: it hung up
                raise
        if (scenario.name == "flaky" and attempt == 1) or scenario.name == "down":
            return self._answer(500, "internal error")
        if scenario.name == "throttled" and attempt == 1:
            return self._answer(429, "slow down", {"Retry-After": "1"})
        if scenario.name == "gone":
            return self._answer(410, "this hook is gone")
        return self._answer(200, '{"ok": true}')

    def _answer(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
        self.answers[status] += 1
        return web.Response(status=status, text=text, headers=headers)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where the demo stands: tasks by status, attempts so far, what the receiver got."""

    total: int
    counts: Mapping[str, int]
    attempts: int
    requests: int
    answers: Mapping[int, int]
    valid_signatures: int
    elapsed_s: float

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED)


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One task's fate beside the one its scenario expected."""

    id: str
    business_id: str
    scenario: Scenario
    status: str
    attempts: tuple[tuple[str, int | None], ...]
    """(outcome, status code) of each attempt, oldest first."""

    @property
    def as_expected(self) -> bool:
        outcomes = tuple(outcome for outcome, _ in self.attempts)
        return self.status == self.scenario.status and outcomes == self.scenario.outcomes


class DemoTimeout(Exception):
    """The tasks did not all finish within the deadline."""


@dataclass
class Demo:
    """Registers the ``demo`` business, creates ``tasks`` tasks (scenarios in turn) through the task service,
    runs a dispatcher until all have finished, and reads back each task's attempts."""

    database: Path
    tasks: int
    deadline_s: float = DEADLINE_S
    receiver: Receiver | None = None
    api_key: str | None = None
    """The demo business's API key, once it is registered (shown with ``--keep``: the database outlives it)."""

    async def run(
        self, report: Callable[[Snapshot], None], stop: asyncio.Event, every_s: float = 0.1
    ) -> list[TaskResult]:
        """Run the demo; ``report`` gets a snapshot every ``every_s``. Returns early (with what finished) when
        ``stop`` is set; raises :class:`DemoTimeout` past the deadline."""
        rt = Runtime(demo_settings(self.database))
        try:
            await rt.start()
            businesses = BusinessService(db=rt.db, box=rt.box, tasks=rt.service, audit=AuditLog(rt.db))
            registration = await businesses.register(
                {"code": BUSINESS, "name": "taskcenter demo", "rate_limit_per_minute": 1_000_000,
                 "allow_networks": ["127.0.0.1/32"]},
                actor="cli:demo",
            )  # fmt: skip
            self.api_key = registration.api_key.key
            self.receiver = receiver = Receiver(registration.signing_secret)
            await receiver.start()
            try:
                return await self._deliver(rt, receiver, report, stop, every_s)
            finally:
                await receiver.close()
        finally:
            await rt.close()

    async def _deliver(
        self, rt: Runtime, receiver: Receiver, report: Callable[[Snapshot], None], stop: asyncio.Event,
        every_s: float,
    ) -> list[TaskResult]:  # fmt: skip
        business = await rt.service.business(BUSINESS)
        planned = list(itertools.islice(itertools.cycle(SCENARIOS), self.tasks))
        items = [_task_data(n, s, receiver) for n, s in enumerate(planned, 1)]
        ids: list[str] = []
        for start in range(0, len(items), 1000):  # the API's batch size
            for result in await rt.service.create_tasks(business, items[start : start + 1000]):
                if result["status"] != 201:
                    raise RuntimeError(f"the demo could not create a task: {result['error']}")
                ids.append(result["task"].id)
        started = time.monotonic()
        dispatcher = rt.dispatcher()
        job = asyncio.create_task(rt.run_dispatcher(dispatcher), name="tc-demo-dispatcher")
        try:
            while True:
                snapshot = await self._snapshot(rt, receiver, started)
                report(snapshot)
                if snapshot.finished == self.tasks or stop.is_set():
                    break
                if snapshot.elapsed_s > self.deadline_s:
                    raise DemoTimeout(f"{self.tasks - snapshot.finished} tasks had not finished after "
                                      f"{self.deadline_s:g} s")  # fmt: skip
                if job.done():
                    job.result()  # the dispatcher ended: raise why
                    raise RuntimeError("the dispatcher stopped before the tasks finished")
                with_stop = asyncio.ensure_future(stop.wait())
                await asyncio.wait([with_stop, job], timeout=every_s, return_when=asyncio.FIRST_COMPLETED)
                with_stop.cancel()
        finally:
            dispatcher.stop()
            await job
        report(await self._snapshot(rt, receiver, started))
        results = []
        for task_id, scenario in zip(ids, planned, strict=True):
            task = await rt.service.get_task(None, task_id)
            tries = await rt.service.attempts(None, task_id)
            outcomes = tuple(
                (a.outcome, a.response.get("status_code") if a.response else None) for a in tries
            )
            results.append(TaskResult(task_id, task.business_id, scenario, task.status, outcomes))
        return results

    async def _snapshot(self, rt: Runtime, receiver: Receiver, started: float) -> Snapshot:
        stmt = sa.select(tasks_table.c.status, sa.func.count(), sa.func.sum(tasks_table.c.attempts)).group_by(
            tasks_table.c.status
        )
        async with rt.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return Snapshot(
            total=self.tasks,
            counts={status: count for status, count, _ in rows},
            attempts=sum(int(n or 0) for _, _, n in rows),
            requests=receiver.requests,
            answers=dict(receiver.answers),
            valid_signatures=receiver.valid_signatures,
            elapsed_s=time.monotonic() - started,
        )


def _task_data(n: int, scenario: Scenario, receiver: Receiver) -> dict[str, Any]:
    """A create request as the REST API would get it."""
    data: dict[str, Any] = {
        "business_id": f"demo-{n:03d}-{scenario.name}",
        "url": receiver.url(scenario),
        "json": {"event": "demo.ping", "n": n, "scenario": scenario.name},
        "retry": RETRY,
        "timeout": scenario.timeout_s,
        "metadata": {"scenario": scenario.name},
    }
    if scenario.delay_s:
        data["delay"] = scenario.delay_s
    return data
