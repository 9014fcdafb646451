"""The queue's SQL: claim due tasks under a lease, on SQLite together with the write of the waiting results
(``results``); the rest of a lease's life — heartbeat, give-back, rescue — is in ``leases``.

Every write that follows a claim is guarded by ``lease_owner = :worker`` so a late write never overwrites a task
that another worker now holds (compare-and-set; the loser's row count is simply zero).
"""

from __future__ import annotations

import functools
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.storage.database import Database, sqlite_batch, sqlite_driver, sqlite_time
from taskcenter.storage.leases import put_back
from taskcenter.storage.results import (
    Finished,
    Written,
    as_written,
    finish,
    prepare_sqlite,
    sqlite_breakers,
    sqlite_write,
    to_written,
)
from taskcenter.storage.schema import (
    HTTP_DUE_SQL,
    NEXT_DUE_SQL,
    PROCESSOR_DUE_SQL,
    PROCESSOR_NEXT_DUE_SQL,
    tasks,
)

if TYPE_CHECKING:
    from taskcenter.storage.traffic import TrafficControl

# Literal predicates (not bound parameters) so PostgreSQL's generic plans can still use the partial indexes.
_DUE = sa.text(HTTP_DUE_SQL)
_PROCESSOR_DUE = sa.text(PROCESSOR_DUE_SQL)

CLAIM_COLUMNS = (
    tasks.c.id,
    tasks.c.uuid,
    tasks.c.business_pk,
    tasks.c.business_id,
    tasks.c.type,
    tasks.c.method,
    tasks.c.url,
    tasks.c.host,
    tasks.c.headers,
    tasks.c.body,
    tasks.c.content_type,
    tasks.c.payload,
    tasks.c.retry,
    tasks.c.attempts,
    tasks.c.max_attempts,
    tasks.c.timeout,
    tasks.c.priority,
    tasks.c.success_codes,
    tasks.c.retry_on,
    tasks.c.follow_redirects,
    tasks.c.notify,
    tasks.c.traceparent,
    tasks.c.next_attempt_at,
)


_NOW = sa.bindparam("b_now", type_=tasks.c.next_attempt_at.type)
_LIMIT = sa.bindparam("b_limit", type_=sa.Integer)


