"""``TaskCenter``: taskcenter inside a Python application, async first, with a sync surface on top.

The sync methods run the async ones on a private event loop in a background thread, so Django, Flask and
scripts get exactly the behaviour of the async API rather than a second implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.config import Settings, load_settings
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.task import Attempt, Task
from taskcenter.errors import StorageError, ValidationError
from taskcenter.events import EventBus, Handler
from taskcenter.intake import PRIORITY_RANGE
from taskcenter.library_args import UNSET, check_connection, int_within, task_data
from taskcenter.private_loop import PrivateLoop
from taskcenter.processors import ProcessorFunc, ProcessorRegistry
from taskcenter.runtime import Runtime
from taskcenter.service import Business
from taskcenter.signals import NOTIFY_CHANNEL
from taskcenter.storage import tasks as task_sql

if TYPE_CHECKING:
    from taskcenter.dispatcher import Dispatcher

T = TypeVar("T")
F = TypeVar("F", bound=ProcessorFunc)


def _close_at_exit(ref: weakref.ref[TaskCenter]) -> None:
    """Close a TaskCenter whose sync surface the application left open (a script, a web app), so that the
    interpreter's exit does not tear its database connections down under its running loop."""
    center = ref()
    if center is not None:
        with contextlib.suppress(Exception):
            center.close()


