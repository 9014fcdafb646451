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

from taskcenter.storage.database import Database, sqlite_driver, sqlite_time
from taskcenter.storage.schema import CANCELLED_HELD_SQL, attempts, tasks

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


async def put_back(
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
        await put_back(conn, worker, now, deferrals)
        # A task cancelled while it was held only needs its lease dropped.
        await conn.execute(
            sa.update(tasks)
            .where(tasks.c.id.in_([i for i, _ in deferrals]), tasks.c.lease_owner == worker)
            .values(lease_owner=None, lease_expires_at=None)
        )


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