def _due_ids(businesses: Sequence[int], types: Sequence[str] = ()) -> sa.Select[Any]:
    """The ids to claim (a SELECT of one column, ``id``): with known businesses, round-robin across them
    (fairness), else one global order.

    The time and the batch size are bound parameters (``b_now``, ``b_limit``), so the statement is built once
    per list of businesses and of processor types (see :func:`_claim_statement`), not once per claim.

    Each business contributes its own first ``limit`` due tasks (its own priority, then due-time order), and the
    batch takes the first of every business, then the second of every business, and so on — so a business's
    backlog can delay another business's due tasks by at most one batch. Businesses registered after the caller's
    list was read are picked up by the last branch (``business_pk`` above the highest known one), lowest first.

    Every worker claims HTTP tasks; tasks of a processor only a worker that has it registered claims (``types``),
    so the others stay due for such a worker. Each type of processor reads its own part of ``ix_tasks_due_type``
    in the same branches as the HTTP tasks, per business. A worker without processors reads only the HTTP tasks'
    indexes, never stepping over processor tasks it would not claim.
    """
    order = (tasks.c.priority.desc(), tasks.c.next_attempt_at)
    if not businesses and not types:
        return (
            sa.select(tasks.c.id)
            .where(_DUE, tasks.c.next_attempt_at <= _NOW)
            .order_by(*order)
            .limit(_LIMIT)
            .with_for_update(skip_locked=True)
        )
    cols = (tasks.c.id, tasks.c.business_pk, tasks.c.priority, tasks.c.next_attempt_at)
    kinds: list[tuple[Any, ...]] = [(_DUE,)]
    kinds += [
        (_PROCESSOR_DUE, tasks.c.type == sa.bindparam(f"b_type{k}", name, type_=tasks.c.type.type))
        for k, name in enumerate(types)
    ]
    branches = []
    for k, kind in enumerate(kinds):
        branches += [
            sa.select(*cols)
            .where(*kind, tasks.c.business_pk == pk, tasks.c.next_attempt_at <= _NOW)
            .order_by(*order)
            .limit(_LIMIT)
            .with_for_update(skip_locked=True)
            .subquery(f"b{k}_{n}")
            for n, pk in enumerate(businesses)
        ]
        # Ordered by business first, as ix_tasks_due_business is: in any other order PostgreSQL's planner may read
        # this branch (which mostly finds nothing) through ix_tasks_due, filtering out every known business's due
        # task.
        branches.append(
            sa.select(*cols)
            .where(*kind, tasks.c.business_pk > max(businesses, default=0), tasks.c.next_attempt_at <= _NOW)
            .order_by(tasks.c.business_pk, *order)
            .limit(_LIMIT)
            .with_for_update(skip_locked=True)
            .subquery(f"bnew{k}")
        )
    union = sa.union_all(*(sa.select(b) for b in branches)).subquery("due")
    rank = sa.func.row_number().over(
        partition_by=union.c.business_pk, order_by=(union.c.priority.desc(), union.c.next_attempt_at)
    )
    ranked = sa.select(union.c.id, union.c.priority, union.c.next_attempt_at, rank.label("rn")).subquery(
        "ranked"
    )
    return (
        sa.select(ranked.c.id)
        .order_by(ranked.c.rn, ranked.c.priority.desc(), ranked.c.next_attempt_at)
        .limit(_LIMIT)
    )


Admission = Callable[
    [AsyncConnection, Sequence[Mapping[Any, Any]], datetime],
    Awaitable[tuple[list[Mapping[Any, Any]], list[tuple[int, datetime]]]],
]


@functools.lru_cache(maxsize=16)
def _claim_statement(businesses: tuple[int, ...], types: tuple[str, ...]) -> Any:
    """The claim for these businesses and processor types, built (and compiled by SQLAlchemy's cache) once, not
    per claim."""
    return (
        sa.update(tasks)
        .where(tasks.c.id.in_(_due_ids(businesses, types).scalar_subquery()))
        .values(
            status="processing",
            lease_owner=sa.bindparam("b_worker"),
            lease_expires_at=sa.bindparam("b_until", type_=tasks.c.lease_expires_at.type),
            updated_at=_NOW,
            held_by=None,
        )
        .returning(*CLAIM_COLUMNS)
    )