class TaskCenter:
    """taskcenter as a library.

    Args:
        database_url: ``sqlite:///file.db`` or ``postgresql://…``; defaults to the settings.
        business: the business system (tenant) this instance creates tasks for; registered if missing.
        business_limits: limits to register it with, e.g. ``{"rate_limit_per_minute": 60000}`` (default 1,000
            callbacks per minute, DESIGN "Traffic control").
        settings: full settings; by default loaded from ``taskcenter.toml`` and ``TASKCENTER_*``. Give either
            these or ``database_url`` and ``overrides``, not both.
        **overrides: individual settings (e.g. ``concurrency=50``).

    Use either the async methods (``a…``) from your event loop or the sync ones, not both on one instance:
    database connections belong to the loop that opened them.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        business: str = "default",
        business_limits: Mapping[str, Any] | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if settings is not None and (database_url is not None or overrides):
            # Silently dropping them would send the tasks to another database than the one named here.
            given = ["database_url"] * (database_url is not None) + sorted(overrides)
            raise ValidationError(
                f"give either settings or individual settings ({', '.join(given)}), not both",
                field="settings",
            )
        if settings is None:
            # Settings ignore unknown keys (for taskcenter.toml); a misspelt keyword here must not be.
            unknown = sorted(overrides.keys() - Settings.model_fields.keys() - {"config_file"})
            if unknown:
                raise ValidationError(f"setting {unknown[0]}: no such setting", field=unknown[0])
            if database_url is not None:
                overrides["database_url"] = database_url
            settings = load_settings(**overrides)
        self.runtime = Runtime(settings, processors=ProcessorRegistry(), events=EventBus())
        # Register on the runtime's own registry and bus: an empty EventBus is falsy, so a bus handed in
        # can be swapped for a fresh one and handlers added to it would never be called.
        self.processors = self.runtime.processors
        self.events = self.runtime.events
        self.business_code = business
        self.business_limits = dict(business_limits or {})
        self._business: Business | None = None
        self._ready = False
        self._private_loop = PrivateLoop(at_exit=functools.partial(_close_at_exit, weakref.ref(self)))
        """Where the sync methods run the async ones."""
        self._dispatcher: Any = None
        self._worker: tuple[threading.Thread, asyncio.Event, threading.Event] | None = None
        """The thread in :meth:`run_worker`, its stop event and its done flag, while it runs."""

    # -- plumbing -------------------------------------------------------------------------------------

    async def _biz(self) -> Business:
        if not self._ready:
            await self.runtime.start()
            self._ready = True
        if self._business is None:
            self._business = await self.runtime.service.ensure_business(
                self.business_code, **self.business_limits
            )
        return self._business

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._private_loop.run(coro)

    # -- registration ---------------------------------------------------------------------------------

    def processor(
        self, name: str, *, retry: RetryPolicy | Mapping[str, Any] | None = None, priority: int = 0
    ) -> Callable[[F], F]:
        """Register a function as the processor of task type ``name`` (decorator; returns it unchanged).

        It takes the task's JSON payload and returns a JSON result (or raises: an exception is retried by
        ``retry``, :class:`~taskcenter.errors.PermanentFailure` fails the task now). ``retry`` and ``priority``
        are the defaults of tasks of this type. Both are checked here, not at each create of a task of this type
        (where a policy given as a dict used to fail with an AttributeError, far from the mistake).
        """
        if retry is not None and not isinstance(retry, RetryPolicy):
            retry = RetryPolicy.from_dict(retry)  # its JSON form, as create_task takes it
        lo, hi = PRIORITY_RANGE
        if not int_within(priority, lo, hi):
            raise ValidationError(f"priority must be an integer from {lo} to {hi}", field="priority")

        def register(func: F) -> F:
            if not callable(func):
                raise ValidationError(f"processor {name!r} is not callable", field="type")
            self.processors.register(name, func, retry=retry, priority=priority)
            return func

        return register

    def on(self, event: str, handler: Handler) -> None:
        """Call ``handler(event, data)`` on an event: created, attempted, succeeded, failed, cancelled.

        Handlers run after the fact, never inside the call or the result write that raised the event: the event
        is queued and a delivery task calls the handlers in the order the events were raised (so a task's
        ``attempted`` comes before its ``succeeded`` or ``failed``). An async handler runs on the event loop, a
        sync one in a thread, so it may block (and may call the sync methods of this instance). Each handler
        gets its own copy of ``data``. A handler that raises is logged. A slow handler delays only the events
        after it: up to 10,000 events wait, and while the queue is full new events are dropped (logged as a
        warning, counted in ``taskcenter_events_dropped``) rather than slow down delivery. On shutdown
        (:meth:`run_worker` ending, :meth:`close`) the queued events get up to ``shutdown_grace_s`` to be
        delivered; what is left then is dropped and logged.
        """
        self.events.on(event, handler)

    # -- async API ------------------------------------------------------------------------------------

    async def acreate_task(
        self,
        method: str | None = None,
        url: str | None = None,
        *,
        business_id: str,
        type: str | None = None,
        payload: Any = None,
        headers: Mapping[str, str] | None = None,
        json: Any = UNSET,
        form: Mapping[str, Any] | None = None,
        body: str | None = None,
        content_type: str | None = None,
        delay: float | timedelta | None = None,
        scheduled_at: datetime | None = None,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the task's request timeout, not this call's deadline
        priority: int | None = None,
        success_codes: list[int] | None = None,
        retry_on: list[int] | None = None,
        follow_redirects: bool = False,
        notify: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        connection: AsyncConnection | None = None,
    ) -> Task:
        """Create a task. With ``connection``, it is stored inside that transaction (outbox).

        When it is due: ``delay`` (seconds or a ``timedelta`` from now) or ``scheduled_at`` (an aware ``datetime``,
        or RFC 3339 text with a zone); a naive datetime is refused rather than taken as UTC or local time.

        The ``created`` event fires once the row is written, which with ``connection`` is before the caller
        commits. On SQLite, start the TaskCenter (``async with``, or any call) before the caller's transaction
        takes the write lock: its first use registers the business, which is a write of its own.
        """
        data = task_data(
            method, url, business_id=business_id, type=type, payload=payload, headers=headers, json=json,
            form=form, body=body, content_type=content_type, delay=delay, scheduled_at=scheduled_at,
            retry=retry, timeout=timeout, priority=priority, success_codes=success_codes, retry_on=retry_on,
            follow_redirects=follow_redirects, notify=notify, metadata=metadata,
        )  # fmt: skip
        check_connection(connection, AsyncConnection, "a sync Connection goes to create_task")
        return await self.runtime.service.create_task(await self._biz(), data, connection=connection)

    async def aget_task(self, task_id: str | int) -> Task:
        return await self.runtime.service.get_task(await self._biz(), task_id)

    async def aget_by_business_id(self, business_id: str) -> Task:
        return await self.runtime.service.get_by_business_id(await self._biz(), business_id)

    async def alist_tasks(self, **filters: Any) -> tuple[list[Task], str | None]:
        return await self.runtime.service.list_tasks(await self._biz(), **filters)

    async def aattempts(self, task_id: str | int) -> list[Attempt]:
        return await self.runtime.service.attempts(await self._biz(), task_id)

    async def aupdate_task(self, task_id: str | int, **changes: Any) -> Task:
        if isinstance(changes.get("retry"), RetryPolicy):
            changes["retry"] = changes["retry"].to_dict()
        return await self.runtime.service.update_task(await self._biz(), task_id, changes)

    async def acancel(self, task_id: str | int) -> Task:
        return await self.runtime.service.cancel(await self._biz(), task_id)

    async def aretry(self, task_id: str | int) -> Task:
        return await self.runtime.service.retry(await self._biz(), task_id)

    async def arun_worker(
        self,
        *,
        concurrency: int | None = None,
        stop: asyncio.Event | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
    ) -> None:
        """Deliver tasks until ``stop`` is set (or the task is cancelled).

        Args:
            concurrency: requests in flight (default: the ``concurrency`` setting).
            stop: set it to stop gracefully.
            metrics_port: serve ``GET /metrics`` (Prometheus) and ``GET /health`` on this port while the worker
                runs, as ``taskcenter worker --metrics-port`` does (default: the ``worker_metrics_port`` setting,
                0 = none). A port that cannot be had raises :class:`taskcenter.errors.ConfigError` before any task is claimed.
            metrics_host: the address to serve them on (default: ``worker_metrics_host``, 127.0.0.1).
        """
        # The bounds of the concurrency setting, which this bypasses: 0 ran a worker that never sent anything.
        if concurrency is not None and not int_within(concurrency, 1, 10_000):
            raise ValidationError("concurrency must be an integer from 1 to 10000", field="concurrency")
        if metrics_port is not None and not int_within(metrics_port, 0, 65_535):
            raise ValidationError("metrics_port must be an integer from 0 to 65535", field="metrics_port")
        if metrics_host is not None and (not isinstance(metrics_host, str) or not metrics_host.strip()):
            raise ValidationError("metrics_host must be an address, e.g. 127.0.0.1", field="metrics_host")
        await self._biz()
        # Imported here: the HTTP server is not needed by applications that only create tasks.
        from taskcenter.observe import DispatcherState, worker_endpoint

        dispatcher = self.runtime.dispatcher(concurrency=concurrency)

        def state() -> DispatcherState:
            return "stopping" if dispatcher.stopping else "running"

        settings = self.runtime.settings
        host = metrics_host if metrics_host is not None else settings.worker_metrics_host
        port = metrics_port if metrics_port is not None else settings.worker_metrics_port
        # Before the dispatcher starts: a port that cannot be had ends the call before any task is claimed.
        async with worker_endpoint(
            self.runtime.db, self.runtime.metrics, state, host, port, setting="metrics_port"
        ):
            await self._run_dispatcher(dispatcher, stop)

    async def _run_dispatcher(self, dispatcher: Dispatcher, stop: asyncio.Event | None) -> None:
        """Run ``dispatcher`` until ``stop`` is set (or this call is cancelled), then let it drain."""
        self._dispatcher = dispatcher
        runner = asyncio.create_task(self.runtime.run_dispatcher(dispatcher))
        waiter: asyncio.Task[Any] | None = None
        try:
            # Shielded: a cancellation of this call stops the dispatcher gracefully (below). Passed on into the
            # runner, it would cut the dispatcher off mid-run, and its result writer would wait for ever.
            if stop is None:
                await asyncio.shield(runner)
            else:
                waiter = asyncio.create_task(stop.wait())
                await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                dispatcher.stop()
                await asyncio.shield(runner)
        except asyncio.CancelledError:
            if waiter is not None:
                waiter.cancel()
            dispatcher.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            raise

    async def aclose(self) -> None:
        await self.runtime.close()

    async def __aenter__(self) -> TaskCenter:
        await self._biz()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sync API (same code, run on the private loop) ------------------------------------------------

    def create_task(self, method: str | None = None, url: str | None = None, **kwargs: Any) -> Task:
        """Create a task (see :meth:`acreate_task`); ``connection`` is then a *sync* SQLAlchemy ``Connection``.

        With a sync ``Connection`` the row is inserted on the caller's thread, inside its transaction.
        """
        connection = kwargs.pop("connection", None)
        if connection is not None:
            check_connection(connection, sa.Connection, "an AsyncConnection goes to acreate_task")
            return self._create_in(connection, method, url, **kwargs)
        return self._sync(self.acreate_task(method, url, **kwargs))

    def _create_in(self, conn: sa.Connection, method: str | None, url: str | None, **kwargs: Any) -> Task:
        given: dict[str, Any] = {
            "type": None, "payload": None, "headers": None, "json": UNSET, "form": None, "body": None,
            "content_type": None, "delay": None, "scheduled_at": None, "retry": None, "timeout": None,
            "priority": None, "success_codes": None, "retry_on": None, "follow_redirects": False,
            "notify": None, "metadata": None, **kwargs,
        }  # fmt: skip
        data = task_data(method, url, **given)
        started = self._business is not None
        try:
            business, row = self._sync(self._prepare(data))
        except StorageError as exc:
            if started or self.runtime.db.dialect != "sqlite":
                raise
            # Its first use (schema check, business registered) waited on the caller's own write lock.
            raise StorageError(
                f"{exc.message}; on SQLite, start the TaskCenter (`with tc:`, or any call) before your "
                "transaction writes: its first use needs the database too"
            ) from exc
        service = self.runtime.service
        # The insert runs here, on the caller's thread and connection; only the I/O-free parts share the loop.
        channel = NOTIFY_CHANNEL if service.needs_wakeup(row) else None
        row["id"] = task_sql.insert_row(conn, row, notify_channel=channel)
        # The dispatcher of this process learns of it when the caller commits; it also polls.
        task = service._task_from_new_row(business, row)
        if self.events.wants("created"):
            self._private_loop.running().call_soon_threadsafe(self.events.publish, "created", task.to_dict())
        return task

    async def _prepare(self, data: dict[str, Any]) -> tuple[Business, dict[str, Any]]:
        """Validate a create and check the active-task limit, as :meth:`TaskService.create_task` does."""
        business = await self._biz()
        row = self.runtime.service.prepare(business, data)
        await self.runtime.service._check_active_limit(business, 1)
        return business, row

    def get_task(self, task_id: str | int) -> Task:
        return self._sync(self.aget_task(task_id))

    def get_by_business_id(self, business_id: str) -> Task:
        return self._sync(self.aget_by_business_id(business_id))

    def list_tasks(self, **filters: Any) -> tuple[list[Task], str | None]:
        return self._sync(self.alist_tasks(**filters))

    def attempts(self, task_id: str | int) -> list[Attempt]:
        return self._sync(self.aattempts(task_id))

    def update_task(self, task_id: str | int, **changes: Any) -> Task:
        return self._sync(self.aupdate_task(task_id, **changes))

    def cancel(self, task_id: str | int) -> Task:
        return self._sync(self.acancel(task_id))

    def retry(self, task_id: str | int) -> Task:
        return self._sync(self.aretry(task_id))

    def run_worker(
        self,
        *,
        concurrency: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
    ) -> None:
        """Deliver tasks until SIGINT or SIGTERM (or :meth:`close` from another thread), then shut down
        gracefully and :meth:`close`. ``metrics_port`` and ``metrics_host``: see :meth:`arun_worker`.

        The worker runs on the same private loop as the other sync methods: database connections opened by
        an earlier ``create_task`` belong to that loop and cannot move to another. Signals are caught only
        when called from the main thread (Python delivers them there); a worker run in another thread stops
        when :meth:`close` is called.
        """
        stop = asyncio.Event()
        loop = self._private_loop.running()
        done = threading.Event()
        self._worker = (threading.current_thread(), stop, done)

        def on_signal(_signum: int, _frame: object) -> None:
            loop.call_soon_threadsafe(stop.set)

        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self._sync(
                self.arun_worker(
                    concurrency=concurrency, stop=stop, metrics_port=metrics_port, metrics_host=metrics_host
                )
            )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                self.close()
            finally:
                self._worker = None
                done.set()

    def close(self) -> None:
        """Close the database connections and stop the private loop (a later sync call starts a new one).

        A :meth:`run_worker` running in another thread is stopped first (gracefully) and waited for, and so
        are the calls other threads have in flight (cancelled after a few seconds), which would otherwise wait
        for ever on the stopped loop.
        """
        self._private_loop.check_not_on_it()
        worker = self._worker
        loop = self._private_loop.loop
        if worker is not None and worker[0] is not threading.current_thread() and loop is not None:
            _thread, stop, done = worker
            loop.call_soon_threadsafe(stop.set)
            done.wait()  # run_worker closes on its way out
        if self._private_loop.loop is not None:
            try:
                self._sync(self._aclose_after_calls())
            finally:
                self._private_loop.stop()

    async def _aclose_after_calls(self) -> None:
        current = asyncio.current_task()
        # Not the delivery of lifecycle events: the calls waited for here may queue more, and aclose() drains them.
        others = [t for t in asyncio.all_tasks() if t is not current and not self.events.delivers(t)]
        if others:
            _done, late = await asyncio.wait(others, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.aclose()

    def __enter__(self) -> TaskCenter:
        # Start now (schema check, business registered), before the caller opens its own transactions: on
        # SQLite a first use inside a transaction that already holds the write lock would wait for itself.
        self._sync(self._biz())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
