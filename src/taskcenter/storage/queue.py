"""The queue's SQL: claim due tasks under a lease, write results in batches, release, rescue expired leases.

Every write that follows a claim is guarded by ``lease_owner = :worker`` so a late write never overwrites a task
that another worker now holds (compare-and-set; the loser's row count is simply zero).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.storage.database import Database, json_text, sqlite_driver, sqlite_time
from taskcenter.storage.schema import DUE_SQL, NEXT_DUE_SQL, attempts, tasks

# Literal predicates (not bound parameters) so PostgreSQL's generic plans can still use the partial indexes.
_DUE = sa.text(DUE_SQL)
_LEASED = sa.text("lease_owner IS NOT NULL")
#: The attempt being rescued was the last one the task's budget allows.
_EXHAUSTED = tasks.c.attempts + 1 >= tasks.c.max_attempts

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


@dataclass(frozen=True, slots=True)
class Finished:
    """The outcome of one attempt, ready to be written."""

    task_id: int
    attempt: int
    status: str
    outcome: str
    started_at: datetime
    duration_ms: int | None
    next_attempt_at: datetime | None
    finished_at: datetime | None
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    error: str | None
    result: Any = None
    host: str | None = None
    pause_until: float | None = None
    """Epoch seconds until which the receiver asked the whole host to wait (``Retry-After``)."""


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch write did: tasks whose write landed (with their final status) and tasks no longer held."""

    landed: list[tuple[int, str]]
    lost: list[int]


_NOW = sa.bindparam("b_now", type_=tasks.c.next_attempt_at.type)
_LIMIT = sa.bindparam("b_limit", type_=sa.Integer)


