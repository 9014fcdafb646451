"""``taskcenter demo``: the whole delivery path, scripted, on a throw-away database — a live view while it runs, a
summary of every task's attempts at the end. Mounted by :mod:`taskcenter.cli`; the engine is :mod:`taskcenter.demo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from taskcenter.demo import SCENARIOS, Demo, DemoTimeout, Snapshot, TaskResult
from taskcenter.errors import TaskCenterError
from taskcenter.logs import setup_logging

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
_COLOURS = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "dim",
    "retrying": "yellow",
    "processing": "cyan",
}
PER_TASK_ROWS = 40
"""Up to this many tasks the summary has a row per task; beyond it, a row per scenario."""


def demo(
    tasks: Annotated[
        int, typer.Option("--tasks", "-n", min=1, max=1000, help="How many tasks (the scenarios in turn).")
    ] = 2 * len(SCENARIOS),
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the demo database and print how to look into it.")
    ] = False,
) -> None:
    """Show taskcenter at work: a throw-away database, a receiver on 127.0.0.1, tasks with scripted fates.

    The receiver answers 200; 500, then 200; 429 with Retry-After, then 200; 410; or too late for the timeout.

    It checks every request's Standard Webhooks signature, once with a stale secret (401).

    One kind of task goes where the SSRF guard does not let it: it fails, blocked, and no packet leaves.

    Your configuration and database are never read; the demo's own is removed unless --keep.

    Exit status: 0 when every task ended as scripted, 1 otherwise, 130 when interrupted.
    """
    try:
        directory = Path(tempfile.mkdtemp(prefix="taskcenter-demo-"))
    except OSError as exc:
        raise _fail(f"the demo could not make its temporary directory: {exc}", 1) from None
    database = directory / "demo.db"
    engine = Demo(database, tasks)
    try:
        results = _run(engine)
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    if results is not None:
        _summary(results)
    if keep:
        _kept(database, engine.api_key)
    if results is None:
        raise _fail("interrupted: the demo stopped before its tasks finished", 130)
    wrong = [r for r in results if not r.as_expected]
    if wrong:
        first = wrong[0]
        raise _fail(
            f"{len(wrong)} of {len(results)} tasks did not end as scripted, e.g. {first.business_id}: expected "
            f"{first.scenario.status} after {', '.join(first.scenario.outcomes)}, got {first.status} after "
            f"{', '.join(o for o, _ in first.attempts) or 'no attempt'}",
            1,
        )
    out.print(f"[green]all {len(results)} tasks ended as scripted.[/green]")
    out.print(
        "next: [bold]taskcenter serve[/bold] runs the REST API and a dispatcher on http://127.0.0.1:8000 (on your "
        "configured database); the README's 'Your first task in a minute' registers a business and sends a webhook."
    )


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _run(engine: Demo) -> list[TaskResult] | None:
    """Run the demo under a live view; None when SIGINT or SIGTERM stopped it."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    bar = progress.add_task("finished", total=engine.tasks)
    lines = Text()
    stopped = False

    def report(snapshot: Snapshot) -> None:
        progress.update(bar, completed=snapshot.finished)
        lines.truncate(0)
        lines.append_text(_status_line(snapshot))
        lines.append("\n")
        lines.append_text(_receiver_lines(snapshot, engine))

    async def main() -> list[TaskResult]:
        stop = asyncio.Event()

        def on_signal() -> None:
            nonlocal stopped
            stopped = True
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, on_signal)
        return await engine.run(report, stop)

    # Warnings only, as readable lines: the live view says what the info lines would (and a root logger left
    # as the process had it may hold a stream that is gone, e.g. an earlier in-process command's).
    setup_logging("WARNING", "console")
    err.print(f"taskcenter demo: {engine.tasks} tasks on a throw-away database, a receiver on 127.0.0.1")
    try:
        # Its own console: soft_wrap would crop the receiver's line at the screen's edge instead of folding it.
        live = Console(stderr=True)
        with Live(Group(progress, lines), console=live, refresh_per_second=8):
            results = asyncio.run(main())
        if not live.is_terminal:
            live.print()  # a live view's last frame, printed once, ends without a line break off a terminal
    except KeyboardInterrupt:  # before the handlers were in place
        return None
    except DemoTimeout as exc:
        raise _fail(f"the demo did not finish: {exc}", 1) from None
    except TaskCenterError as exc:
        raise _fail(exc.message, 1) from None
    except OSError as exc:  # e.g. no loopback port to listen on, or the temporary directory is not writable
        raise _fail(f"the demo could not run: {exc}", 1) from None
    return None if stopped else results


