"""Connections: one async engine per backend, SQLite tuned for a single writer, migrations on demand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import await_

from taskcenter.errors import ConfigError, SchemaOutOfDate, StorageError

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("taskcenter.storage")

#: WAL pages after which SQLite's writer checkpoints by itself, inside the commit that crossed the line (SQLite's
#: default is 1,000 pages, ~4 MB). That checkpoint's copy and fsync stall every write queued behind it: measured on
#: a writer committing small transactions, commit p99 5-8 ms and max 25-32 ms with the default, 0.5-3 ms and 14 ms
#: without. :meth:`Database.checkpoints` checkpoints from a connection of its own instead; this is only the safety
#: net for when nothing runs that (an API-only process) or it falls behind.
SQLITE_WRITER_AUTOCHECKPOINT = 16384
#: Returns (1 if it could not run at all, frames in the WAL, frames copied to the database).
CHECKPOINT_SQL = "PRAGMA wal_checkpoint(PASSIVE)"
#: How long a write waits for SQLite's write lock before it fails with "database is locked".
SQLITE_LOCK_WAIT_S = 10.0
#: The write connection's ``busy_timeout``, in ms: SQLite's own busy handler then sleeps 1 ms and 2 ms before it
#: gives up, and :func:`sqlite_locked` tries again at once, so a write waiting for the lock looks every 1-2 ms
#: until ``SQLITE_LOCK_WAIT_S``. With a long busy_timeout the handler backs off to sleeps of 25, 50 and 100 ms;
#: another process's dispatcher hands the lock back for a millisecond or two between its batches, so a write
#: sleeping that long seldom tries in such a gap (measured: creates from an API process beside a busy worker
#: waited p99 437-634 ms for the lock).
SQLITE_WRITER_BUSY_MS = 3


def json_text(value: Any) -> str:
    """A JSON column's value as the engines serialise it (``None`` is JSON ``null``, as SQLAlchemy stores it)."""
    # NON_STR_KEYS: header names arrive as str subclasses (multidict's istr), which orjson refuses otherwise.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def json_value(stored: str | bytes | float) -> Any:
    """A JSON column's stored value, parsed: what the engines give SQLAlchemy back.

    SQLite stores a JSON column with NUMERIC affinity, so a document that is a bare number (a processor's result
    of ``7``) comes back as that number, not as the text ``"7"`` (orjson refuses a number).
    """
    if isinstance(stored, int | float):
        return stored
    return orjson.loads(stored)


def sqlite_time(value: datetime | None) -> str | None:
    """An aware datetime as SQLAlchemy stores it in SQLite: naive UTC ISO text, always with six fraction digits.

    For statements sent to the driver directly; the stored text must match SQLAlchemy's exactly, because SQLite
    compares these columns as text (a test checks the two agree).
    """
    if value is None:
        return None
    if value.tzinfo is not UTC:  # the dispatcher's own times are UTC already: skip the conversion for them
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        value = value.astimezone(UTC)
    # "YYYY-MM-DD HH:MM:SS.ffffff+00:00" without its offset: a quarter cheaper than a naive copy's isoformat.
    return value.isoformat(" ", "microseconds")[:26]


async def sqlite_driver(conn: AsyncConnection) -> Any:
    """The aiosqlite connection under ``conn``: one hop to its thread per statement, where SQLAlchemy takes four.

    Statements sent to it run in ``conn``'s transaction (SQLite's BEGIN IMMEDIATE was sent when it began); their
    errors (``sqlite3.Error``) become :class:`StorageError` in :meth:`Database.write` as SQLAlchemy's do.
    """
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    return driver


async def sqlite_batch(
    conn: AsyncConnection, work: Callable[[sqlite3.Connection], T], *, begin: bool = False
) -> T:
    """Run ``work(connection)`` on the thread of the aiosqlite connection under ``conn``: several statements in one
    hop (with ``begin``, the write transaction's BEGIN IMMEDIATE too; ``work`` failing then rolls it back).

    For the dispatcher's batches. Each hop to aiosqlite's thread waits a turn of a busy event loop, and each step
    of a statement (each row of an ``executemany`` or a ``RETURNING``) hands the GIL to that thread and back; a
    batch written as a few set-based statements over JSON (``json_each``) crosses once per statement instead.
    ``work`` runs on that thread: it must only use the connection it is given and its arguments.
    """
    driver = await sqlite_driver(conn)
    # aiosqlite's own way to run a callable on its thread (what its execute and commit use).
    done: T = await (
        driver._execute(_begun, work, driver._conn) if begin else driver._execute(work, driver._conn)
    )
    return done