def _due_ids(businesses: Sequence[int]) -> Any:
    """The ids to claim: with known businesses, round-robin across them (fairness), else one global order.

    The time and the batch size are bound parameters (``b_now``, ``b_limit``), so the statement is built once
    per list of businesses (see :func:`_claim_statement`), not once per claim.

    Each business contributes its own first ``limit`` due tasks (its own priority, then due-time order), and the
    batch takes the first of every business, then the second of every business, and so on — so a business's
    backlog can delay another business's due tasks by at most one batch. Businesses registered after the caller's
    list was read are picked up by the last branch (``business_pk`` above the highest known one), lowest first.
    """
    order = (tasks.c.priority.desc(), tasks.c.next_attempt_at)
    if not businesses:
        return (
            sa.select(tasks.c.id)
            .where(_DUE, tasks.c.next_attempt_at <= _NOW)
            .order_by(*order)
            .limit(_LIMIT)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    cols = (tasks.c.id, tasks.c.business_pk, tasks.c.priority, tasks.c.next_attempt_at)
    branches = [
        sa.select(*cols)
        .where(_DUE, tasks.c.business_pk == pk, tasks.c.next_attempt_at <= _NOW)
        .order_by(*order)
        .limit(_LIMIT)
        .with_for_update(skip_locked=True)
        .subquery(f"b{n}")
        for n, pk in enumerate(businesses)
    ]
    # Ordered by business first, as ix_tasks_due_business is: in any other order PostgreSQL's planner may read this
    # branch (which mostly finds nothing) through ix_tasks_due, filtering out every known business's due task.
    branches.append(
        sa.select(*cols)
        .where(_DUE, tasks.c.business_pk > max(businesses), tasks.c.next_attempt_at <= _NOW)
        .order_by(tasks.c.business_pk, *order)
        .limit(_LIMIT)
        .with_for_update(skip_locked=True)
        .subquery("bnew")
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
        .scalar_subquery()
    )


Admission = Callable[
    [AsyncConnection, Sequence[Mapping[Any, Any]], datetime],
    Awaitable[tuple[list[Mapping[Any, Any]], list[tuple[int, datetime]]]],
]


@functools.lru_cache(maxsize=16)
def _claim_statement(businesses: tuple[int, ...]) -> Any:
    """The claim for this list of businesses, built (and compiled by SQLAlchemy's cache) once, not per claim."""
    return (
        sa.update(tasks)
        .where(tasks.c.id.in_(_due_ids(businesses)))
        .values(
            status="processing",
            lease_owner=sa.bindparam("b_worker"),
            lease_expires_at=sa.bindparam("b_until", type_=tasks.c.lease_expires_at.type),
            updated_at=_NOW,
            held_by=None,
        )
        .returning(*CLAIM_COLUMNS)
    )


@functools.lru_cache(maxsize=32)
def _claim_sql(dialect: Dialect, businesses: tuple[int, ...]) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The claim's SQL text for the driver, the order of its parameters and the values of those it fixes itself
    (the new status, ...), compiled once per list of businesses.

    The claim runs on the driver directly: through SQLAlchemy, building each of a batch's rows (and, on SQLite,
    four hops to the driver's thread per statement instead of one) cost more CPU than the claim itself.
    """
    compiled = _claim_statement(businesses).compile(dialect=dialect)
    sql = str(compiled)
    if dialect.name == "sqlite":
        sql = _sqlite_due_index(
            sql, branches=len(businesses) + 1 if businesses else 1, per_business=bool(businesses)
        )
    return sql, tuple(compiled.positiontup or ()), dict(compiled.params)


#: Where each branch of the claim reads the due tasks, as SQLAlchemy compiles it for SQLite.
_SQLITE_DUE_FROM = f"FROM tasks \nWHERE {DUE_SQL}"


def _sqlite_due_index(sql: str, *, branches: int, per_business: bool) -> str:
    """Name the partial due index each branch of the claim must read (``INDEXED BY``; SQLAlchemy has no SQLite
    table hints).

    Without statistics (nothing here runs ANALYZE) SQLite's planner read these branches through ix_tasks_status
    instead: every pending task, sorted, in every claim — even the branch for businesses registered since, which
    finds none. The claim's cost grew with the backlog: 62-69 -> 29-30 us of SQLite time per claimed task with 20,000
    due (raw SQL, A/B). PostgreSQL's planner picks these indexes by itself.
    """
    index = "ix_tasks_due_business" if per_business else "ix_tasks_due"
    if sql.count(_SQLITE_DUE_FROM) != branches:
        raise AssertionError(f"the claim's SQL changed shape: expected {branches} reads of due tasks")
    return sql.replace(_SQLITE_DUE_FROM, f"FROM tasks INDEXED BY {index} \nWHERE {DUE_SQL}")


_CLAIM_KEYS = tuple(c.name for c in CLAIM_COLUMNS)
_SQLITE_JSON = frozenset(i for i, c in enumerate(CLAIM_COLUMNS) if isinstance(c.type, sa.JSON))
_I_UUID = _CLAIM_KEYS.index("uuid")
_I_REDIRECTS = _CLAIM_KEYS.index("follow_redirects")
_I_DUE = _CLAIM_KEYS.index("next_attempt_at")


def _sqlite_row(values: Sequence[Any]) -> dict[str, Any]:
    """A claimed row as SQLite stores it, turned into the values SQLAlchemy's column types would give."""
    row = list(values)
    for i in _SQLITE_JSON:
        if row[i] is not None:
            row[i] = orjson.loads(row[i])
    hex_ = row[_I_UUID]  # stored as 32 hex digits; read as the canonical text form
    row[_I_UUID] = f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"
    row[_I_REDIRECTS] = bool(row[_I_REDIRECTS])
    row[_I_DUE] = datetime.fromisoformat(row[_I_DUE]).replace(tzinfo=UTC)
    return dict(zip(_CLAIM_KEYS, row, strict=True))


def _postgres_row(values: Sequence[Any]) -> dict[str, Any]:
    """A claimed row as asyncpg decodes it (JSON already parsed), with the uuid as text as SQLAlchemy reads it."""
    row = dict(zip(_CLAIM_KEYS, values, strict=True))
    row["uuid"] = str(row["uuid"])
    return row


async def claim(
    db: Database,
    *,
    worker: str,
    now: datetime,
    limit: int,
    lease_s: float,
    businesses: Sequence[int] = (),
    admission: Admission | None = None,
) -> list[Mapping[Any, Any]]:
    """Claim up to ``limit`` due tasks in one statement, then let ``admission`` hold some back, in one transaction.

    PostgreSQL skips rows other workers are claiming (``FOR UPDATE SKIP LOCKED``); SQLite has one writer.
    Held-back tasks are put straight back with a later due time: no attempt charged, no slot occupied.
    Each row is a dict of the ``CLAIM_COLUMNS``, valued as SQLAlchemy's column types read them.
    """
    async with db.write() as conn:
        sql, names, fixed = _claim_sql(conn.dialect, tuple(sorted(businesses)))
        params = {
            **fixed,
            "b_now": now,
            "b_limit": limit,
            "b_worker": worker,
            "b_until": now + timedelta(seconds=lease_s),
        }
        rows: Sequence[Mapping[Any, Any]]
        if db.is_postgres:
            # Through the connection (not the bare driver) so that SQLAlchemy's transaction has begun on it.
            result = await conn.exec_driver_sql(sql, tuple(params[n] for n in names))
            rows = [_postgres_row(r) for r in result.all()]
        else:
            values = [sqlite_time(v) if isinstance(v, datetime) else v for v in (params[n] for n in names)]
            driver = await sqlite_driver(conn)
            rows = [_sqlite_row(r) for r in await driver.execute_fetchall(sql, values)]
        if admission is not None and rows:
            rows, deferred = await admission(conn, rows, now)
            if deferred:
                await _put_back(conn, worker, now, deferred)
    return _in_claim_order(rows)


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


async def next_due(db: Database) -> datetime | None:
    """When the earliest waiting task falls due (``None`` if none waits)."""
    async with db.read() as conn:
        if not db.is_postgres:
            # To the driver: one hop, no transaction (through SQLAlchemy: BEGIN, four hops for the statement and
            # a ROLLBACK; the claim loop asks this after every claim that came back short).
            rows = await (await sqlite_driver(conn)).execute_fetchall(SQLITE_NEXT_DUE)
            text: str | None = rows[0][0] if rows else None
            return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)
        value: datetime | None = (
            await conn.execute(sa.select(sa.func.min(tasks.c.next_attempt_at)).where(sa.text(NEXT_DUE_SQL)))
        ).scalar()
    if value is None:
        return None
    # min() loses the column type on some dialects; normalise through the column's type.
    return tasks.c.next_attempt_at.type.process_result_value(value, db.write_engine.dialect)  # type: ignore[no-any-return,attr-defined]


