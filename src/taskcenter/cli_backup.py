"""``taskcenter backup`` and ``taskcenter restore``: a consistent copy of a live database, checked, and back.

Mounted by :mod:`taskcenter.cli` as two commands. SQLite goes through SQLite's online backup API (no ``sqlite3``
CLI needed); PostgreSQL backups run ``pg_dump -Fc``, and restores are pg_restore's (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import sqlalchemy as sa
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from taskcenter.cli_admin import ConfigOpt, _console, settings_or_exit
from taskcenter.errors import TaskCenterError
from taskcenter.storage.database import Database

#: Pages copied per step of the backup API (4 MiB at SQLite's default page size): the progress bar moves and
#: Ctrl-C is heard between steps. The source is read in one snapshot (see :func:`_snapshot`), so steps never
#: restart however much the service writes meanwhile, and under WAL that read never blocks a writer.
STEP_PAGES = 1024
#: How long the backup's read of a live database waits for SQLite's locks (a checkpoint restarting the WAL).
SQLITE_WAIT_S = 10.0
#: asyncpg's URL parameters that libpq knows under the same name (the rest only tune asyncpg's own client).
_LIBPQ_SAME = ("passfile", "service", "target_session_attrs", "krbsrvname", "gsslib")
_TABLES = ("alembic_version", "tasks")


class Refused(Exception):
    """A backup or restore that must not go on; the message is the one line the operator reads."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    _console(stderr=True).print(f"[red]error:[/red] {escape(' '.join(message.split()))}")
    return typer.Exit(code)


def _database_url(config: Path | None) -> str:
    return settings_or_exit(config).database_url


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """A refusal or a taskcenter error is one line and exit code 1; Ctrl-C is exit code 130."""
    try:
        yield
    except Refused as exc:
        raise _fail(str(exc)) from None
    except TaskCenterError as exc:
        raise _fail(exc.message) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _sqlite_path(url: sa.URL) -> Path:
    return Path(url.database or "").expanduser()


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")  # pragma: no cover


def _progress(what: str) -> Progress:
    return Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("pages"), TimeElapsedColumn(),
        console=_console(stderr=True), transient=True,
    )  # fmt: skip


def _copy(source: sqlite3.Connection, target: sqlite3.Connection, what: str) -> None:
    """Copy ``source`` into ``target`` with the backup API, STEP_PAGES at a time, with a progress bar."""
    with _progress(what) as bar:
        job = bar.add_task(what, total=None)

        def step(_status: int, remaining: int, total: int) -> None:
            bar.update(job, total=total, completed=total - remaining)

        source.backup(target, pages=STEP_PAGES, progress=step)