def sqlite_locked(statement: Callable[[], T]) -> T:
    """``statement()``, tried again for up to ``SQLITE_LOCK_WAIT_S`` while it fails because another connection
    holds SQLite's write lock.

    For a statement that takes the lock outside a transaction (BEGIN IMMEDIATE, a lone write in autocommit), run
    on the write connection's thread (see ``SQLITE_WRITER_BUSY_MS``): such a statement fails for the lock before
    it changes anything, so running it again is safe. Inside a transaction a busy statement is not retried here:
    that transaction's snapshot may be what is stale.
    """
    deadline = time.monotonic() + SQLITE_LOCK_WAIT_S
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # set on errors raised by SQLite itself
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_BUSY)  # SQLITE_BUSY and its extended codes
    return str(exc).startswith("database is locked")


def begin_immediate(connection: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE on the write connection, waiting for the write lock as :func:`sqlite_locked` does."""
    sqlite_locked(lambda: connection.execute("BEGIN IMMEDIATE"))


def _begun(work: Callable[[sqlite3.Connection], T], connection: sqlite3.Connection) -> T:
    begin_immediate(connection)
    try:
        return work(connection)
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise


#: Query parameters a PostgreSQL URL may carry: asyncpg.connect's keywords and those SQLAlchemy's dialect takes.
_ASYNCPG_PARAMETERS = frozenset(
    {
        "command_timeout", "direct_tls", "gsslib", "krbsrvname", "max_cacheable_statement_size",
        "max_cached_statement_lifetime", "passfile", "server_settings", "service", "servicefile", "ssl",
        "statement_cache_size", "target_session_attrs", "timeout", "prepared_statement_cache_size",
    }
)  # fmt: skip


#: asyncpg.connect's numeric keywords, and the least each may be. A URL's query hands them over as strings,
#: which asyncpg compares with numbers (a TypeError at the first connection) or refuses (a ValueError).
_ASYNCPG_NUMBERS: dict[str, tuple[type[int] | type[float], float, bool]] = {
    "timeout": (float, 0, False),
    "command_timeout": (float, 0, False),
    "statement_cache_size": (int, 0, True),
    "max_cached_statement_lifetime": (int, 0, True),
    "max_cacheable_statement_size": (int, 0, True),
}


#: Seconds to connect to PostgreSQL unless the URL's ``?timeout=`` says otherwise.
CONNECT_TIMEOUT_S = 10.0


def asyncpg_numbers(url: sa.URL) -> dict[str, int | float]:
    """The numeric asyncpg parameters of a PostgreSQL URL's query, as numbers (``connect_args``).

    Raises:
        ConfigError: one is not a number of its kind, or is below its least value.
    """
    numbers: dict[str, int | float] = {}
    for name, (kind, least, inclusive) in _ASYNCPG_NUMBERS.items():
        text = url.query.get(name)
        if text is None:
            continue
        bound = f"{'at least' if inclusive else 'above'} {least}"
        what = "a whole number" if kind is int else "a number of seconds"
        try:
            value = kind(text) if isinstance(text, str) else None
        except ValueError:
            value = None
        if value is None or value != value or (value < least if inclusive else value <= least):
            raise ConfigError(f"database_url parameter {name} must be {what} {bound}, not {text!r}")
        numbers[name] = value
    return numbers


def async_url(url: str) -> sa.URL:
    """Turn a user-facing URL (``sqlite:///x.db``, ``postgresql://…``) into its async-driver form."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        if "sslmode" in parsed.query and "ssl" not in parsed.query:
            # libpq's name, which URLs copied from elsewhere carry; asyncpg takes the same modes as ``ssl`` (passed
            # on as sslmode it was an unexpected keyword argument: a TypeError at the first connection).
            query = {k: v for k, v in parsed.query.items() if k != "sslmode"}
            parsed = parsed.set(query={**query, "ssl": parsed.query["sslmode"]})
        unknown = sorted(set(parsed.query) - _ASYNCPG_PARAMETERS)
        if unknown:  # passed on to asyncpg.connect, which raised TypeError at the first connection
            raise ConfigError(f"database_url has a parameter asyncpg does not know: {unknown[0]!r}")
        asyncpg_numbers(parsed)
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigError(f"unsupported database {backend!r}: use sqlite:// or postgresql://")


def _sqlite_pragmas(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves so that write transactions take the write lock up front
        # (BEGIN IMMEDIATE) instead of failing with SQLITE_BUSY when a reader upgrades.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        # The write connection waits for the lock in sqlite_locked (see SQLITE_WRITER_BUSY_MS); readers seldom wait
        # at all under WAL.
        cur.execute(f"PRAGMA busy_timeout={SQLITE_WRITER_BUSY_MS if immediate else 10000}")
        cur.execute("PRAGMA foreign_keys=ON")
        if immediate:  # the writer
            cur.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WRITER_AUTOCHECKPOINT}")
        cur.close()

    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # To the driver directly: one hop to aiosqlite's thread, where a statement through SQLAlchemy takes three
        # (cursor, execute, close). Under load each hop waits a turn of the event loop: measured at 500
        # deliveries/s, 22 hops per task went down to 11 with this and ``queue.next_due``'s.
        driver = conn.connection.driver_connection
        if driver.in_transaction:  # Database.write began it on the driver already
            return
        try:
            if immediate:
                await_(driver._execute(begin_immediate, driver._conn))
            else:
                await_(driver.execute_fetchall(begin))
        except sqlite3.Error as exc:  # as SQLAlchemy raises a statement's error (busy, disk I/O)
            raise OperationalError(begin, None, exc) from exc


class Database:
    """The storage backend: ``write()`` and ``read()`` transactions, the dialect, migrations.

    On SQLite all writes go through one connection (one writer, BEGIN IMMEDIATE) while reads use a pool of
    their own under WAL. On PostgreSQL both are the same pool.
    """

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.checkpointed = 0
        """SQLite: how many checkpoints ``checkpoints`` has completed (a figure for tests and diagnostics)."""
        target = async_url(url)
        self.dialect: str = target.get_backend_name()
        common: dict[str, Any] = {"json_serializer": json_text, "json_deserializer": json_value}
        if self.dialect == "sqlite":
            database = target.database or ""
            if database in ("", ":memory:"):
                raise ConfigError(
                    "use a SQLite file, not an in-memory database: several connections share it"
                )
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # No rollback when a connection goes back to the pool: SQLAlchemy already ends (commits or rolls back)
            # every transaction it began before that, so the pool's own rollback would only be one more hop to
            # the driver's thread per transaction.
            self.write_engine = create_async_engine(
                target, pool_size=1, max_overflow=0, pool_timeout=60, pool_reset_on_return=None, **common
            )
            self.read_engine = create_async_engine(
                target, pool_size=pool_size, max_overflow=0, pool_reset_on_return=None, **common
            )
            _sqlite_pragmas(self.write_engine, immediate=True)
            _sqlite_pragmas(self.read_engine, immediate=False)
        else:
            self.write_engine = create_async_engine(
                target,
                pool_size=pool_size,
                max_overflow=pool_size,
                # asyncpg waits 60 s for a server that accepts and never answers; ?timeout= overrides this.
                connect_args={"timeout": CONNECT_TIMEOUT_S, **asyncpg_numbers(target)},
                **common,
            )
            self.read_engine = self.write_engine

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextlib.asynccontextmanager
    async def write(self, *, begin: bool = True) -> AsyncIterator[AsyncConnection]:
        """A write transaction; committed on success, rolled back on error.

        With ``begin=False`` on SQLite the caller begins it, in the same hop as its first statements:
        ``sqlite_batch(conn, work, begin=True)`` before anything else (that work may also commit it, then the
        block's end has nothing left to do). Ignored on PostgreSQL.
        """
        try:
            if self.dialect == "sqlite":
                async with self._sqlite_write(begin=begin) as conn:
                    yield conn
            else:
                async with self.write_engine.begin() as conn:
                    yield conn
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            raise StorageError(f"database error: {_short(exc)}") from exc

    @contextlib.asynccontextmanager
    async def _sqlite_write(self, *, begin: bool = True) -> AsyncIterator[AsyncConnection]:
        """SQLite's write transaction, begun and ended on the driver: BEGIN IMMEDIATE and COMMIT are one hop each.

        SQLAlchemy's own transaction (its begin, commit and their bookkeeping and events) costs CPU that the
        dispatcher's statements, sent to the driver anyway, do not need: in process, BEGIN + one statement +
        COMMIT took 347 us of CPU through SQLAlchemy and 255 us this way. A statement sent through SQLAlchemy
        still works: it finds the transaction open (``_on_begin``), and then SQLAlchemy's commit or rollback ends
        it.
        """
        async with self.write_engine.connect() as conn:
            driver = await sqlite_driver(conn)
            if begin:
                await driver._execute(begin_immediate, driver._conn)
            try:
                yield conn
            except BaseException:
                if conn.in_transaction():
                    await conn.rollback()
                if driver.in_transaction:
                    await driver.rollback()
                raise
            if conn.in_transaction():
                await conn.commit()
            elif driver.in_transaction:
                await driver.commit()

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A write connection for statements that each commit by themselves: no BEGIN or COMMIT round trips.

        For one statement that must be atomic on its own (a statement is): on PostgreSQL the connection is in
        autocommit; on SQLite the driver connection already is, as long as the statements go to the driver
        directly (through SQLAlchemy the first one would open a BEGIN IMMEDIATE transaction) and through
        :func:`sqlite_locked`: a lone INSERT takes the write lock when it starts, and waits for it as BEGIN
        IMMEDIATE does.
        """
        async with self._autocommit(self.write_engine) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading.

        On PostgreSQL it runs in autocommit: under READ COMMITTED every statement sees its own snapshot whether or
        not a transaction wraps it, so the BEGIN and ROLLBACK around a read would only add two round trips.
        """
        async with self._autocommit(self.read_engine) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _autocommit(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        try:
            async with engine.connect() as conn:
                if self.dialect == "postgresql":
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            raise StorageError(f"database error: {_short(exc)}") from exc

    async def checkpoints(self, interval_s: float = 0.25) -> None:
        """SQLite: checkpoint the WAL every ``interval_s`` until cancelled, from a connection of its own.

        Passive checkpoints neither wait for the writer nor block it, so commits never pay for a checkpoint (see
        ``SQLITE_WRITER_AUTOCHECKPOINT``). Returns at once on PostgreSQL.
        """
        if self.dialect != "sqlite":
            return
        import aiosqlite

        # aiosqlite runs the connection's calls one after another on its own thread, so closing it after a
        # cancelled checkpoint waits for that checkpoint instead of pulling the connection from under it.
        conn = await aiosqlite.connect(make_url(self.url).database or "")
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await conn.execute(CHECKPOINT_SQL)
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed: %s", exc)
                else:
                    self.checkpointed += 1
        finally:
            await conn.close()

    async def ping(self) -> None:
        """Raise :class:`StorageError` unless the database answers."""
        async with self.read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()

    # -- migrations -------------------------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def knows(self, revision: str) -> bool:
        """Whether ``revision`` is one of this release's migrations (one it does not know came from a newer one)."""
        from alembic.script import ScriptDirectory

        scripts = ScriptDirectory.from_config(self._alembic_config()).walk_revisions()
        return any(script.revision == revision for script in scripts)

    def _refuse_unknown(self, current: str | None) -> None:
        """Refuse a schema migrated by a newer taskcenter (an older release started on it after an upgrade):
        nothing this release can run brings it to a revision it does not know."""
        if current is not None and not self.knows(current):
            raise SchemaOutOfDate(
                f"database schema is at {current}, newer than this taskcenter knows (its newest is "
                f"{self.head_revision()}): run the taskcenter release that migrated it, or a later one"
            )

    async def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        def _current(sync_conn: sa.Connection) -> str | None:
            return MigrationContext.configure(sync_conn).get_current_revision()

        try:
            async with self.read_engine.connect() as conn:
                return await conn.run_sync(_current)
        except (SQLAlchemyError, OSError) as exc:
            if self.is_postgres and isinstance(getattr(exc, "orig", None) or exc, TimeoutError):
                target = async_url(self.url)
                timeout = asyncpg_numbers(target).get("timeout", CONNECT_TIMEOUT_S)
                raise StorageError(
                    f"cannot read the schema version: the database at {target.host}:{target.port or 5432} "
                    f"did not answer within {timeout:g} s (the URL's ?timeout= sets how long to wait)"
                ) from exc
            raise StorageError(f"cannot read the schema version: {_short(exc)}") from exc

    async def migrate(self, revision: str = "head") -> tuple[str | None, str | None]:
        """Bring the schema to ``revision``; returns (before, after)."""
        from alembic import command

        before = await self.current_revision()
        self._refuse_unknown(before)
        cfg = self._alembic_config()

        def _upgrade(sync_conn: sa.Connection) -> None:
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, revision)

        try:
            async with self.write_engine.begin() as conn:
                await conn.run_sync(_upgrade)
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(f"migration failed: {_short(exc)}") from exc
        return before, await self.current_revision()

    async def check_schema(self, *, auto_migrate: bool) -> None:
        """Refuse to run on an out-of-date schema (SQLite embedded mode migrates itself when asked to)."""
        current, head = await self.current_revision(), self.head_revision()
        if current == head:
            return
        self._refuse_unknown(current)
        if auto_migrate:
            before, after = await self.migrate()
            log.info("schema migrated from %s to %s", before or "nothing", after)
            return
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, this taskcenter needs {head}: "
            "run `taskcenter migrate` first"
        )


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__
