"""The queue's SQL: claim due tasks under a lease, write results in batches, release, rescue expired leases.

Every write that follows a claim is guarded by ``lease_owner = :worker`` so a late write never overwrites a task
that another worker now holds (compare-and-set; the loser's row count is simply zero).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.storage.database import Database
from taskcenter.storage.schema import DUE_SQL, attempts, businesses, tasks

# Literal predicates (not bound parameters) so PostgreSQL's generic plans can still use the partial indexes.
_DUE = sa.text(DUE_SQL)
_LEASED = sa.text("lease_owner IS NOT NULL")

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


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch write did: tasks whose write landed (with their final status) and tasks no longer held."""

    landed: list[tuple[int, str]]
    lost: list[int]


async def claim(
    db: Database, *, worker: str, now: datetime, limit: int, lease_s: float
) -> Sequence[sa.RowMapping]:
    """Claim up to ``limit`` due tasks, highest priority first, then oldest due, in one statement.

    PostgreSQL skips rows other workers are claiming (``FOR UPDATE SKIP LOCKED``); SQLite has one writer.
    """
    due = (
        sa.select(tasks.c.id)
        .where(_DUE, tasks.c.next_attempt_at <= now)
        .order_by(tasks.c.priority.desc(), tasks.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        sa.update(tasks)
        .where(tasks.c.id.in_(due.scalar_subquery()))
        .values(
            status="processing",
            lease_owner=worker,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
        .returning(*CLAIM_COLUMNS)
    )
    async with db.write() as conn:
        rows = (await conn.execute(stmt)).mappings().all()
    # RETURNING has no order; the dispatcher starts them in claim order.
    return sorted(rows, key=lambda r: (-r["priority"], r["next_attempt_at"]))


async def next_due(db: Database) -> datetime | None:
    """When the earliest waiting task falls due (``None`` if none waits)."""
    async with db.read() as conn:
        value: datetime | None = (
            await conn.execute(sa.select(sa.func.min(tasks.c.next_attempt_at)).where(_DUE))
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


_FINISH = (
    sa.update(tasks)
    .where(
        tasks.c.id == sa.bindparam("b_id"),
        tasks.c.lease_owner == sa.bindparam("b_worker"),
        tasks.c.status == "processing",
    )
    .values(
        status=sa.bindparam("b_status"),
        attempts=sa.bindparam("b_attempt"),
        outcome=sa.bindparam("b_outcome"),
        next_attempt_at=sa.func.coalesce(sa.bindparam("b_next", type_=tasks.c.next_attempt_at.type), tasks.c.next_attempt_at),
        last_attempt_at=sa.bindparam("b_started"),
        finished_at=sa.bindparam("b_finished"),
        last_response=sa.bindparam("b_response"),
        last_error=sa.bindparam("b_error"),
        result=sa.bindparam("b_result"),
        lease_owner=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("b_now"),
    )
)

# A task cancelled while its attempt was in flight keeps status cancelled; the attempt is still recorded.
_FINISH_CANCELLED = (
    sa.update(tasks)
    .where(
        tasks.c.id == sa.bindparam("b_id"),
        tasks.c.lease_owner == sa.bindparam("b_worker"),
        tasks.c.status == "cancelled",
    )
    .values(
        attempts=sa.bindparam("b_attempt"),
        outcome=sa.bindparam("b_outcome"),
        last_attempt_at=sa.bindparam("b_started"),
        last_response=sa.bindparam("b_response"),
        last_error=sa.bindparam("b_error"),
        lease_owner=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("b_now"),
    )
)


async def _held(conn: AsyncConnection, worker: str, ids: list[int]) -> dict[int, str]:
    """Lock and return the tasks (id → status) this worker still holds among ``ids``."""
    rows = await conn.execute(
        sa.select(tasks.c.id, tasks.c.status)
        .where(tasks.c.id.in_(ids), tasks.c.lease_owner == worker)
        .with_for_update()
    )
    return {row.id: row.status for row in rows}


async def finish(db: Database, *, worker: str, now: datetime, results: Sequence[Finished]) -> Written:
    """Write a batch of attempt results in one transaction: attempts inserted, tasks moved, leases dropped."""
    if not results:
        return Written([], [])
    async with db.write() as conn:
        held = await _held(conn, worker, [r.task_id for r in results])
        mine = [r for r in results if r.task_id in held]
        if mine:
            await conn.execute(
                sa.insert(attempts),
                [
                    {
                        "task_id": r.task_id,
                        "number": r.attempt,
                        "started_at": r.started_at,
                        "duration_ms": r.duration_ms,
                        "request": r.request,
                        "response": r.response,
                        "outcome": r.outcome,
                        "error": r.error,
                        "worker": worker,
                    }
                    for r in mine
                ],
            )
            params = [
                {
                    "b_id": r.task_id,
                    "b_worker": worker,
                    "b_status": r.status,
                    "b_attempt": r.attempt,
                    "b_outcome": r.outcome,
                    "b_next": r.next_attempt_at,
                    "b_started": r.started_at,
                    "b_finished": r.finished_at,
                    "b_response": r.response,
                    "b_error": r.error,
                    "b_result": r.result,
                    "b_now": now,
                }
                for r in mine
            ]
            active = [p for p in params if held[p["b_id"]] == "processing"]
            cancelled = [p for p in params if held[p["b_id"]] == "cancelled"]
            if active:
                await conn.execute(_FINISH, active)
            if cancelled:
                await conn.execute(
                    _FINISH_CANCELLED,
                    [{k: v for k, v in p.items() if k not in ("b_status", "b_next", "b_finished", "b_result")} for p in cancelled],
                )
    landed = [(r.task_id, held[r.task_id] if held[r.task_id] == "cancelled" else r.status) for r in mine]
    return Written(landed, [r.task_id for r in results if r.task_id not in held])


_RELEASE = (
    sa.update(tasks)
    .where(
        tasks.c.id == sa.bindparam("b_id"),
        tasks.c.lease_owner == sa.bindparam("b_worker"),
        tasks.c.status == "processing",
    )
    .values(
        # Deferred or released unsent: back to where it came from, no attempt charged.
        status=sa.case((tasks.c.attempts == 0, "pending"), else_="retrying"),
        next_attempt_at=sa.bindparam("b_at", type_=tasks.c.next_attempt_at.type),
        lease_owner=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("b_now", type_=tasks.c.updated_at.type),
    )
)


async def release(db: Database, *, worker: str, now: datetime, deferrals: Sequence[tuple[int, datetime]]) -> None:
    """Give claimed tasks back unsent, each due again at its given time (no attempt is charged)."""
    if not deferrals:
        return
    params = [{"b_id": i, "b_worker": worker, "b_at": at, "b_now": now} for i, at in deferrals]
    async with db.write() as conn:
        await conn.execute(_RELEASE, params)
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
                sa.select(tasks.c.id, tasks.c.status, tasks.c.attempts, tasks.c.lease_owner, tasks.c.method, tasks.c.url)
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
                status=sa.case((tasks.c.status == "processing", "retrying"), else_=tasks.c.status),
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


async def business_codes(db: Database, pks: Iterable[int]) -> dict[int, str]:
    """Business codes by primary key (the dispatcher caches these)."""
    wanted = list(set(pks))
    if not wanted:
        return {}
    async with db.read() as conn:
        rows = await conn.execute(sa.select(businesses.c.id, businesses.c.code).where(businesses.c.id.in_(wanted)))
        return {r.id: r.code for r in rows}
