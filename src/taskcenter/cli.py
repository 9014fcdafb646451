"""The ``taskcenter`` command line: run the service and the dispatcher, migrate, and manage tasks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

# Typer carries its own copy of Click, whose exceptions a command line raises (typer is pinned in the lock file).
from typer._click import exceptions as click_errors
from typer.core import TyperGroup

from taskcenter._version import __version__
from taskcenter.audit import AuditLog
from taskcenter.cli_admin import (
    _actor,
    audit_app,
    business_app,
    duration_s,
    operator_app,
    require_database,
    settings_or_exit,
)
from taskcenter.cli_backup import backup, restore
from taskcenter.cli_demo import demo
from taskcenter.cli_hosts import host_app
from taskcenter.config import Settings
from taskcenter.domain.states import RETRYABLE_BY_HAND
from taskcenter.domain.task import Task, rfc3339
from taskcenter.errors import TaskCenterError
from taskcenter.heap import settle_heap
from taskcenter.intake import host_filter
from taskcenter.logs import setup_logging
from taskcenter.runtime import Runtime
from taskcenter.stats import StatsService

T = TypeVar("T")


class _OneLineErrors(TyperGroup):
    """The root command: a mistyped command, option or value is one ``error:`` line and exit 2, like every other
    failure here, not Click's boxed usage panel (help asked for by giving no arguments is still printed)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        main = functools.partial(
            super().main, args, prog_name, complete_var, windows_expand_args=windows_expand_args
        )
        if not standalone_mode:
            return main(standalone_mode=False, **extra)
        try:
            code = main(standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError:
            return main(standalone_mode=True, **extra)
        except click_errors.UsageError as exc:
            see = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            raise _exit_with(f"{exc.format_message()}{see}", exc.exit_code) from None
        except click_errors.ClickException as exc:
            raise _exit_with(exc.format_message(), exc.exit_code) from None
        except typer.Abort:
            raise _exit_with("aborted", 1) from None
        sys.exit(code if isinstance(code, int) else 0)


def _exit_with(message: str, code: int) -> SystemExit:
    _fail(message, code)
    return SystemExit(code)


app = typer.Typer(
    cls=_OneLineErrors,
    name="taskcenter",
    help="Reliable, scheduled, throttled delivery of outbound HTTP requests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
task_app = typer.Typer(help="Create, inspect, cancel and retry tasks.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(task_app, name="task")
app.add_typer(config_app, name="config")
app.add_typer(business_app, name="business")
app.add_typer(operator_app, name="operator")
app.add_typer(audit_app, name="audit")
app.add_typer(host_app, name="host")
# soft_wrap: a long line stays one line (errors must be one line; long URLs stay greppable).
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="A taskcenter.toml file (default: ./taskcenter.toml).")
]


def _fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; return the exit to raise.

    The message is escaped: it may quote user input (a task id, a business_id) that looks like Rich markup.
    """
    err.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False)
    return typer.Exit(code)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when available; TaskCenterError becomes one line and exit code 1."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we run on
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    except TaskCenterError as exc:
        raise _fail(exc.message, 1) from None
    except SQLAlchemyError as exc:  # e.g. the database does not exist: an operational error, not a bug
        raise _fail(f"database error: {getattr(exc, 'orig', None) or exc}", 1) from None
    except OSError as exc:  # e.g. the database server refuses connections, or a path cannot be created
        raise _fail(f"database unreachable: {exc}", 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _with_runtime(settings: Settings, work: Callable[[Runtime], Coroutine[Any, Any, T]]) -> T:
    rt = Runtime(settings)
    try:
        await rt.start()
        return await work(rt)
    finally:
        await rt.close()


def _stop_on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"taskcenter {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    # Eager: handled before Click insists on a command, so `taskcenter --version` works on its own.
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Reliable, scheduled, throttled delivery of outbound HTTP requests."""


# -- running ------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (TASKCENTER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (TASKCENTER_PORT).")] = None,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="API only: run no dispatcher here.")] = False,
    concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight (TASKCENTER_CONCURRENCY).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the REST API and (unless --no-worker) the dispatcher in one process."""
    settings = settings_or_exit(config, host=host, port=port, concurrency=concurrency)
    setup_logging(settings.log_level, settings.log_format)
    _run(_serve(settings, with_worker=not no_worker))


class _Server:
    """uvicorn without its own signal handling: this process decides how to shut down (dispatcher first)."""

    def __init__(self, app_: Any, settings: Settings, on_started: Callable[[], None]) -> None:
        import uvicorn

        from taskcenter.api.server import uvicorn_config

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

            async def startup(self, sockets: Any = None) -> None:
                # Only once it listens: a port in use ends startup (uvicorn logs why and exits 3) before this.
                await super().startup(sockets)
                if self.started:
                    on_started()

        self.server = Server(uvicorn_config(app_, host=settings.host, port=settings.port))

    async def serve(self) -> None:
        await self.server.serve()

    def stop(self) -> None:
        self.server.should_exit = True


async def _serve(settings: Settings, *, with_worker: bool) -> None:
    from taskcenter.api import create_app

    async def work(rt: Runtime) -> None:
        def announce() -> None:
            err.print(
                f"taskcenter {__version__} serving on http://{settings.host}:{settings.port} "
                f"({'API + dispatcher' if with_worker else 'API only'}, {rt.db.dialect})",
                highlight=False,
            )

        server = _Server(create_app(rt, dispatcher_running=with_worker), settings, announce)
        dispatcher = rt.dispatcher() if with_worker else None
        settle_heap()  # start-up objects out of the GC's full collections (they stalled requests ~0.2 s)

        def stop() -> None:
            server.stop()
            if dispatcher is not None:
                dispatcher.stop()

        _stop_on_signals(stop)
        jobs = [asyncio.create_task(server.serve())]
        if dispatcher is not None:
            jobs.append(asyncio.create_task(rt.run_dispatcher(dispatcher)))
        done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.gather(*jobs)
        for job in done:
            job.result()

    await _with_runtime(settings, work)


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight (TASKCENTER_CONCURRENCY).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve GET /metrics and GET /health on this port (TASKCENTER_WORKER_METRICS_PORT; 0 = none)."
        ),
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(help="Address for --metrics-port (TASKCENTER_WORKER_METRICS_HOST, default 127.0.0.1)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a dispatcher only (scale out: any number of these on one PostgreSQL database)."""
    settings = settings_or_exit(
        config,
        concurrency=concurrency,
        worker_metrics_port=metrics_port,
        worker_metrics_host=metrics_host,
    )
    setup_logging(settings.log_level, settings.log_format)

    async def work(rt: Runtime) -> None:
        from taskcenter.observe import DispatcherState, worker_endpoint

        dispatcher = rt.dispatcher()

        def state() -> DispatcherState:
            return "stopping" if dispatcher.stopping else "running"

        # Before the first claim: a port that cannot be had ends the worker before it holds any task.
        host, port = settings.worker_metrics_host, settings.worker_metrics_port
        async with worker_endpoint(rt.db, rt.metrics, state, host, port) as endpoint:
            settle_heap()  # start-up objects out of the GC's full collections (they stalled the event loop)
            _stop_on_signals(dispatcher.stop)
            where = f", /metrics and /health on {endpoint.url}" if endpoint is not None else ""
            err.print(f"taskcenter worker {dispatcher.name} on {rt.db.dialect}{where}", highlight=False)
            await rt.run_dispatcher(dispatcher)

    _run(_with_runtime(settings, work))


app.command()(demo)
app.command()(backup)
app.command()(restore)


@app.command()
def migrate(config: ConfigOpt = None) -> None:
    """Bring the database schema up to date."""
    settings = settings_or_exit(config)

    async def work() -> tuple[str | None, str | None]:
        rt = Runtime(settings)
        try:
            return await rt.db.migrate()
        finally:
            await rt.close()

    before, after = _run(work())
    if before == after:
        out.print(f"schema already at {after}")
    else:
        out.print(f"schema migrated from {before or 'nothing'} to {after}")


# -- tasks ----------------------------------------------------------------------------------------------


def _short_time(value: datetime | None) -> str:
    """``2026-11-26 06:13:58Z``: tables show seconds; JSON output keeps the full RFC 3339 value."""
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def _print_table(table: Table) -> None:
    # On a terminal the table fits the screen; into a pipe or file it is not folded, so lines stay greppable.
    Console(width=None if out.is_terminal else 400).print(table)


def _task_table(tasks: list[Task]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    # Short columns never wrap; the rest fold, the key and the target keeping room to stay readable.
    for col in ("id", "business", "business_id", "status", "attempts", "target", "next attempt", "created"):
        fixed = col in ("id", "status", "attempts")
        table.add_column(
            col, overflow="fold", no_wrap=fixed, min_width={"business_id": 10, "target": 16}.get(col)
        )
    colours = {"succeeded": "green", "failed": "red", "cancelled": "dim", "retrying": "yellow"}
    for t in tasks:
        target = t.request["url"] if t.request else t.type
        table.add_row(
            str(t.row_id),
            escape(t.business_code),
            escape(t.business_id),
            f"[{colours.get(t.status, 'cyan')}]{t.status}[/]",
            f"{t.attempts}/{t.max_attempts}",
            escape(target),
            _short_time(t.next_attempt_at),
            _short_time(t.created_at),
        )
    return table


def _print_task(task: Task, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(task.to_dict()))
        return
    data = task.to_dict()
    for key in ("id", "row_id", "business_code", "business_id", "type", "status", "outcome", "attempts",
                "max_attempts", "priority", "next_attempt_at", "last_attempt_at", "finished_at", "last_error"):  # fmt: skip
        value = escape(str(data[key])) if data[key] is not None else "-"
        out.print(f"[bold]{key:>16}[/] {value}", highlight=False)
    if task.request:
        request = escape(f"{task.request['method']} {task.request['url']}")
        out.print(f"[bold]{'request':>16}[/] {request}", highlight=False)
    if task.last_response:
        out.print(f"[bold]{'last response':>16}[/] {task.last_response.get('status_code')}", highlight=False)


@task_app.command("create")
def task_create(
    url: Annotated[str, typer.Argument(help="Where to send the request.")],
    business: Annotated[str, typer.Option("--business", "-b", help="Business system code.")],
    business_id: Annotated[str, typer.Option("--business-id", "-k", help="Your unique key for the task.")],
    method: Annotated[
        str, typer.Option("--method", "-X", help="GET, POST, PUT, PATCH, DELETE or HEAD.")
    ] = "POST",
    json_body: Annotated[str | None, typer.Option("--json", help="JSON body.")] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="'Name: value', repeatable.")
    ] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds to wait before the first attempt.")] = None,
    priority: Annotated[
        int | None, typer.Option(help="-1000 to 1000; higher goes first among due tasks (default 0).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--output-json", help="Print the task as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Create a task."""
    data: dict[str, Any] = {"business_id": business_id, "method": method, "url": url}
    if json_body is not None:
        try:
            data["json"] = json.loads(json_body)
        # JSONDecodeError is a ValueError, as are numbers of too many digits; deep nesting is a RecursionError.
        except (ValueError, RecursionError) as exc:
            raise _fail(f"--json is not valid JSON: {exc}", 2) from None
    if header:
        headers = {}
        for h in header:
            name, sep, value = h.partition(":")
            if not sep:
                raise _fail(f"header {h!r} must look like 'Name: value'", 2)
            headers[name.strip()] = value.strip()
        data["headers"] = headers
    if delay is not None:
        data["delay"] = delay
    if priority is not None:
        data["priority"] = priority

    async def work(rt: Runtime) -> Task:
        return await rt.service.create_task(await rt.service.business(business), data)

    _print_task(_run(_with_runtime(require_database(settings_or_exit(config)), work)), as_json)


@task_app.command("show")
def task_show(
    task_id: Annotated[str, typer.Argument(help="Task UUID or numeric id.")],
    attempts: Annotated[bool, typer.Option("--attempts", "-a", help="Also list the attempts.")] = False,
    as_json: Annotated[bool, typer.Option("--output-json", help="Print as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show one task (and its attempts)."""

    async def work(rt: Runtime) -> tuple[Task, list[Any]]:
        task = await rt.service.get_task(None, task_id)
        return task, (await rt.service.attempts(None, task_id) if attempts else [])

    task, tries = _run(_with_runtime(require_database(settings_or_exit(config)), work))
    if as_json:
        data = task.to_dict()
        if attempts:
            data["attempts_list"] = [a.to_dict() for a in tries]
        out.print_json(json.dumps(data))
        return
    _print_task(task, False)
    if tries:
        table = Table(
            "#", "started", "ms", "outcome", "status", "error", show_edge=False, header_style="bold"
        )
        for a in tries:
            code = a.response.get("status_code") if a.response else None
            table.add_row(str(a.number), rfc3339(a.started_at) or "", str(a.duration_ms or ""), a.outcome,
                          str(code or "-"), escape(a.error or ""))  # fmt: skip
        _print_table(table)


@task_app.command("list")
def task_list(
    status: Annotated[str | None, typer.Option(help="Comma-separated statuses.")] = None,
    business: Annotated[
        str | None, typer.Option("--business", "-b", help="Only this business system.")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Only tasks to this host:port, or to every port of a host.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Most tasks shown.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page.")] = None,
    config: ConfigOpt = None,
) -> None:
    """List tasks, newest first."""

    async def work(rt: Runtime) -> tuple[list[Task], str | None]:
        biz = await rt.service.business(business) if business is not None else None
        statuses = [s.strip() for s in status.split(",")] if status else None
        return await rt.service.list_tasks(biz, status=statuses, host=host, cursor=cursor, limit=limit)

    tasks, next_cursor = _run(_with_runtime(require_database(settings_or_exit(config)), work))
    _print_table(_task_table(tasks))
    if next_cursor:
        out.print(f"more: --cursor {next_cursor}", highlight=False)


@task_app.command("cancel")
def task_cancel(
    task_ids: Annotated[list[str], typer.Argument(help="Task UUIDs or numeric ids.", show_default=False)],
    config: ConfigOpt = None,
) -> None:
    """Cancel tasks that have not finished: all of those given, or none (written to the audit log). A worker
    holding one that it has not sent yet drops it unsent."""

    async def work(rt: Runtime) -> list[Task]:
        cancelled = await rt.service.cancel_many(None, task_ids)
        for task in cancelled:
            business = await rt.service.business(task.business_code)
            await AuditLog(rt.db, clock=rt.clock).record(
                _actor(), "task.cancel", "task", task.id, business_pk=business.pk,
                details={"business_id": task.business_id},
            )  # fmt: skip
        return cancelled

    for task in _run(_with_runtime(require_database(settings_or_exit(config)), work)):
        out.print(f"task {task.id} is {task.status}", highlight=False)


async def _audited(rt: Runtime, action: str, change: Coroutine[Any, Any, Task]) -> Task:
    """Apply a task change made from the command line and record it in the audit log as ``cli:<user>``."""
    task = await change
    business = await rt.service.business(task.business_code)
    await AuditLog(rt.db, clock=rt.clock).record(
        _actor(), action, "task", task.id, business_pk=business.pk, details={"business_id": task.business_id}
    )
    return task


@task_app.command("retry")
def task_retry(
    task_id: Annotated[str, typer.Argument(help="Task UUID or numeric id.")], config: ConfigOpt = None
) -> None:
    """Send a failed or cancelled task again, with a renewed attempt budget (was http-request-task:retry)."""
    task = _run(
        _with_runtime(
            require_database(settings_or_exit(config)),
            lambda rt: _audited(rt, "task.retry", rt.service.retry(None, task_id)),
        )
    )
    out.print(
        f"task {task.id} is {task.status} again ({task.max_attempts - task.attempts} attempts)",
        highlight=False,
    )


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )


@app.command("retry")
def retry_bulk(
    status: Annotated[str, typer.Option(help="failed, cancelled, or both comma-separated.")] = "failed",
    host: Annotated[
        str | None, typer.Option(help="Only tasks to this host:port, or to every port of a host.")
    ] = None,
    business: Annotated[
        str | None, typer.Option("--business", "-b", help="Only this business system.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only tasks created in the last 12h, 7d, …")] = None,
    config: ConfigOpt = None,
) -> None:
    """Retry many failed (or cancelled) tasks at once, each with a renewed attempt budget."""
    statuses = [s.strip() for s in status.split(",") if s.strip()]
    if not statuses or not set(statuses) <= RETRYABLE_BY_HAND:  # before the progress bar draws itself
        raise _fail(f"--status {status}: only failed or cancelled tasks can be retried", 1)
    if host is not None:
        try:
            host_filter(host)  # likewise; and an empty one (an unset variable) must not mean every host
        except TaskCenterError as exc:
            raise _fail(exc.message, 1) from None
    after = None
    if since is not None:
        from datetime import UTC, timedelta

        after = datetime.now(UTC) - timedelta(seconds=duration_s(since))

    async def work(rt: Runtime) -> tuple[int, int]:
        biz = await rt.service.business(business) if business is not None else None
        with _progress() as bar:
            job = bar.add_task("retrying", total=None)

            def step(retried: int, skipped: int) -> None:
                bar.update(job, completed=retried + skipped)

            return await rt.service.retry_matching(
                status=statuses, business=biz, host=host, since=after, progress=step
            )

    retried, skipped = _run(_with_runtime(require_database(settings_or_exit(config)), work))
    out.print(
        f"retried {retried} tasks" + (f", skipped {skipped} (changed or live again)" if skipped else "")
    )


@app.command()
def purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of finished tasks to delete: 90d, 12h, …")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Delete finished tasks (and their attempts) that finished longer ago than --older-than."""
    age = duration_s(older_than)

    async def work(rt: Runtime) -> int:
        total = await rt.service.count_purgeable(older_than_s=age)
        if total == 0:
            return 0
        if not yes and not typer.confirm(f"delete {total} finished tasks?", err=True):
            raise typer.Exit(1)
        with _progress() as bar:
            job = bar.add_task("purging", total=total)
            return await rt.service.purge(older_than_s=age, progress=lambda n: bar.advance(job, n))

    out.print(
        f"purged {_run(_with_runtime(require_database(settings_or_exit(config)), work))} finished tasks"
    )


@app.command()
def stats(
    business: Annotated[
        str | None, typer.Option("--business", "-b", help="Only this business system (default: all).")
    ] = None,
    window_hours: Annotated[
        float, typer.Option(help="Hours the created/succeeded/failed counts, latency and hosts look back.")
    ] = 24.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (as GET /api/v1/stats answers).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Counts by status, success rate, attempt latency p50/p90/p95/p99 and the busiest hosts."""

    async def work(rt: Runtime) -> dict[str, Any]:
        biz = await rt.service.business(business) if business is not None else None
        return await StatsService(rt.db, clock=rt.clock).figures(biz, window_hours=window_hours)

    figures = _run(_with_runtime(require_database(settings_or_exit(config)), work))
    if as_json:
        out.print_json(json.dumps(figures))
        return
    who = figures["business_code"] or f"all business systems ({figures['businesses']})"
    counts = "  ".join(f"{status} {n}" for status, n in figures["counts"].items())
    rate = figures["success_rate"]
    latency = figures["latency_ms"]
    lines = [
        f"{'business':>10}  {who}",
        f"{'tasks':>10}  {counts}  (total {figures['total']})",
        f"{'last':>10}  {figures['window_hours']:g} h, since {figures['since']}: created {figures['created']}, "
        f"succeeded {figures['succeeded']}, failed {figures['failed']}, success rate "
        + (f"{rate * 100:.1f} %" if rate is not None else "-"),
        f"{'latency':>10}  "
        + "  ".join(
            f"{p} {latency[p]:g} ms" for p in ("p50", "p90", "p95", "p99") if latency.get(p) is not None
        )
        + f"  ({latency.get('samples', 0)} attempts)",
    ]
    if figures["processors_due"]:
        # Tasks only a worker with their processor claims: an old due time means none is running (or too few).
        lines.append(
            f"{'due':>10}  "
            + "  ".join(
                f"{d['type']} {d['due']} (oldest due {d['oldest_due_at']})" for d in figures["processors_due"]
            )
            + "  (processor tasks not claimed yet)"
        )
    for h in figures["held"]:
        # Held unsent until an operator acts (docs/operations.md, "Secret key rotation").
        more = ", …" if h["tasks"] > len(h["task_ids"]) else ""
        lines.append(
            f"{'held':>10}  {h['business_code']} {h['tasks']} tasks ({h['reason']}: not sent until fixed): "
            + ", ".join(h["task_ids"])
            + more
        )
    for line in lines:
        out.print(escape(line), highlight=False)
    if figures["hosts"]:
        table = Table("host", "tasks", "succeeded", "failed", show_edge=False, header_style="bold")
        for h in figures["hosts"]:
            table.add_row(escape(h["host"]), str(h["tasks"]), str(h["succeeded"]), str(h["failed"]))
        _print_table(table)


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective settings, secrets masked."""
    out.print_json(json.dumps(settings_or_exit(config).masked(), default=str))


class _Stdout:
    """``sys.stdout`` for the ``taskcenter`` script: a reader that stops early (``| head -1``) ends the command.

    Rich catches a broken pipe itself and exits 1, as if the command had failed; every writer (Rich's consoles,
    Typer's help, a plain print) writes through ``sys.stdout``, so this one place turns it into status 0 with no
    traceback, as ripgrep and bat do. The reader has what it wanted: 141 (killed by SIGPIPE, as ``cat`` is) would
    fail ``set -o pipefail`` scripts at random, only when the output outran the reader. What the command did
    (cancel, retry) is done; only the rest of its output is dropped.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            raise self._gone() from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise self._gone() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _gone(self) -> SystemExit:
        # What the stream still buffers goes to /dev/null, or the interpreter's last flush would print
        # "Exception ignored … BrokenPipeError" on its way out.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        return SystemExit(0)


def _open_standard_descriptors() -> None:
    """Put /dev/null on any of descriptors 0, 1 and 2 the script was started without (``>&-``, ``<&-``).

    Otherwise the next file opened (the SQLite database, a socket) takes that number, and uvloop aborts the
    process (SIGABRT) when it closes it: it asserts that it never closes one of 0, 1 and 2.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if opened != fd:  # pragma: no cover - only if a lower one closed meanwhile
                os.close(opened)


def main() -> None:
    """Entry point of the ``taskcenter`` script."""
    _open_standard_descriptors()
    stdout = sys.stdout
    if stdout is not None:  # None when started with stdout closed (>&-)
        sys.stdout = _Stdout(stdout)
    try:
        app()
    except TaskCenterError as exc:  # e.g. a bad setting found while loading
        _fail(exc.message, 1)
        sys.exit(1)
    finally:
        sys.stdout = stdout
