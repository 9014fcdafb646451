"""Figures for a business or the whole system: counts by status, success rate, attempt latency, busiest hosts,
and the processor task types with tasks due and not yet claimed.

Latency percentiles come from ``attempts.duration_ms`` over a window: computed by PostgreSQL
(``percentile_cont``), or in Python on SQLite over at most the newest :data:`SQLITE_SAMPLE` attempts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.clock import utcnow
from taskcenter.domain.states import TaskStatus
from taskcenter.domain.task import rfc3339
from taskcenter.errors import ValidationError
from taskcenter.service import Business
from taskcenter.storage.database import Database
from taskcenter.storage.holds import BUSINESS_HOLDS, business_hold_mark
from taskcenter.storage.leases import SEALED_HEADERS
from taskcenter.storage.schema import DUE_SQL, PROCESSOR_NEXT_DUE_SQL, attempts, businesses, tasks

#: ``ix_tasks_held``'s predicate, its columns named (the query joins businesses, which has a status too).
_HELD_TASKS = "tasks.held_by IS NOT NULL AND tasks." + DUE_SQL

#: Of each business's held tasks, how many ids ``held`` lists.
HELD_IDS = 10

PERCENTILES = (50, 90, 95, 99)
SQLITE_SAMPLE = 100_000
TOP_HOSTS = 10
MAX_WINDOW_HOURS = 24 * 90


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of sorted ``values``, interpolated linearly like ``percentile_cont``."""
    if not values:
        return None
    rank = (len(values) - 1) * p / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return float(values[lo] + (values[hi] - values[lo]) * (rank - lo))