async def extend_leases(db: Database, *, worker: str, ids: Iterable[int], until: datetime) -> int:
    """Heartbeat: push the lease of the tasks this worker still holds to ``until``."""
    id_list = list(ids)
    if not id_list:
        return 0
    async with db.write() as conn:
        result = await conn.execute(
            sa.update(tasks)
            .where(tasks.c.id.in_(id_list), tasks.c.lease_owner == worker)
            .values(lease_expires_at=until)
        )
    return int(result.rowcount or 0)


# The result of an attempt, written to the driver directly (see _claim_sql for why). A task cancelled while its
# attempt was in flight keeps status cancelled (and its finish time, due time and result); the attempt is still
# recorded. Only the holder of the lease writes (compare-and-set on lease_owner and status).
_SQLITE_HELD = (
    "SELECT id, status FROM tasks WHERE id IN (SELECT value FROM json_each(?1)) AND lease_owner = ?2"
)
_SQLITE_ATTEMPT = (
    "INSERT INTO attempts (task_id, number, started_at, duration_ms, request, response, outcome, error, worker)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_FINISH = """UPDATE tasks SET
    status = CASE WHEN status = 'processing' THEN ?3 ELSE status END,
    attempts = ?4,
    outcome = ?5,
    next_attempt_at = CASE WHEN status = 'processing' THEN coalesce(?6, next_attempt_at) ELSE next_attempt_at END,
    last_attempt_at = ?7,
    finished_at = CASE WHEN status = 'processing' THEN ?8 ELSE finished_at END,
    last_response = ?9,
    last_error = ?10,
    result = CASE WHEN status = 'processing' THEN ?11 ELSE result END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = ?12
WHERE id = ?1 AND lease_owner = ?2 AND status IN ('processing', 'cancelled')"""

# PostgreSQL: the whole batch in one statement of one array per field — tasks moved, attempts inserted for the
# tasks moved, (id, status as written) returned — so one round trip and one executor start per batch, not two
# per result. JSON travels as text[] cast by the server (the driver's jsonb codec is a Python call per value).
_PG_FINISH = """WITH r (id, attempt, status, outcome, started, duration, next_at, finished, request, response,
        last_response, error, result) AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[], $6::int[],
        $7::timestamptz[], $8::timestamptz[], $9::text[]::jsonb[], $10::text[]::jsonb[], $11::text[]::jsonb[],
        $12::text[], $13::text[]::jsonb[])
), done AS (
    UPDATE tasks AS t SET
        status = CASE WHEN t.status = 'processing' THEN r.status ELSE t.status END,
        attempts = r.attempt,
        outcome = r.outcome,
        next_attempt_at = CASE WHEN t.status = 'processing' THEN coalesce(r.next_at, t.next_attempt_at)
            ELSE t.next_attempt_at END,
        last_attempt_at = r.started,
        finished_at = CASE WHEN t.status = 'processing' THEN r.finished ELSE t.finished_at END,
        last_response = r.last_response,
        last_error = r.error,
        result = CASE WHEN t.status = 'processing' THEN r.result ELSE t.result END,
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = $15
    FROM r
    WHERE t.id = r.id AND t.lease_owner = $14 AND t.status IN ('processing', 'cancelled')
    RETURNING t.id, t.status
), logged AS (
    INSERT INTO attempts (task_id, number, started_at, duration_ms, request, response, outcome, error, worker)
    SELECT r.id, r.attempt, r.started, r.duration, r.request, r.response, r.outcome, r.error, $14
    FROM r JOIN done ON done.id = r.id
)
SELECT id, status FROM done"""


def _last_response(r: Finished) -> dict[str, Any] | None:
    return {**r.response, "duration_ms": r.duration_ms} if r.response is not None else None


async def _finish_postgres(
    conn: AsyncConnection, worker: str, now: datetime, results: Sequence[Finished]
) -> Any:
    params = (
        [r.task_id for r in results],
        [r.attempt for r in results],
        [r.status for r in results],
        [r.outcome for r in results],
        [r.started_at for r in results],
        [r.duration_ms for r in results],
        [r.next_attempt_at for r in results],
        [r.finished_at for r in results],
        [json_text(r.request) for r in results],
        [json_text(r.response) for r in results],
        [json_text(_last_response(r)) for r in results],
        [r.error for r in results],
        [json_text(r.result) for r in results],
        worker,
        now,
    )
    return (await conn.exec_driver_sql(_PG_FINISH, params)).all()


async def _finish_sqlite(
    conn: AsyncConnection, worker: str, now: datetime, results: Sequence[Finished]
) -> Any:
    driver = await sqlite_driver(conn)
    held = dict(
        await driver.execute_fetchall(_SQLITE_HELD, (orjson.dumps([r.task_id for r in results]), worker))
    )
    mine = [r for r in results if r.task_id in held]
    if mine:
        updated_at = sqlite_time(now)
        logged, moved = [], []
        for r in mine:
            started = sqlite_time(r.started_at)
            logged.append(
                (
                    r.task_id,
                    r.attempt,
                    started,
                    r.duration_ms,
                    json_text(r.request),
                    json_text(r.response),
                    r.outcome,
                    r.error,
                    worker,
                )
            )
            moved.append(
                (
                    r.task_id,
                    worker,
                    r.status,
                    r.attempt,
                    r.outcome,
                    sqlite_time(r.next_attempt_at),
                    started,
                    sqlite_time(r.finished_at),
                    json_text(_last_response(r)),
                    r.error,
                    json_text(r.result),
                    updated_at,
                )
            )
        await driver.executemany(_SQLITE_ATTEMPT, logged)
        await driver.executemany(_SQLITE_FINISH, moved)
    # As written: a cancelled task stays cancelled, any other moves to the result's status.
    return [(r.task_id, held[r.task_id] if held[r.task_id] == "cancelled" else r.status) for r in mine]


Recorder = Callable[[AsyncConnection, dict[str, list[str]], dict[str, float], datetime], Awaitable[Any]]


async def finish(
    db: Database, *, worker: str, now: datetime, results: Sequence[Finished], recorder: Recorder | None = None
) -> Written:
    """Write a batch of attempt results atomically: attempts inserted, tasks moved, leases dropped.

    Only results whose task this worker still holds land; the others come back as ``lost``. ``recorder`` folds
    the landed outcomes into the host breakers: in the same transaction on SQLite, right after in one of its own
    on PostgreSQL (where the results are one statement, sent without a transaction around it).
    """
    if not results:
        return Written([], [])
    if db.is_postgres:
        # One statement, so no transaction around it: BEGIN and COMMIT would be two more round trips per batch.
        # The breakers' bookkeeping, when there is any, follows in a transaction of its own (a crash between the
        # two loses a batch's worth of breaker evidence, never a task's state).
        async with db.autocommit() as conn:
            landed = [(int(i), status) for i, status in await _finish_postgres(conn, worker, now, results)]
        if recorder is not None and landed:
            async with db.write() as conn:
                await recorder(conn, *_evidence(results, landed), now)
    else:
        async with db.write() as conn:
            landed = await _finish_sqlite(conn, worker, now, results)
            if recorder is not None and landed:
                await recorder(conn, *_evidence(results, landed), now)
    ids = {i for i, _ in landed}
    order = {r.task_id: n for n, r in enumerate(results)}
    landed.sort(key=lambda pair: order[pair[0]])
    return Written(landed, [r.task_id for r in results if r.task_id not in ids])


def _evidence(
    results: Sequence[Finished], landed: Sequence[tuple[int, str]]
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """The landed results' outcomes and pauses per host, for the breakers."""
    ids = {i for i, _ in landed}
    outcomes: dict[str, list[str]] = {}
    pauses: dict[str, float] = {}
    for r in results:
        if r.host is not None and r.task_id in ids:
            outcomes.setdefault(r.host, []).append(r.outcome)
            if r.pause_until:
                pauses[r.host] = max(pauses.get(r.host, 0.0), r.pause_until)
    return outcomes, pauses


