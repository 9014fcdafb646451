"""Task rows: insert (alone, in batches, or inside a caller's transaction), read, list, and guarded changes."""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.errors import DuplicateTask, StorageError
from taskcenter.storage.database import json_text, sqlite_locked
from taskcenter.storage.schema import (
    LIVE_SQL,
    UNNOTIFIED_PG_SQL,
    UNNOTIFIED_SQL,
    attempts,
    businesses,
    tasks,
)

_LIVE = sa.text(LIVE_SQL)
# Qualified form for queries that join businesses (which has a status column of its own).
_LIVE_Q = sa.text("tasks." + LIVE_SQL)


def insert_statement(dialect: str, rows: Sequence[Mapping[str, Any]]) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING RETURNING`` against the live-``business_id`` unique index.

    Rows that collide with a live task come back missing from the RETURNING set instead of aborting the
    transaction, which matters when the insert runs inside the caller's own transaction (outbox).
    """
    ins = postgresql.insert(tasks) if dialect == "postgresql" else sqlite.insert(tasks)
    return (
        ins.values(list(rows))
        .on_conflict_do_nothing(index_elements=[tasks.c.business_pk, tasks.c.business_id], index_where=_LIVE)
        .returning(tasks.c.id, tasks.c.uuid, tasks.c.business_id)
    )


@functools.cache
def insert_one_statement(dialect: str) -> Any:
    """The single-row form of :func:`insert_statement`, with bound parameters (one compiled statement, reused).

    Built once per dialect: constructing the statement object cost more per create than running it cached.
    """
    ins = postgresql.insert(tasks) if dialect == "postgresql" else sqlite.insert(tasks)
    return ins.on_conflict_do_nothing(
        index_elements=[tasks.c.business_pk, tasks.c.business_id], index_where=_LIVE
    ).returning(tasks.c.id, tasks.c.uuid, tasks.c.business_id)


_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _pg_type(column: sa.Column[Any]) -> str:
    return str(column.type.dialect_impl(_PG).compile(dialect=_PG))


#: JSON columns take their values serialised (the driver's jsonb codec sends text as is).
_JSON_COLUMNS = frozenset(c.name for c in tasks.columns if isinstance(c.type, sa.JSON))


def _param_type(name: str, *, array: bool) -> str:
    """The cast of a parameter of column ``name``: JSON goes as text, cast to jsonb by the server (the driver's
    jsonb codec is a Python call per value)."""
    if name in _JSON_COLUMNS:
        return "text[]::jsonb[]" if array else "text::jsonb"
    return f"{_pg_type(tasks.c[name])}{'[]' if array else ''}"


def _unnest_rows(varying: tuple[str, ...], shared: tuple[str, ...]) -> str:
    """``INSERT INTO tasks (…) SELECT … FROM unnest(…)`` of any number of rows (PostgreSQL).

    Each column in ``varying`` is one array parameter, unnested into the rows; each column in ``shared`` (a
    value every row has) is one scalar parameter, computed once by the server as an InitPlan (``(SELECT $n)``)
    rather than once per row. ``varying`` must not be empty: it gives the row count.
    """
    names = ", ".join(f'"{name}"' for name in (*varying, *shared))
    arrays = ", ".join(f"${n}::{_param_type(name, array=True)}" for n, name in enumerate(varying, 1))
    scalars = "".join(
        f", (SELECT ${n}::{_param_type(name, array=False)})"
        for n, name in enumerate(shared, len(varying) + 1)
    )
    return f"INSERT INTO tasks ({names}) SELECT u.*{scalars} FROM unnest({arrays}) AS u"


@functools.cache
def _unnest_insert(varying: tuple[str, ...], shared: tuple[str, ...], notify: bool) -> str:
    """:func:`_unnest_rows`, skipping rows whose ``business_id`` is live already, returning the stored ones.

    With ``notify``, the statement also calls ``pg_notify`` on the channel given as the last parameter — as an
    InitPlan, so once, and only if a row was stored (the RETURNING list is evaluated only for stored rows);
    PostgreSQL sends it at commit.
    """
    wake = f", (SELECT pg_notify(${len(varying) + len(shared) + 1}::text, ''))" if notify else ""
    return (
        f"{_unnest_rows(varying, shared)} "
        f"ON CONFLICT (business_pk, business_id) WHERE {LIVE_SQL} DO NOTHING RETURNING id, uuid::text{wake}"
    )


@functools.cache
def _unnest_insert_all(varying: tuple[str, ...], shared: tuple[str, ...]) -> str:
    """:func:`_unnest_rows` with no conflict clause and nothing returned but one NOTIFY (the last parameter)."""
    channel = len(varying) + len(shared) + 1
    return (
        f"WITH stored AS ({_unnest_rows(varying, shared)} RETURNING 1) "
        f"SELECT pg_notify(${channel}::text, '') FROM (SELECT count(*) AS n FROM stored) AS c WHERE c.n > 0"
    )


#: The unique index that keeps a ``business_id`` to one live task (storage.schema).
_LIVE_INDEX = "uq_tasks_live_business_id"


async def insert_all(
    conn: AsyncConnection, rows: Sequence[Mapping[str, Any]], *, notify_channel: str
) -> bool:
    """PostgreSQL, on a connection in autocommit: store every row or none, with one statement; True if stored.

    The cheap case of :func:`insert_many`, for a batch whose ``business_id`` values are all new: no conflict
    arbiter (a speculative insertion per row, ~7 % of the statement's server time) and no row sent back. If a
    ``business_id`` is live already the statement fails as a whole and this returns False, having stored
    nothing: the caller then goes through :func:`insert_many`, which reports each row. ``notify_channel`` is
    NOTIFY'd when the rows are stored. Rows must have the same keys and no ``id``.
    """
    varying, shared, values = _split_columns(tuple(rows[0].keys()), rows)
    values.append(notify_channel)
    try:
        await conn.exec_driver_sql(_unnest_insert_all(tuple(varying), tuple(shared)), tuple(values))
    except sa.exc.IntegrityError as exc:
        # The driver's error (asyncpg's UniqueViolationError) names the index; its message may be translated.
        if getattr(getattr(exc.orig, "__cause__", None), "constraint_name", None) == _LIVE_INDEX:
            return False
        raise
    return True


def _split_columns(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> tuple[list[str], list[str], list[Any]]:
    """Split ``columns`` into those whose value differs between ``rows`` and those all rows share; returns
    (varying, shared, parameters: one list per varying column, then one value per shared column).

    A batch's rows mostly agree (status, timestamps, the retry policy, the target, every unset field), and a
    shared column costs one value to encode and send instead of one per row. JSON columns are compared by their
    serialised text, since Python's ``==`` holds ``1 == 1.0 == True``, which JSON does not. ``uuid`` is
    always an array: it is unique per row, and the statement needs one array. A split into a new shape once
    :data:`MAX_SHAPES` are known comes back with every column varying.
    """
    count = len(rows)
    varying: list[str] = []
    shared: list[str] = []
    arrays: list[Any] = []
    scalars: list[Any] = []
    for name in columns:
        values = list(map(operator.itemgetter(name), rows))
        first = values[0]
        if name in _JSON_COLUMNS:
            if first is None and values.count(None) == count:  # absent in every row: no serialising
                shared.append(name)
                scalars.append(json_text(None))
                continue
            values = list(map(json_text, values))
            first = values[0]
        if name != "uuid" and values.count(first) == count:
            shared.append(name)
            scalars.append(first)
        else:
            varying.append(name)
            arrays.append(values)
    shape = (tuple(varying), tuple(shared))
    if shared and shape not in _SHAPES:
        if len(_SHAPES) >= MAX_SHAPES:
            # Every column an array: the one statement a column set always had, whatever varies.
            per_row = dict(zip(varying, arrays, strict=True))
            once = dict(zip(shared, scalars, strict=True))
            return list(columns), [], [per_row[n] if n in per_row else [once[n]] * count for n in columns]
        _SHAPES[shape] = None
    return varying, shared, arrays + scalars


#: Statement shapes (which columns vary, which all rows share) made so far. Each is a statement text that every
#: connection prepares once; past MAX_SHAPES a new shape is sent with every column as an array instead, so a
#: varied workload cannot churn the drivers' prepared-statement caches (100 statements per connection).
MAX_SHAPES = 32
_SHAPES: dict[tuple[tuple[str, ...], tuple[str, ...]], None] = {}


async def insert_many(
    conn: AsyncConnection, rows: Sequence[Mapping[str, Any]], *, notify_channel: str | None = None
) -> list[tuple[int, str]]:
    """Insert prepared rows, skipping those whose ``business_id`` is live already; ``(id, uuid)`` of the stored.

    On PostgreSQL one ``INSERT … SELECT FROM unnest(…)`` takes every row (see :func:`_unnest_insert`): one
    round trip, no bound-parameter limit, and a statement text per shape of batch (which columns vary), each
    prepared once per connection. Elsewhere the single-row statement runs as SQLAlchemy's multi-row
    "insertmanyvalues" pages. Either way JSON ``None`` is stored as JSON ``null``, as the single-row insert
    stores it. ``notify_channel`` (PostgreSQL only): NOTIFY it at commit if any row was stored.
    """
    if not rows:
        return []
    keys = rows[0].keys()
    postgres = conn.dialect.name == "postgresql"
    uniform = "id" not in keys and all(r.keys() == keys for r in rows)
    if uniform and conn.dialect.name == "sqlite":
        return await _insert_many_sqlite(conn, rows)
    if not postgres or not uniform:
        stored = (await conn.execute(insert_one_statement(conn.dialect.name), list(rows))).all()
        if stored and postgres and notify_channel:
            await conn.execute(sa.select(sa.func.pg_notify(notify_channel, "")))
        return [(int(r.id), str(r.uuid)) for r in stored]
    varying, shared, values = _split_columns(tuple(keys), rows)
    if notify_channel:
        values.append(notify_channel)
    statement = _unnest_insert(tuple(varying), tuple(shared), bool(notify_channel))
    result = await conn.exec_driver_sql(statement, tuple(values))
    return [(r.id, r.uuid) for r in result]  # already int and str (uuid::text)


#: SQLite's limit on bound parameters per statement (SQLITE_MAX_VARIABLE_NUMBER since 3.32).
_SQLITE_MAX_PARAMS = 32766


def rows_per_statement(dialect: str) -> int:
    """How many task rows :func:`insert_many` can always send in one statement (SQLite's parameter limit)."""
    return _SQLITE_MAX_PARAMS // len(tasks.columns) if dialect == "sqlite" else 1_000_000


@functools.lru_cache(maxsize=64)  # keyed by row count too: a few sizes recur (1, a full page, …)
def _sqlite_insert(columns: tuple[str, ...], count: int) -> str:
    names = ", ".join(f'"{name}"' for name in columns)
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return (
        f"INSERT INTO tasks ({names}) VALUES {', '.join([one] * count)} "
        f"ON CONFLICT (business_pk, business_id) WHERE {LIVE_SQL} DO NOTHING RETURNING id, uuid"
    )


async def _insert_many_sqlite(
    conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]
) -> list[tuple[int, str]]:
    """SQLite: the multi-row INSERT sent straight to the driver, one call per page of rows.

    Through SQLAlchemy each statement costs four hops to the driver's thread (cursor, execute, fetch, close),
    which at a few creates per transaction were most of a create's CPU; aiosqlite's ``execute_fetchall`` is
    one. Values pass through the columns' own bind processors, so what is stored is what SQLAlchemy stores
    (the test suite compares the two).
    """
    dialect = conn.dialect
    columns = tuple(rows[0].keys())
    processors = [tasks.c[name].type._cached_bind_processor(dialect) for name in columns]
    uuid_bind = tasks.c.uuid.type._cached_bind_processor(dialect)
    stored_as = {uuid_bind(r["uuid"]) if uuid_bind else r["uuid"]: r["uuid"] for r in rows}
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    per_page = max(1, _SQLITE_MAX_PARAMS // len(columns))
    out: list[tuple[int, str]] = []
    for start in range(0, len(rows), per_page):
        page = rows[start : start + per_page]
        params: list[Any] = []
        for row in page:
            for name, process in zip(columns, processors, strict=True):
                value = row[name]
                params.append(process(value) if process is not None else value)
        try:
            # Outside a transaction (the create path's autocommit) the INSERT takes the write lock itself.
            stored = await driver._execute(
                _fetch_locked, driver._conn, _sqlite_insert(columns, len(page)), params
            )
        except sqlite3.Error as exc:  # what Database.write() makes of SQLAlchemy's wrapping of it
            raise StorageError(
                f"database error: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
            ) from exc
        out.extend((int(row_id), stored_as[stored_uuid]) for row_id, stored_uuid in stored)
    return out


def _fetch_locked(connection: sqlite3.Connection, sql: str, params: list[Any]) -> list[Any]:
    """The statement's rows; outside a transaction, waiting for the write lock as BEGIN IMMEDIATE does."""
    if connection.in_transaction:  # the lock is held already (Database.write)
        return connection.execute(sql, params).fetchall()
    return sqlite_locked(lambda: connection.execute(sql, params).fetchall())


def insert_row(conn: sa.Connection, row: dict[str, Any], *, notify_channel: str | None = None) -> int:
    """Insert one prepared task row on a *sync* connection (async callers use ``run_sync``); returns its id.

    One implementation for every create path: the API, the async library, and the sync library inside the
    caller's own transaction (outbox). Raises :class:`DuplicateTask` if ``business_id`` is live already; the
    transaction stays usable because the conflict is skipped, not raised by the database.
    """
    dialect = conn.dialect.name
    try:
        inserted = conn.execute(insert_one_statement(dialect), row).first()
    except SQLAlchemyError as exc:  # the caller's own connection: its errors are ours to explain, not to leak
        text = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        raise StorageError(
            f"storing the task on the connection given failed: {text} (it must reach taskcenter's own "
            "database, migrated: `taskcenter migrate`)"
        ) from exc
    if inserted is None:
        existing = conn.execute(
            sa.select(tasks.c.uuid).where(
                tasks.c.business_pk == row["business_pk"], tasks.c.business_id == row["business_id"], _LIVE
            )
        ).scalar()
        raise DuplicateTask(
            f"business_id {row['business_id']!r} already has a live task {existing}",
            existing_id=str(existing) if existing else None,
        )
    if notify_channel and dialect == "postgresql":
        # Delivered at commit, so a rolled-back outbox insert wakes nobody.
        conn.execute(sa.select(sa.func.pg_notify(notify_channel, "")))
    return int(inserted.id)


async def live_task_uuid(conn: AsyncConnection, business_pk: int, business_id: str) -> str | None:
    """The UUID of the live task holding ``business_id`` in this business, if any."""
    return (
        await conn.execute(
            sa.select(tasks.c.uuid).where(
                tasks.c.business_pk == business_pk, tasks.c.business_id == business_id, _LIVE
            )
        )
    ).scalar()


async def count_live(conn: AsyncConnection, business_pk: int) -> int:
    """How many live (pending, processing, retrying) tasks a business has."""
    return int(
        (
            await conn.execute(
                sa.select(sa.func.count()).select_from(tasks).where(tasks.c.business_pk == business_pk, _LIVE)
            )
        ).scalar_one()
    )


def _select_task() -> sa.Select[Any]:
    return sa.select(tasks, businesses.c.code.label("business_code")).join(
        businesses, businesses.c.id == tasks.c.business_pk
    )


async def get(
    conn: AsyncConnection,
    *,
    uuid: str | None = None,
    row_id: int | None = None,
    business_pk: int | None = None,
) -> sa.RowMapping | None:
    """One task by UUID or numeric id, optionally only within one business."""
    stmt = _select_task()
    if uuid is not None:
        stmt = stmt.where(tasks.c.uuid == uuid)
    elif row_id is not None:
        stmt = stmt.where(tasks.c.id == row_id)
    else:
        raise ValueError("give uuid or row_id")
    if business_pk is not None:
        stmt = stmt.where(tasks.c.business_pk == business_pk)
    row: sa.RowMapping | None = (await conn.execute(stmt)).mappings().first()
    return row


async def get_by_business_id(
    conn: AsyncConnection, business_pk: int, business_id: str
) -> sa.RowMapping | None:
    """The task with this ``business_id``: the live one if any, else the newest."""
    stmt = (
        _select_task()
        .where(tasks.c.business_pk == business_pk, tasks.c.business_id == business_id)
        .order_by(sa.case((_LIVE_Q, 0), else_=1), tasks.c.id.desc())
        .limit(1)
    )
    row: sa.RowMapping | None = (await conn.execute(stmt)).mappings().first()
    return row


async def list_tasks(
    conn: AsyncConnection,
    *,
    business_pk: int | None = None,
    status: Sequence[str] | None = None,
    host: str | None = None,
    any_port: bool = False,
    business_id: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[sa.RowMapping]:
    """Newest first by row id; ``before_id`` is the keyset cursor, stable under concurrent inserts.

    ``host`` is a ``host:port`` matched exactly, or with ``any_port`` a host name matched on every port.
    """
    stmt = _select_task()
    if business_pk is not None:
        stmt = stmt.where(tasks.c.business_pk == business_pk)
    if status:
        stmt = stmt.where(tasks.c.status.in_(list(status)))
    if host and any_port:
        # http tasks only: a processor task's "processor:<type>" is no port of a host named "processor".
        stmt = stmt.where(tasks.c.host.startswith(f"{host}:", autoescape=True), tasks.c.type == "http")
    elif host:
        stmt = stmt.where(tasks.c.host == host)
    if business_id:
        stmt = stmt.where(tasks.c.business_id == business_id)
    if created_after:
        stmt = stmt.where(tasks.c.created_at >= created_after)
    if created_before:
        stmt = stmt.where(tasks.c.created_at < created_before)
    if before_id is not None:
        stmt = stmt.where(tasks.c.id < before_id)
    stmt = stmt.order_by(tasks.c.id.desc()).limit(limit)
    return list((await conn.execute(stmt)).mappings().all())


async def list_attempts(conn: AsyncConnection, task_id: int) -> list[sa.RowMapping]:
    """A task's attempts, oldest first."""
    stmt = sa.select(attempts).where(attempts.c.task_id == task_id).order_by(attempts.c.number, attempts.c.id)
    return list((await conn.execute(stmt)).mappings().all())


async def change(
    conn: AsyncConnection, task_id: int, *, expected: Sequence[str], values: Mapping[str, Any]
) -> bool:
    """Compare-and-set: apply ``values`` only if the task's status is still one of ``expected``."""
    result = await conn.execute(
        sa.update(tasks).where(tasks.c.id == task_id, tasks.c.status.in_(list(expected))).values(**values)
    )
    return bool(result.rowcount)


_FINISHED = sa.text("status IN ('succeeded', 'failed', 'cancelled')")

#: What a notification needs of its task (see ``TaskService.enqueue_notifications``).
_NOTIFY_COLUMNS = (
    "id, uuid, business_pk, business_id, type, method, url, status, attempts, max_attempts, outcome, notify, "
    "last_response, last_error"
)


async def unnotified(
    conn: AsyncConnection, *, finished_before: datetime, limit: int = 100, lock: bool = True
) -> list[Any]:
    """Finished tasks with a ``notify`` whose notifications were never queued (``notified_at`` is NULL), that
    finished before ``finished_before``: the process that wrote their final state died before it queued them.

    Served by the small partial index ``ix_tasks_unnotified``; on PostgreSQL, with ``lock``, the rows are locked
    (skipping rows another sweeper holds) until ``conn``'s transaction ends, in which the caller queues and marks
    them.
    """
    if conn.dialect.name == "postgresql":
        sql = (
            f"SELECT {_NOTIFY_COLUMNS} FROM tasks WHERE {UNNOTIFIED_PG_SQL} AND finished_at < :before "
            "ORDER BY finished_at LIMIT :limit" + (" FOR UPDATE SKIP LOCKED" if lock else "")
        )
    else:
        sql = (
            f"SELECT {_NOTIFY_COLUMNS} FROM tasks INDEXED BY ix_tasks_unnotified "
            f"WHERE {UNNOTIFIED_SQL} AND finished_at < :before ORDER BY finished_at LIMIT :limit"
        )
    columns = {c.name: c for c in tasks.columns}
    stmt = (
        sa.text(sql)
        .bindparams(sa.bindparam("before", type_=tasks.c.finished_at.type))
        .columns(*(columns[n.strip()] for n in _NOTIFY_COLUMNS.split(",")))
    )
    result = await conn.execute(stmt, {"before": finished_before, "limit": limit})
    return [dict(row) for row in result.mappings()]


async def mark_notified(conn: AsyncConnection, ids: Sequence[int], *, now: datetime) -> None:
    """Record that the notifications of these finished tasks are queued (in the transaction that queues them)."""
    if ids:
        await conn.execute(
            sa.update(tasks).where(tasks.c.id.in_(sorted(set(ids))), _FINISHED).values(notified_at=now)
        )


async def purge_finished(conn: AsyncConnection, *, before: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` finished tasks that finished before ``before`` (their attempts go with them)."""
    victims = (
        sa.select(tasks.c.id)
        .where(_FINISHED, tasks.c.finished_at < before)
        .order_by(tasks.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = await conn.execute(sa.delete(tasks).where(tasks.c.id.in_(victims)))
    return int(result.rowcount or 0)


async def count_finished(conn: AsyncConnection, *, before: datetime) -> int:
    return int(
        (
            await conn.execute(
                sa.select(sa.func.count()).select_from(tasks).where(_FINISHED, tasks.c.finished_at < before)
            )
        ).scalar_one()
    )