@contextlib.contextmanager
def _snapshot(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` inside one read transaction: every statement and every backup step sees the
    database as it was when the transaction began, whatever the running service commits meanwhile.

    Without it each backup step begins a read of its own, and SQLite restarts the copy from page 1 whenever
    another process committed since the last step: against a writer committing back to back, a quarter of the
    steps restarted and a copy of 40 steps never finished (with it: 40 steps, no restart, under a second).
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_WAIT_S)
    try:
        conn.execute("BEGIN")
        # A deferred BEGIN reads nothing yet: the read transaction, and with it the snapshot, starts here.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield conn
    finally:
        conn.close()


def _describe(conn: sqlite3.Connection) -> tuple[str | None, int | None]:
    """(schema revision, task count) of a database, None where its table is missing."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    revision = None
    if "alembic_version" in tables:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = row[0] if row else None
    count = conn.execute("SELECT count(*) FROM tasks").fetchone()[0] if "tasks" in tables else None
    return revision, count


def _integrity(conn: sqlite3.Connection) -> str | None:
    """None if ``PRAGMA integrity_check`` finds nothing wrong, else its first complaint."""
    rows = conn.execute("PRAGMA integrity_check").fetchall()
    return None if rows == [("ok",)] else str(rows[0][0])


def _partial(dest: Path) -> Path:
    """Where a copy is written before it is checked and renamed to ``dest`` (a failed one never takes its name)."""
    return dest.with_name(f".{dest.name}.partial-{os.getpid()}")


def _check_dest(dest: Path, force: bool) -> None:
    if dest.is_dir():
        raise Refused(f"{dest} is a directory: name the backup file")
    if dest.exists() and not force:
        raise Refused(f"{dest} exists: pass --force to overwrite it")
    if not dest.parent.is_dir():
        raise Refused(f"directory {dest.parent} does not exist")


def backup_sqlite(source: Path, dest: Path, *, force: bool) -> str:
    """Copy a (live) SQLite database to ``dest``, check the copy, and return the summary line."""
    if not source.is_file():
        raise Refused(f"the database {source} does not exist")
    _check_dest(dest, force)
    if dest.exists() and dest.resolve() == source.resolve():
        raise Refused(f"{dest} is the database itself")
    partial = _partial(dest)
    partial.unlink(missing_ok=True)
    try:
        with _snapshot(source) as src:
            copy = sqlite3.connect(partial, isolation_level=None)
            try:
                _copy(src, copy, "backing up")
                # One self-contained file: no -wal beside it to lose when the copy is moved around.
                copy.execute("PRAGMA journal_mode=DELETE")
                problem = _integrity(copy)
                if problem is not None:
                    raise Refused(f"the copy fails PRAGMA integrity_check ({problem}); {dest} not written")
                revision, count = _describe(copy)
            finally:
                copy.close()
        os.replace(partial, dest)
    except sqlite3.Error as exc:
        raise Refused(f"backup of {source} failed: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return (
        f"backed up {source} to {dest}: integrity ok, schema {revision or 'none'}, "
        f"{count if count is not None else 'no'} tasks, {_size(dest.stat().st_size)}"
    )


# -- PostgreSQL ---------------------------------------------------------------------------------------


def libpq_target(url: str) -> tuple[str, dict[str, str]]:
    """The libpq URL (no password) for a taskcenter PostgreSQL URL, and the environment that carries the password.

    taskcenter's URL may carry asyncpg's parameters: ``ssl`` is libpq's ``sslmode``, ``timeout`` its
    ``connect_timeout``; those only asyncpg's client knows (statement caches, command_timeout) are left out.
    """
    parsed = sa.make_url(url)
    query: dict[str, str] = {}
    for name, value in parsed.query.items():
        text = value if isinstance(value, str) else value[-1]
        if name in ("ssl", "sslmode"):
            query["sslmode"] = text
        elif name == "timeout":
            query["connect_timeout"] = str(max(1, round(float(text))))
        elif name in _LIBPQ_SAME:
            query[name] = text
    env = {"PGPASSWORD": parsed.password} if parsed.password else {}
    target = sa.URL.create(
        "postgresql", username=parsed.username, host=parsed.host, port=parsed.port, database=parsed.database,
        query=query,
    )  # fmt: skip
    return target.render_as_string(hide_password=False), env


async def _pg_dump(url: str, partial: Path) -> tuple[str | None, int]:
    """Run ``pg_dump -Fc`` on a snapshot this connection exports, and read the revision and task count in that
    same snapshot: the summary describes exactly what the dump holds."""
    db = Database(url)
    libpq, password_env = libpq_target(url)
    try:
        async with db.write_engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                snapshot = (await conn.execute(sa.text("SELECT pg_export_snapshot()"))).scalar_one()
                revision = (
                    await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                ).scalar_one_or_none()
                count = (await conn.execute(sa.text("SELECT count(*) FROM tasks"))).scalar_one()
                command = [
                    "pg_dump",
                    "-Fc",
                    f"--snapshot={snapshot}",
                    f"--file={partial}",
                    f"--dbname={libpq}",
                ]
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *command,
                        env={**os.environ, **password_env},
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                except FileNotFoundError:
                    raise Refused(
                        "pg_dump is not on PATH: install the PostgreSQL client tools (the server's major "
                        "version or newer)"
                    ) from None
                with _console(stderr=True).status("pg_dump is writing the dump…"):
                    _, stderr = await proc.communicate()
                if proc.returncode != 0:
                    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
                    raise Refused(f"pg_dump failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    finally:
        await db.close()
    return revision, count


def backup_postgres(url: str, dest: Path, *, force: bool) -> str:
    _check_dest(dest, force)
    partial = _partial(dest)
    partial.unlink(missing_ok=True)
    try:
        revision, count = asyncio.run(_pg_dump(url, partial))
        os.replace(partial, dest)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise Refused(f"backup failed: {getattr(exc, 'orig', None) or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    name = sa.make_url(url).database
    return (
        f"backed up database {name} to {dest} (pg_dump -Fc): schema {revision or 'none'}, {count} tasks, "
        f"{_size(dest.stat().st_size)}"
    )


# -- restore ------------------------------------------------------------------------------------------


def _inspect(src: Path, db: Database) -> tuple[str, int]:
    """Check that ``src`` is a sound taskcenter database this release can run; return (revision, tasks)."""
    if not src.is_file():
        raise Refused(f"{src} does not exist" if not src.exists() else f"{src} is not a file")
    try:
        conn = sqlite3.connect(f"file:{quote(str(src.resolve()))}?mode=ro", uri=True, isolation_level=None)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not set(_TABLES) <= tables:
                raise Refused(
                    f"{src} is not a taskcenter database (it has no alembic_version or tasks table)"
                )
            revision, count = _describe(conn)
            if revision is None or count is None:
                raise Refused(f"{src} is not a taskcenter database (it has no schema revision)")
            if not db.knows(revision):
                raise Refused(
                    f"{src} is at schema {revision}, newer than this taskcenter knows (its newest is "
                    f"{db.head_revision()}): restore it with the release that wrote it, or a later one"
                )
            problem = _integrity(conn)
            if problem is not None:
                raise Refused(f"{src} fails PRAGMA integrity_check: {problem}")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:  # "file is not a database", or a damaged one
        raise Refused(f"{src} is not a SQLite database ({exc})") from None
    return revision, count


def _lock(target: Path) -> sqlite3.Connection:
    """Open ``target`` holding SQLite's exclusive lock, or refuse because another process has it open.

    Every connection to a WAL database holds a shared lock on the file for as long as it is open, idle or not, so
    a running ``serve`` or ``worker`` (or a ``sqlite3`` shell) makes this fail at once. Once switched out of WAL in
    exclusive locking mode the lock stays ours until the connection closes: nothing opens the file mid-restore.
    """
    if not target.exists():
        # A -wal without its database is from a file deleted under a stopped process: never let it replay.
        for stale in (Path(f"{target}-wal"), Path(f"{target}-shm")):
            stale.unlink(missing_ok=True)
    conn = sqlite3.connect(target, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("PRAGMA journal_mode=DELETE")  # checkpoints a stale WAL in, then drops it
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise Refused(
                f"{target} is in use by another process (a running serve or worker?): stop it, then restore"
            ) from None
        raise Refused(f"{target} cannot be opened: {exc}") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise Refused(f"{target} exists and is not a SQLite database ({exc}): not overwriting it") from None
    return conn


def restore_sqlite(src: Path, url: str, *, confirm: Callable[[str], bool]) -> str:
    """Copy the backup ``src`` over the database of ``url`` and migrate it if it is older; the summary line."""
    target = _sqlite_path(sa.make_url(url))
    db = Database(url)
    try:
        if src.exists() and target.exists() and src.resolve() == target.resolve():
            raise Refused(f"{src} is the database itself")
        revision, count = _inspect(src, db)
        created = not target.exists()
        conn = _lock(target)
        try:
            _, current = _describe(conn)
            losing = f"replace {target} ({current} tasks)" if current is not None else f"write {target}"
            if not confirm(f"{losing} with {src} (schema {revision}, {count} tasks)?"):
                raise typer.Exit(1)
            source = sqlite3.connect(f"file:{quote(str(src.resolve()))}?mode=ro", uri=True)
            try:
                _copy(source, conn, "restoring")
            finally:
                source.close()
        except BaseException as exc:
            conn.close()
            if created:  # the lock made an empty file: leave nothing behind that was not there
                target.unlink(missing_ok=True)
            if isinstance(exc, sqlite3.Error):
                raise Refused(f"restore into {target} failed: {exc}") from None
            raise
        conn.close()
        summary = f"restored {src} into {target}: schema {revision}, {count} tasks"
        if revision != db.head_revision():
            before, after = asyncio.run(db.migrate())
            summary += f", migrated from {before} to {after}"
        return summary
    finally:
        asyncio.run(db.close())


# -- the commands ---------------------------------------------------------------------------------------


def backup(
    dest: Annotated[
        Path, typer.Argument(help="The file to write (a SQLite file, or pg_dump's custom format).")
    ],
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Copy the database while serve and workers keep running: consistent, then checked."""
    url = _database_url(config)
    started = time.monotonic()
    with _one_line():
        if sa.make_url(url).get_backend_name() == "sqlite":
            line = backup_sqlite(_sqlite_path(sa.make_url(url)), dest, force=force)
        else:
            line = backup_postgres(url, dest, force=force)
    _console().print(f"{escape(line)} in {time.monotonic() - started:.1f} s")


def restore(
    src: Annotated[Path, typer.Argument(help="A backup written by `taskcenter backup` (SQLite).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Replace the (stopped) SQLite database with a backup, then migrate it if it is older."""
    url = _database_url(config)
    if sa.make_url(url).get_backend_name() != "sqlite":
        raise _fail(
            "on PostgreSQL, restore a dump with pg_restore into an empty database: createdb NEW && "
            "pg_restore --no-owner -d NEW DUMP (docs/operations.md, Back up and restore)"
        )

    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise Refused(f"{question.rstrip('?')}: not asked without a terminal, pass --yes")
        return typer.confirm(question, err=True)

    with _one_line():
        line = restore_sqlite(src, url, confirm=confirm)
    _console().print(escape(line))