# Deferred or released unsent: back to where it came from, due again at its time, no attempt charged; marked for
# traffic control (``held_by``), so relaxing the host's (or business's) limits pulls it forward again. On the
# driver directly, like the finish: a sick host's tasks are put back like this once per cool-down each.
_SQLITE_RELEASE = """UPDATE tasks SET
    status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'retrying' END,
    next_attempt_at = ?2,
    held_by = host,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = ?4
WHERE id = ?1 AND lease_owner = ?3 AND status = 'processing'"""
_PG_RELEASE = """UPDATE tasks AS t SET
    status = CASE WHEN t.attempts = 0 THEN 'pending' ELSE 'retrying' END,
    next_attempt_at = r.at,
    held_by = t.host,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = $4
FROM unnest($1::bigint[], $2::timestamptz[]) AS r (id, at)
WHERE t.id = r.id AND t.lease_owner = $3 AND t.status = 'processing'"""


async def _put_back(
    conn: AsyncConnection, worker: str, now: datetime, deferrals: Sequence[tuple[int, datetime]]
) -> None:
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(
            _PG_RELEASE, ([i for i, _ in deferrals], [at for _, at in deferrals], worker, now)
        )
        return
    driver = await sqlite_driver(conn)
    updated_at = sqlite_time(now)
    await driver.executemany(
        _SQLITE_RELEASE, [(i, sqlite_time(at), worker, updated_at) for i, at in deferrals]
    )