@dataclass
class StatsService:
    """Reads the figures; one business's, or everyone's when no business is given."""

    db: Database
    clock: Callable[[], datetime] = utcnow

    async def figures(self, business: Business | None, *, window_hours: float = 24.0) -> dict[str, Any]:
        """Counts by status (all time), and for tasks created and attempts made in the last ``window_hours``:
        success rate (succeeded / (succeeded + failed)), latency percentiles and the busiest hosts."""
        if isinstance(window_hours, bool) or not 0 < window_hours <= MAX_WINDOW_HOURS:
            raise ValidationError(
                f"window_hours must be more than 0 and at most {MAX_WINDOW_HOURS}", field="window_hours"
            )
        until = self.clock()
        since = until - timedelta(hours=window_hours)
        pk = business.pk if business else None
        async with self.db.read() as conn:
            counts = await self._counts(conn, pk, None)
            recent = await self._counts(conn, pk, since)
            latency = await self._latency(conn, pk, since)
            hosts = await self._hosts(conn, pk, since)
            processors_due = await self._processors_due(conn, pk, until)
            held = await self._held(conn, pk)
            total_businesses = None
            if business is None:
                total_businesses = (
                    await conn.execute(sa.select(sa.func.count()).select_from(businesses))
                ).scalar()
        ended = recent["succeeded"] + recent["failed"]
        out: dict[str, Any] = {
            "business_code": business.code if business else None,
            "window_hours": float(window_hours),
            "since": rfc3339(since),
            "until": rfc3339(until),
            "counts": counts,
            "total": sum(counts.values()),
            "created": sum(recent.values()),
            "succeeded": recent["succeeded"],
            "failed": recent["failed"],
            "success_rate": round(recent["succeeded"] / ended, 6) if ended else None,
            "latency_ms": latency,
            "hosts": hosts,
            "processors_due": processors_due,
            "held": held,
        }
        if business is None:
            out["businesses"] = int(total_businesses or 0)
        return out

    async def _counts(self, conn: AsyncConnection, pk: int | None, since: datetime | None) -> dict[str, int]:
        stmt = sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
        if pk is not None:
            stmt = stmt.where(tasks.c.business_pk == pk)
        if since is not None:
            stmt = stmt.where(tasks.c.created_at >= since)
        counts = {s.value: 0 for s in TaskStatus}
        for status, n in (await conn.execute(stmt)).all():
            if status in counts:
                counts[status] = int(n)
        return counts

    async def _latency(self, conn: AsyncConnection, pk: int | None, since: datetime) -> dict[str, Any]:
        where = [attempts.c.started_at >= since, attempts.c.duration_ms.is_not(None)]
        if pk is not None:
            where.append(attempts.c.task_id.in_(sa.select(tasks.c.id).where(tasks.c.business_pk == pk)))
        if self.db.is_postgres:
            columns = [
                sa.func.percentile_cont(p / 100).within_group(attempts.c.duration_ms.asc())
                for p in PERCENTILES
            ]
            row = (await conn.execute(sa.select(sa.func.count(), *columns).where(*where))).one()
            samples, values = int(row[0]), [None if v is None else float(v) for v in row[1:]]
        else:
            stmt = (
                sa.select(attempts.c.duration_ms)
                .where(*where)
                .order_by(attempts.c.id.desc())
                .limit(SQLITE_SAMPLE)
            )
            durations = sorted(float(v) for v in (await conn.execute(stmt)).scalars())
            samples, values = len(durations), [percentile(durations, p) for p in PERCENTILES]
        # To the hundredth of a millisecond: interpolation's float noise (9.900000000000002) is not a figure.
        out: dict[str, Any] = {
            f"p{p}": None if v is None else round(v, 2) for p, v in zip(PERCENTILES, values, strict=True)
        }
        out["samples"] = samples
        return out

    async def _processors_due(
        self, conn: AsyncConnection, pk: int | None, now: datetime
    ) -> list[dict[str, Any]]:
        """Processor task types with tasks due by ``now``: how many, and since when the oldest has been due.

        Only a worker with a type's processor registered claims its tasks (``taskcenter worker`` has none); tasks
        of a type no running worker serves wait here, their oldest due time receding into the past. Read from
        ``ix_tasks_due_type_time``, which holds only processor tasks waiting for a worker.
        """
        oldest = sa.func.min(tasks.c.next_attempt_at)
        stmt = (
            sa.select(tasks.c.type, sa.func.count(), oldest)
            .where(sa.text(PROCESSOR_NEXT_DUE_SQL), tasks.c.next_attempt_at <= now)
            .group_by(tasks.c.type)
            .order_by(tasks.c.type)
        )
        if pk is not None:
            stmt = stmt.where(tasks.c.business_pk == pk)
        return [
            {"type": name, "due": int(count), "oldest_due_at": rfc3339(since)}
            for name, count, since in (await conn.execute(stmt)).all()
        ]

    async def _held(self, conn: AsyncConnection, pk: int | None) -> list[dict[str, Any]]:
        """Businesses with HTTP tasks held unsent until an operator acts, by reason — ``signing_secret``: the
        business's signing secret cannot be decrypted (all its HTTP tasks are held); ``sealed_headers``: these
        tasks' own sealed header values cannot — with how many tasks and the ids of the first ``HELD_IDS``. Read
        from ``ix_tasks_held``."""
        marks = {business_hold_mark(reason): reason for reason in BUSINESS_HOLDS} | {
            SEALED_HEADERS: "sealed_headers"
        }
        stmt = (
            sa.select(businesses.c.id, businesses.c.code, tasks.c.held_by, sa.func.count())
            .join(businesses, businesses.c.id == tasks.c.business_pk)
            .where(sa.text(_HELD_TASKS), tasks.c.held_by.in_(list(marks)))
            .group_by(businesses.c.id, businesses.c.code, tasks.c.held_by)
            .order_by(businesses.c.code, tasks.c.held_by)
        )
        if pk is not None:
            stmt = stmt.where(tasks.c.business_pk == pk)
        held = []
        for business_pk, code, mark, count in (await conn.execute(stmt)).all():
            first = (
                sa.select(tasks.c.uuid)
                .where(sa.text(_HELD_TASKS), tasks.c.held_by == mark, tasks.c.business_pk == business_pk)
                .order_by(tasks.c.id)
                .limit(HELD_IDS)
            )
            ids = [str(u) for u in (await conn.execute(first)).scalars()]
            held.append({"business_code": code, "reason": marks[mark], "tasks": int(count), "task_ids": ids})
        return held

    async def _hosts(self, conn: AsyncConnection, pk: int | None, since: datetime) -> list[dict[str, Any]]:
        n = sa.func.count().label("n")
        stmt = (
            sa.select(
                tasks.c.host,
                n,
                sa.func.sum(sa.case((tasks.c.status == "succeeded", 1), else_=0)),
                sa.func.sum(sa.case((tasks.c.status == "failed", 1), else_=0)),
            )
            .where(tasks.c.created_at >= since, tasks.c.host.is_not(None))
            .group_by(tasks.c.host)
            .order_by(n.desc(), tasks.c.host)
            .limit(TOP_HOSTS)
        )
        if pk is not None:
            stmt = stmt.where(tasks.c.business_pk == pk)
        return [
            {"host": host, "tasks": int(count), "succeeded": int(ok or 0), "failed": int(bad or 0)}
            for host, count, ok, bad in (await conn.execute(stmt)).all()
        ]
