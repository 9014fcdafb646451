"""Lease upkeep beside the claim and the write of results: the heartbeat, the held tasks that were cancelled,
tasks given back unsent, and the rescue of expired leases (each guarded by ``lease_owner``, like the queue)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.domain.traffic import SEALED_HEADERS_HOLD
from taskcenter.storage.database import Database, sqlite_driver, sqlite_time
from taskcenter.storage.schema import CANCELLED_HELD_SQL, HELD_SQL, attempts, tasks

# A literal predicate (not a bound parameter) so PostgreSQL's generic plans can still use the partial index.
_LEASED = sa.text("lease_owner IS NOT NULL")
#: The attempt being rescued was the last one the task's budget allows.
_EXHAUSTED = tasks.c.attempts + 1 >= tasks.c.max_attempts


_HEARTBEAT_IDS = sa.bindparam("b_ids", type_=postgresql.ARRAY(sa.BigInteger))
#: PostgreSQL's heartbeat: the held tasks' rows that nobody has locked right now, then their leases.
_PG_HEARTBEAT = (
    sa.update(tasks)
    .where(
        tasks.c.id.in_(
            sa.select(tasks.c.id)
            .where(tasks.c.id == sa.any_(_HEARTBEAT_IDS), tasks.c.lease_owner == sa.bindparam("b_worker"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(lease_expires_at=sa.bindparam("b_until", type_=tasks.c.lease_expires_at.type))
)


async def extend_leases(db: Database, *, worker: str, ids: Iterable[int], until: datetime) -> int:
    """Heartbeat: push the lease of the tasks this worker still holds to ``until``; returns how many it pushed.

    On PostgreSQL it skips rows locked at that moment (``FOR UPDATE SKIP LOCKED``). Most are this worker's own
    results being written, which drop the lease anyway; waiting for them deadlocked with that write, which locks
    the same rows in another order — seen in the delivery benchmark, where PostgreSQL broke each cycle after its
    1 s ``deadlock_timeout`` by failing one of the two. A row skipped still has three quarters of its lease left
    for the next heartbeat. (SQLite has one writer: the two never overlap.)
    """
    id_list = list(ids)
    if not id_list:
        return 0
    async with db.write() as conn:
        if db.is_postgres:
            result = await conn.execute(
                _PG_HEARTBEAT, {"b_ids": id_list, "b_worker": worker, "b_until": until}
            )
        else:
            result = await conn.execute(
                sa.update(tasks)
                .where(tasks.c.id.in_(id_list), tasks.c.lease_owner == worker)
                .values(lease_expires_at=until)
            )
    return int(result.rowcount or 0)


#: A worker's held tasks that were cancelled (see ``CANCELLED_HELD_SQL``): one step into a nearly empty index.
SQLITE_CANCELLED_HELD = (
    "SELECT json_group_array(id) FROM tasks INDEXED BY ix_tasks_cancelled_held "
    f"WHERE {CANCELLED_HELD_SQL} AND lease_owner = ?1"
)
_CANCELLED_HELD = sa.select(tasks.c.id).where(
    sa.text(CANCELLED_HELD_SQL),
    tasks.c.lease_owner == sa.bindparam("b_worker", type_=tasks.c.lease_owner.type),
)


async def held_cancelled(db: Database, *, worker: str) -> list[int]:
    """The tasks ``worker`` holds (leased) that were cancelled: in flight, or claimed and not sent yet."""
    async with db.read() as conn:
        if not db.is_postgres:
            rows = await (await sqlite_driver(conn)).execute_fetchall(SQLITE_CANCELLED_HELD, (worker,))
            return [int(i) for i in orjson.loads(rows[0][0])] if rows else []
        return [int(i) for i in (await conn.execute(_CANCELLED_HELD, {"b_worker": worker})).scalars()]


# Deferred or released unsent: back to where it came from, due again at its time, no attempt charged; marked for
# traffic control (``held_by``), so relaxing the host's (or business's) limits pulls it forward again. On the
# driver directly, like the finish: a sick host's tasks are put back like this once per cool-down each. With the
# attempts the task had when claimed, only that claim is given back: a give-back that runs after the lease lapsed,
# the rescue took the task and this same worker claimed it again must leave the new claim alone.
_SQLITE_RELEASE = """UPDATE tasks SET
    status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'retrying' END,
    next_attempt_at = ?2,
    held_by = host,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = ?4