def _status_line(snapshot: Snapshot) -> Text:
    text = Text()
    for status in ("pending", "processing", "retrying", "succeeded", "failed"):
        n = snapshot.counts.get(status, 0)
        text.append(f"{status} {n}", style=_COLOURS.get(status, "") if n else "dim")
        text.append("  ")
    text.append(f"attempts {snapshot.attempts}")
    return text


def _receiver_lines(snapshot: Snapshot, engine: Demo) -> Text:
    port = engine.receiver.port if engine.receiver else 0
    answers = "  ".join(
        f"{code} ×{n}" if code else f"hung up ×{n}"
        for code, n in sorted(snapshot.answers.items(), key=_by_code)
    )
    return Text(
        f"receiver 127.0.0.1:{port}  {snapshot.requests} requests, {snapshot.valid_signatures} with a valid "
        f"signature\nanswers   {answers or '-'}"
    )


def _by_code(item: tuple[int, int]) -> int:
    return item[0] or 1000  # "hung up" (the client's timeout struck first) last


def _attempts(result: TaskResult) -> str:
    return " → ".join(f"{outcome} {code}" if code else outcome for outcome, code in result.attempts) or "-"


def _summary(results: list[TaskResult]) -> None:
    console = Console(width=None if out.is_terminal else 200, highlight=False)
    used = list(dict.fromkeys(r.scenario for r in results))
    legend = Table("scenario", "what the receiver does", show_edge=False, header_style="bold")
    for scenario in used:
        legend.add_row(scenario.name, escape(scenario.what))
    console.print(legend)
    console.print()
    table = Table(show_edge=False, header_style="bold")
    if len(results) <= PER_TASK_ROWS:
        for col in ("business_id", "status", "attempts", "outcome of each attempt", ""):
            table.add_column(col, overflow="fold", no_wrap=col in ("business_id", "status", "attempts", ""))
        for r in results:
            table.add_row(
                escape(r.business_id),
                f"[{_COLOURS.get(r.status, '')}]{r.status}[/]",
                str(len(r.attempts)),
                _attempts(r),
                "[green]as scripted[/]" if r.as_expected else "[red]unexpected[/]",
            )
    else:
        for col in ("scenario", "tasks", "status", "attempts", "outcome of each attempt", "as scripted"):
            table.add_column(col, overflow="fold", no_wrap=col != "outcome of each attempt")
        for scenario in used:
            group = [r for r in results if r.scenario is scenario]
            # The commonest fate stands for the group; the last column says whether all shared it.
            (status, attempts, tries), _ = Counter(
                (r.status, len(r.attempts), _attempts(r)) for r in group
            ).most_common(1)[0]
            good = sum(r.as_expected for r in group)
            table.add_row(
                scenario.name, str(len(group)), f"[{_COLOURS.get(status, '')}]{status}[/]", str(attempts), tries,
                f"[{'green' if good == len(group) else 'red'}]{good}/{len(group)}[/]",
            )  # fmt: skip
    console.print(table)


def _kept(database: Path, api_key: str | None) -> None:
    env = f"TASKCENTER_DATABASE_URL={shlex.quote(f'sqlite:///{database}')}"
    out.print(f"kept the demo database: {escape(str(database))}")
    out.print(f"  {escape(env)} taskcenter task list --limit 100")
    out.print(f"  {escape(env)} taskcenter task show <id> --attempts")
    out.print(f"  {escape(env)} taskcenter serve   # its REST API on http://127.0.0.1:8000")
    if api_key:
        curl = f"curl -s localhost:8000/api/v1/tasks -H 'Authorization: Bearer {api_key}'"
        out.print(f"  {curl}   # with the demo business's API key")
    out.print(f"  rm -r {escape(shlex.quote(str(database.parent)))}   # when done")