async def release(
    db: Database, *, worker: str, now: datetime, deferrals: Sequence[tuple[int, datetime]]
) -> None:
    """Give claimed tasks back unsent, each due again at its given time (no attempt is charged)."""
    if not deferrals:
        return
    async with db.write() as conn:
        await _put_back(conn, worker, now, deferrals)
        # A task cancelled while it was held only needs its lease dropped.
        await conn.execute(
            sa.update(tasks)
            .where(tasks.c.id.in_([i for i, _ in deferrals]), tasks.c.lease_owner == worker)
            .values(lease_owner=None, lease_expires_at=None)
        )


async def rescue(db: Database, *, now: datetime, limit: int = 500) -> list[int]:
    """Return tasks whose lease expired to ``retrying``, recording the interrupted attempt. Returns their ids."""
    async with db.write() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    tasks.c.id,
                    tasks.c.status,
                    tasks.c.attempts,
                    tasks.c.lease_owner,
                    tasks.c.method,
                    tasks.c.url,
                )
                .where(_LEASED, tasks.c.lease_expires_at < now)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        if not rows:
            return []
        await conn.execute(
            sa.insert(attempts),
            [
                {
                    "task_id": r.id,
                    "number": r.attempts + 1,
                    "started_at": now,
                    "duration_ms": None,
                    "request": {"method": r.method, "url": r.url} if r.url else None,
                    "response": None,
                    "outcome": "interrupted",
                    "error": f"lease held by {r.lease_owner} expired before the attempt was recorded",
                    "worker": r.lease_owner,
                }
                for r in rows
            ],
        )
        await conn.execute(
            sa.update(tasks)
            .where(tasks.c.id == sa.bindparam("b_id"), tasks.c.lease_owner.is_not(None))
            .values(
                # The interrupted attempt is charged; with the budget spent the task fails rather than being
                # sent once more than max_attempts allows. (SET expressions all read the row before the update.)
                status=sa.case(
                    (sa.and_(tasks.c.status == "processing", _EXHAUSTED), "failed"),
                    (tasks.c.status == "processing", "retrying"),
                    else_=tasks.c.status,
                ),
                finished_at=sa.case(
                    (
                        sa.and_(tasks.c.status == "processing", _EXHAUSTED),
                        sa.bindparam("b_now", type_=tasks.c.finished_at.type),
                    ),
                    else_=tasks.c.finished_at,
                ),
                attempts=tasks.c.attempts + 1,
                outcome="interrupted",
                last_attempt_at=sa.bindparam("b_now", type_=tasks.c.updated_at.type),
                next_attempt_at=sa.bindparam("b_now", type_=tasks.c.updated_at.type),
                lease_owner=None,
                lease_expires_at=None,
                updated_at=sa.bindparam("b_now", type_=tasks.c.updated_at.type),
            ),
            [{"b_id": r.id, "b_now": now} for r in rows],
        )
    return [r.id for r in rows]
