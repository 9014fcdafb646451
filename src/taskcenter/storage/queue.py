"""The queue's SQL: claim due tasks under a lease, write results in batches, release, rescue expired leases.

Every write that follows a claim is guarded by ``lease_owner = :worker`` so a late write never overwrites a task
that another worker now holds (compare-and-set; the loser's row count is simply zero).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.storage.database import Database
from taskcenter.storage.schema import DUE_SQL, attempts, tasks

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
    list was read are picked up by the last branch (``business_pk`` above the highest known one).
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
    branches.append(
        sa.select(*cols)
        .where(_DUE, tasks.c.business_pk > max(businesses), tasks.c.next_attempt_at <= _NOW)
        .order_by(*order)
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
    """
    stmt = _claim_statement(tuple(sorted(businesses)))
    params = {
        "b_now": now,
        "b_limit": limit,
        "b_worker": worker,
        "b_until": now + timedelta(seconds=lease_s),
    }
    async with db.write() as conn:
        rows: Sequence[Mapping[Any, Any]] = (await conn.execute(stmt, params)).mappings().all()
        if admission is not None and rows:
            rows, deferred = await admission(conn, rows, now)
            if deferred:
                await conn.execute(
                    _RELEASE,
                    [{"b_id": i, "b_worker": worker, "b_at": at, "b_now": now} for i, at in deferred],
                )
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
        next_attempt_at=sa.func.coalesce(
            sa.bindparam("b_next", type_=tasks.c.next_attempt_at.type), tasks.c.next_attempt_at
        ),
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


_HELD = (
    sa.select(tasks.c.id, tasks.c.status)
    .where(
        tasks.c.id.in_(sa.bindparam("b_ids", expanding=True)), tasks.c.lease_owner == sa.bindparam("b_worker")
    )
    .with_for_update()
)


async def _held(conn: AsyncConnection, worker: str, ids: list[int]) -> dict[int, str]:
    """Lock and return the tasks (id → status) this worker still holds among ``ids``."""
    rows = await conn.execute(_HELD, {"b_ids": ids, "b_worker": worker})
    return {row.id: row.status for row in rows}


Recorder = Callable[[AsyncConnection, dict[str, list[str]], dict[str, float], datetime], Awaitable[Any]]


async def finish(
    db: Database, *, worker: str, now: datetime, results: Sequence[Finished], recorder: Recorder | None = None
) -> Written:
    """Write a batch of attempt results in one transaction: attempts inserted, tasks moved, leases dropped.

    ``recorder`` folds the outcomes into the host breakers inside the same transaction.
    """
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
                    "b_response": {**r.response, "duration_ms": r.duration_ms}
                    if r.response is not None
                    else None,
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
                    [
                        {
                            k: v
                            for k, v in p.items()
                            if k not in ("b_status", "b_next", "b_finished", "b_result")
                        }
                        for p in cancelled
                    ],
                )
        if recorder is not None and mine:
            outcomes: dict[str, list[str]] = {}
            pauses: dict[str, float] = {}
            for r in mine:
                if r.host is not None:
                    outcomes.setdefault(r.host, []).append(r.outcome)
                    if r.pause_until:
                        pauses[r.host] = max(pauses.get(r.host, 0.0), r.pause_until)
            await recorder(conn, outcomes, pauses, now)
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
        # Marked for traffic control: relaxing the host's (or business's) limits pulls it forward again.
        held_by=tasks.c.host,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("b_now", type_=tasks.c.updated_at.type),
    )
)


async def release(
    db: Database, *, worker: str, now: datetime, deferrals: Sequence[tuple[int, datetime]]
) -> None:
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