WHERE id = ?1 AND lease_owner = ?3 AND status = 'processing' AND (?5 IS NULL OR attempts = ?5)"""
_PG_RELEASE = """UPDATE tasks AS t SET
    status = CASE WHEN t.attempts = 0 THEN 'pending' ELSE 'retrying' END,
    next_attempt_at = r.at,
    held_by = t.host,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = $4
FROM unnest($1::bigint[], $2::timestamptz[], $5::int[]) AS r (id, at, attempts)
WHERE t.id = r.id AND t.lease_owner = $3 AND t.status = 'processing'
    AND (r.attempts IS NULL OR t.attempts = r.attempts)"""


async def put_back(
    conn: AsyncConnection,
    worker: str,
    now: datetime,
    deferrals: Sequence[tuple[int, datetime]],
    claimed: Mapping[int, int] | None = None,
) -> None:
    """Put claimed tasks back unsent; with ``claimed`` (task id -> its attempts when claimed), only those claims."""
    expected = [claimed.get(i) if claimed is not None else None for i, _ in deferrals]
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(
            _PG_RELEASE, ([i for i, _ in deferrals], [at for _, at in deferrals], worker, now, expected)
        )
        return
    driver = await sqlite_driver(conn)
    updated_at = sqlite_time(now)
    await driver.executemany(
        _SQLITE_RELEASE,
        [(i, sqlite_time(at), worker, updated_at, n) for (i, at), n in zip(deferrals, expected, strict=True)],
    )


async def release(
    db: Database,
    *,
    worker: str,
    now: datetime,
    deferrals: Sequence[tuple[int, datetime]],
    claimed: Mapping[int, int] | None = None,
) -> None:
    """Give claimed tasks back unsent, each due again at its given time (no attempt is charged).

    ``claimed`` (task id -> the attempts it had when claimed) gives back only those claims: a later claim of the
    same task by the same worker (after a rescue) stays as it is.
    """
    if not deferrals:
        return
    async with db.write() as conn:
        await put_back(conn, worker, now, deferrals, claimed)
        await _drop_cancelled(conn, worker, [i for i, _ in deferrals])


async def _drop_cancelled(conn: AsyncConnection, worker: str, ids: list[int]) -> None:
    # A task cancelled while it was held only needs its lease dropped. (Only a cancelled one: a task still
    # processing that the release left alone is another claim of it, whose lease must stay.)
    await conn.execute(
        sa.update(tasks)
        .where(tasks.c.id.in_(ids), tasks.c.lease_owner == worker, tasks.c.status == "cancelled")
        .values(lease_owner=None, lease_expires_at=None)
    )


SEALED_HEADERS = SEALED_HEADERS_HOLD
"""The ``held_by`` of a task given back unsent because TASKCENTER_SECRET_KEY cannot open one of its sealed header
values (see :func:`hold`). Found again by :func:`sealed_held` when a dispatcher starts."""


def sealed_headers_error(names: Sequence[str]) -> str:
    """The ``last_error`` of a task held for its sealed header values ``names`` (names only, never values)."""
    return (
        f"not sent: its sealed header values ({', '.join(names) or 'unknown'}) cannot be decrypted with "
        "TASKCENTER_SECRET_KEY, and the request must not leave without them; held until the key that sealed them "
        "is configured again or the task's headers are replaced"
    )


def put_back_held(*where: sa.ColumnElement[bool]) -> sa.Update:
    """The tasks in ``processing`` that ``where`` picks, given back unsent and held: status back to pending (or
    retrying), due at ``b_until``, ``held_by`` and ``last_error`` from ``b_held`` and ``b_error``, lease dropped.
    Shared by the hold of a task (:func:`hold`) and admission's hold of a business (``storage.holds``)."""
    return (
        sa.update(tasks)
        .where(*where, tasks.c.status == "processing")
        .values(
            status=sa.case((tasks.c.attempts == 0, "pending"), else_="retrying"),
            next_attempt_at=sa.bindparam("b_until", type_=tasks.c.next_attempt_at.type),
            held_by=sa.bindparam("b_held"),
            last_error=sa.bindparam("b_error"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=sa.bindparam("b_now", type_=tasks.c.updated_at.type),
        )
    )


_HOLD = put_back_held(tasks.c.id == sa.bindparam("b_id"), tasks.c.lease_owner == sa.bindparam("b_worker"))


async def hold(
    db: Database, *, worker: str, now: datetime, until: datetime, held_by: str, errors: Mapping[int, str]
) -> None:
    """Give claimed tasks back unsent like :func:`release`, but held: due again at ``until``, marked ``held_by``,
    each with its reason (``errors``, task id to text) in ``last_error``. An exception path: one row per task."""
    if not errors:
        return
    params = [
        {"b_id": i, "b_worker": worker, "b_until": until, "b_held": held_by, "b_error": e, "b_now": now}
        for i, e in errors.items()
    ]
    async with db.write() as conn:
        await conn.execute(_HOLD, params)
        await _drop_cancelled(conn, worker, list(errors))


async def sealed_held(conn: AsyncConnection, *, after: int, limit: int) -> list[tuple[int, dict[str, str]]]:
    """Tasks held for their sealed header values (``SEALED_HEADERS``), ``(id, stored headers)`` by id past
    ``after``: a page to try opening again (read from ``ix_tasks_held``)."""
    stmt = (
        sa.select(tasks.c.id, tasks.c.headers)
        .where(sa.text(HELD_SQL), tasks.c.held_by == SEALED_HEADERS, tasks.c.id > after)
        .order_by(tasks.c.id)
        .limit(limit)
    )
    return [(int(i), dict(h or {})) for i, h in (await conn.execute(stmt)).all()]


async def release_sealed(conn: AsyncConnection, ids: Sequence[int], *, due: datetime) -> int:
    """Bring the tasks ``ids`` held for their sealed header values due at ``due`` (those still held and waiting
    past it, whose own ``scheduled_at`` allows it); returns how many moved."""
    result = await conn.execute(
        sa.update(tasks)
        .where(
            tasks.c.id.in_(list(ids)),
            sa.text(HELD_SQL),
            tasks.c.held_by == SEALED_HEADERS,
            tasks.c.next_attempt_at > due,
            sa.or_(tasks.c.scheduled_at.is_(None), tasks.c.scheduled_at <= due),
        )
        .values(next_attempt_at=due, updated_at=due)
    )
    return int(result.rowcount or 0)


async def failed_by_rescue(db: Database, ids: Sequence[int]) -> list[Mapping[Any, Any]]:
    """Of the tasks :func:`rescue` returned, those it failed (their budget was spent), with what their
    notifications and a ``failed`` event need: ``id``, ``uuid``, ``business_id``, ``business_pk``, ``notify``,
    ``attempts``, ``outcome``, and for an e-mail ``type``, ``method``, ``url``, ``max_attempts``,
    ``last_response``, ``last_error``."""
    if not ids:
        return []
    async with db.read() as conn:
        result = await conn.execute(
            sa.select(
                tasks.c.id, tasks.c.uuid, tasks.c.business_id, tasks.c.business_pk, tasks.c.notify,
                tasks.c.attempts, tasks.c.outcome, tasks.c.type, tasks.c.method, tasks.c.url,
                tasks.c.max_attempts, tasks.c.last_response, tasks.c.last_error,
            ).where(tasks.c.id.in_(ids), tasks.c.status == "failed", tasks.c.outcome == "interrupted")
        )  # fmt: skip
        return [dict(row) for row in result.mappings()]


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