@functools.lru_cache(maxsize=16)
def _sqlite_due_sql(
    dialect: Dialect, businesses: tuple[int, ...], types: tuple[str, ...] = ()
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """SQLite: the ids to claim as one JSON array (one row, one statement step), the order of its parameters and
    the values of those it fixes itself (the businesses, the processor types)."""
    due = _due_ids(businesses, types).subquery("due")
    compiled = sa.select(sa.func.json_group_array(due.c.id)).compile(dialect=dialect)
    per_business = bool(businesses or types)
    sql = _sqlite_due_index(
        str(compiled),
        branches=len(businesses) + 1 if per_business else 1,
        per_business=per_business,
        types=len(types),
    )
    return sql, tuple(compiled.positiontup or ()), dict(compiled.params)


# SQLite's claim after its ids are chosen: lease them, then read them back as one JSON array of rows (JSON columns
# inline), so the batch crosses from the driver's thread as one value instead of a RETURNING step per row.
_SQLITE_LEASE = """UPDATE tasks NOT INDEXED SET status = 'processing', lease_owner = ?2, lease_expires_at = ?3,
    updated_at = ?4, held_by = NULL
WHERE id IN (SELECT value FROM json_each(?1))"""
_SQLITE_CLAIMED = """SELECT json_group_array(json_array({})) FROM tasks NOT INDEXED
WHERE id IN (SELECT value FROM json_each(?1))"""


@functools.lru_cache(maxsize=32)
def _claim_sql(
    dialect: Dialect, businesses: tuple[int, ...], types: tuple[str, ...] = ()
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """PostgreSQL: the claim's SQL text for the driver, the order of its parameters and the values of those it fixes
    itself (the new status, ...), compiled once per list of businesses (SQLite's claim: ``_sqlite_due_sql``).

    The claim runs on the driver directly: through SQLAlchemy, building each of a batch's rows cost more CPU than
    the claim itself. Its rows come back as one JSON array of arrays (``_PG_CLAIMED``), as SQLite's do: decoding
    23 columns a row, six of them through the JSON codec one by one, cost the worker 4.7-6.7 us a row, one
    ``orjson.loads`` of the batch 1.6 (400-row batches, raw asyncpg; PostgreSQL's own time +0.3 ms a batch).
    """
    compiled = _claim_statement(businesses, types).compile(dialect=dialect)
    return _PG_CLAIMED.format(compiled), tuple(compiled.positiontup or ()), dict(compiled.params)


#: Where each branch of the claim reads the due tasks, as SQLAlchemy compiles it for SQLite: HTTP tasks, and
#: tasks of one processor type.
_SQLITE_DUE_FROM = f"FROM tasks \nWHERE {HTTP_DUE_SQL}"
_SQLITE_TYPE_DUE_FROM = f"FROM tasks \nWHERE {PROCESSOR_DUE_SQL}"


def _sqlite_due_index(sql: str, *, branches: int, per_business: bool, types: int = 0) -> str:
    """Name the partial due index each branch of the claim must read (``INDEXED BY``; SQLAlchemy has no SQLite
    table hints). ``branches`` per kind of task read: HTTP, then each of ``types`` processor types.

    Without statistics (nothing here runs ANALYZE) SQLite's planner read these branches through ix_tasks_status
    instead: every pending task, sorted, in every claim — even the branch for businesses registered since, which
    finds none. The claim's cost grew with the backlog: 62-69 -> 29-30 us of SQLite time per claimed task with 20,000
    due (raw SQL, A/B). PostgreSQL's planner picks these indexes by itself.
    """
    index = "ix_tasks_due_business" if per_business else "ix_tasks_due"
    if sql.count(_SQLITE_DUE_FROM) != branches or sql.count(_SQLITE_TYPE_DUE_FROM) != branches * types:
        raise AssertionError(
            f"the claim's SQL changed shape: expected {branches} reads of due tasks per kind"
        )
    sql = sql.replace(_SQLITE_DUE_FROM, f"FROM tasks INDEXED BY {index} \nWHERE {HTTP_DUE_SQL}")
    return sql.replace(
        _SQLITE_TYPE_DUE_FROM, f"FROM tasks INDEXED BY ix_tasks_due_type \nWHERE {PROCESSOR_DUE_SQL}"
    )


_CLAIM_KEYS = tuple(c.name for c in CLAIM_COLUMNS)
_PG_CLAIMED = (
    "WITH claimed AS ({}) SELECT coalesce(json_agg(json_build_array("
    + ", ".join(_CLAIM_KEYS)
    + ")), '[]')::text FROM claimed"
)
_SQLITE_JSON = frozenset(i for i, c in enumerate(CLAIM_COLUMNS) if isinstance(c.type, sa.JSON))
_SQLITE_CLAIMED_ROWS = _SQLITE_CLAIMED.format(
    ", ".join(f"json({c.name})" if i in _SQLITE_JSON else c.name for i, c in enumerate(CLAIM_COLUMNS))
)
_I_UUID = _CLAIM_KEYS.index("uuid")
_I_REDIRECTS = _CLAIM_KEYS.index("follow_redirects")
_I_DUE = _CLAIM_KEYS.index("next_attempt_at")
_I_TIMEOUT = _CLAIM_KEYS.index("timeout")


def _sqlite_claimed(values: list[Any]) -> dict[str, Any]:
    """A row of ``_SQLITE_CLAIMED_ROWS`` (JSON columns parsed already), valued as SQLAlchemy's types would be."""
    hex_ = values[_I_UUID]
    values[_I_UUID] = f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"
    values[_I_REDIRECTS] = bool(values[_I_REDIRECTS])
    values[_I_DUE] = datetime.fromisoformat(values[_I_DUE]).replace(tzinfo=UTC)
    return dict(zip(_CLAIM_KEYS, values, strict=True))


def _claim_sqlite(
    due_sql: str,
    due_values: list[Any],
    lease: tuple[str, str | None, str | None],
    commit: bool,
    commit_if_none: bool = True,
) -> Callable[[sqlite3.Connection], str | None]:
    """The claim's statements, for one hop to the driver's thread: the ids, their lease, the rows as JSON.

    Commits when asked, and (unless ``commit_if_none`` is false) when nothing was claimed, as then nothing follows.
    """

    def work(connection: sqlite3.Connection) -> str | None:
        (ids,) = connection.execute(due_sql, due_values).fetchone()
        claimed = None
        if ids != "[]":
            connection.execute(_SQLITE_LEASE, (ids, *lease))
            (claimed,) = connection.execute(_SQLITE_CLAIMED_ROWS, (ids,)).fetchone()
        if commit or (claimed is None and commit_if_none):
            connection.commit()
        return claimed

    return work


def _sqlite_claim_work(
    conn: AsyncConnection,
    worker: str,
    now: datetime,
    limit: int,
    lease_s: float,
    businesses: Sequence[int],
    types: tuple[str, ...],
    *,
    commit: bool,
    commit_if_none: bool = True,
) -> Callable[[sqlite3.Connection], str | None]:
    due_sql, names, fixed = _sqlite_due_sql(conn.dialect, tuple(sorted(businesses)), types)
    bound = {**fixed, "b_now": sqlite_time(now), "b_limit": limit}
    lease = (worker, sqlite_time(now + timedelta(seconds=lease_s)), sqlite_time(now))
    return _claim_sqlite(due_sql, [bound[n] for n in names], lease, commit, commit_if_none)


def _sqlite_rows(claimed: str | None) -> list[Mapping[Any, Any]]:
    return [_sqlite_claimed(r) for r in orjson.loads(claimed)] if claimed is not None else []


def _postgres_rows(claimed: str) -> list[Mapping[Any, Any]]:
    """The rows of ``_PG_CLAIMED``'s JSON, valued as SQLAlchemy's types would read them."""
    rows: list[Mapping[Any, Any]] = []
    for values in orjson.loads(claimed):
        # JSON writes a float8 of 10.0 as 10, and the time with the session's offset.
        values[_I_TIMEOUT] = float(values[_I_TIMEOUT])
        values[_I_DUE] = datetime.fromisoformat(values[_I_DUE]).astimezone(UTC)
        rows.append(dict(zip(_CLAIM_KEYS, values, strict=True)))
    return rows


async def claim(
    db: Database,
    *,
    worker: str,
    now: datetime,
    limit: int,
    lease_s: float,
    businesses: Sequence[int] = (),
    types: Sequence[str] = (),
    admission: Admission | None = None,
) -> list[Mapping[Any, Any]]:
    """Claim up to ``limit`` due tasks, then let ``admission`` hold some back, in one transaction.

    The tasks are HTTP tasks and tasks of the processor ``types`` (the processors registered in the worker);
    tasks of other types stay due for a worker that has their processor.

    PostgreSQL claims in one statement and skips rows other workers are claiming (``FOR UPDATE SKIP LOCKED``).
    SQLite has one writer: its claim chooses the ids, leases them and reads them back, in one hop to its thread.
    Held-back tasks are put straight back with a later due time: no attempt charged, no slot occupied.
    Each row is a dict of the ``CLAIM_COLUMNS``, valued as SQLAlchemy's column types read them.
    """
    async with db.write(begin=False) as conn:
        rows: list[Mapping[Any, Any]]
        if db.is_postgres:
            until = now + timedelta(seconds=lease_s)
            sql, names, fixed = _claim_sql(conn.dialect, tuple(sorted(businesses)), tuple(sorted(types)))
            params = {**fixed, "b_now": now, "b_limit": limit, "b_worker": worker, "b_until": until}
            # Through the connection (not the bare driver) so that SQLAlchemy's transaction has begun on it.
            result = await conn.exec_driver_sql(sql, tuple(params[n] for n in names))
            rows = _postgres_rows(result.scalar_one())
        else:
            # One hop: BEGIN IMMEDIATE and the claim's three statements (and the COMMIT, unless admission follows).
            work = _sqlite_claim_work(
                conn, worker, now, limit, lease_s, businesses, tuple(sorted(types)), commit=admission is None
            )
            rows = _sqlite_rows(await sqlite_batch(conn, work, begin=True))
        rows = await _admit(conn, worker, now, rows, admission)
    return _in_claim_order(rows)


async def _admit(
    conn: AsyncConnection,
    worker: str,
    now: datetime,
    rows: list[Mapping[Any, Any]],
    admission: Admission | None,
) -> list[Mapping[Any, Any]]:
    """Let ``admission`` hold back some of a claimed batch, in the claim's transaction; put those back."""
    if admission is None or not rows:
        return rows
    rows, deferred = await admission(conn, rows, now)
    if deferred:
        await put_back(conn, worker, now, deferred)
    return rows


def _in_claim_order(rows: Sequence[Mapping[Any, Any]]) -> list[Mapping[Any, Any]]:
    """RETURNING has no order: put the batch back in the claim's own, which the dispatcher starts it in.

    That is the fair order of :func:`_due_ids`: each business's first task (by priority, then due time), then
    each business's second, and so on — so another business's tasks in a batch mostly of one backlog are not
    started after all of that backlog's.
    """
    ordered = sorted(rows, key=lambda r: (-r["priority"], r["next_attempt_at"]))
    seen: Counter[int] = Counter()
    rank = []
    for r in ordered:
        seen[r["business_pk"]] += 1
        rank.append(seen[r["business_pk"]])
    return [r for _, r in sorted(zip(rank, ordered, strict=True), key=lambda pair: pair[0])]


#: SQLite, as for the claim (see _sqlite_due_index): without the hint the planner counted every pending task through
#: ix_tasks_status (15 ms with 20,000 due), with it min() is one step into the due-time index (0.015 ms).
SQLITE_NEXT_DUE = f"SELECT min(next_attempt_at) FROM tasks INDEXED BY ix_tasks_due_time WHERE {NEXT_DUE_SQL}"
_NEXT_DUE_ARM = "SELECT min(next_attempt_at) AS due FROM tasks{} WHERE {}"


@functools.lru_cache(maxsize=16)
def next_due_sql(types: tuple[str, ...], *, sqlite: bool) -> str:
    """When the next HTTP task or task of one of ``types`` falls due: one index step per kind of task (on SQLite
    through the index named, as for the claim).

    The types' names are parameters (``?`` on SQLite, ``:t0``, ``:t1``… for SQLAlchemy's ``text``).
    """
    if not types:
        return SQLITE_NEXT_DUE if sqlite else f"SELECT min(next_attempt_at) FROM tasks WHERE {NEXT_DUE_SQL}"
    arms = [_NEXT_DUE_ARM.format(" INDEXED BY ix_tasks_due_time" if sqlite else "", NEXT_DUE_SQL)]
    arms += [
        _NEXT_DUE_ARM.format(
            " INDEXED BY ix_tasks_due_type_time" if sqlite else "",
            f"{PROCESSOR_NEXT_DUE_SQL} AND type = {'?' if sqlite else f':t{k}'}",
        )
        for k in range(len(types))
    ]
    return "SELECT min(due) FROM (" + " UNION ALL ".join(arms) + ") AS d"


async def next_due(db: Database, types: Sequence[str] = ()) -> datetime | None:
    """When the earliest waiting task this worker would claim falls due (``None`` if none waits): an HTTP task or
    a task of one of the processor ``types``. Tasks of other types never wake it (it would not claim them)."""
    names = tuple(sorted(types))
    async with db.read() as conn:
        if not db.is_postgres:
            # To the driver: one hop, no transaction (through SQLAlchemy: BEGIN, four hops for the statement and
            # a ROLLBACK; the claim loop asks this after every claim that came back short).
            rows = await (await sqlite_driver(conn)).execute_fetchall(next_due_sql(names, sqlite=True), names)
            text: str | None = rows[0][0] if rows else None
            return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)
        params = {f"t{k}": name for k, name in enumerate(names)}
        value: datetime | None = (
            await conn.execute(sa.text(next_due_sql(names, sqlite=False)), params)
        ).scalar()
    if value is None:
        return None
    # min() loses the column type on some dialects; normalise through the column's type.
    return tasks.c.next_attempt_at.type.process_result_value(value, db.write_engine.dialect)  # type: ignore[no-any-return,attr-defined]


async def finish_and_claim(
    db: Database,
    *,
    worker: str,
    now: datetime,
    results: Sequence[Finished],
    limit: int,
    lease_s: float,
    businesses: Sequence[int] = (),
    types: Sequence[str] = (),
    admission: Admission | None = None,
    breakers: TrafficControl | None = None,
) -> tuple[Written, list[Mapping[Any, Any]]]:
    """:func:`finish` ``results``, then :func:`claim` up to ``limit`` due tasks: on SQLite in one transaction.

    SQLite has one writer, and the claims and the finishes of a busy dispatcher took turns at it, each waiting for
    the other: every hop to the driver's thread, BEGIN and COMMIT, and taking and returning the connection cost
    milliseconds of a busy event loop apiece. Here the finish's three statements and the claim's three go to the
    driver's thread in one hop, with one BEGIN IMMEDIATE (and the COMMIT too when neither the breakers nor
    admission has anything to add). The results land first, so the claim sees them (a result due again at once
    can be claimed back). On PostgreSQL, where each is already one statement: the two calls one after the other.
    """
    if db.is_postgres or not results:
        written = await finish(db, worker=worker, now=now, results=results, breakers=breakers)
        taken = await claim(
            db,
            worker=worker,
            now=now,
            limit=limit,
            lease_s=lease_s,
            businesses=businesses,
            types=types,
            admission=admission,
        )
        return written, taken
    batch, every, record = prepare_sqlite(results, breakers)
    async with db.write(begin=False) as conn:
        write = sqlite_write(batch, worker, sqlite_time(now), commit=False)
        take = _sqlite_claim_work(
            conn, worker, now, limit, lease_s, businesses, tuple(sorted(types)),
            commit=admission is None and not record, commit_if_none=not record,
        )  # fmt: skip

        def work(connection: sqlite3.Connection) -> tuple[tuple[list[list[Any]], str], str | None]:
            written = write(connection)
            return written, take(connection)

        (held, cancelled), claimed = await sqlite_batch(conn, work, begin=True)
        landed = as_written(held)
        circuits, outcomes = await sqlite_breakers(conn, breakers, results, landed, every, record, now)
        rows = await _admit(conn, worker, now, _sqlite_rows(claimed), admission)
    return to_written(results, landed, circuits, outcomes, cancelled), _in_claim_order(rows)
