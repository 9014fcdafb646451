"""Tasks traffic control holds back, moved in bulk: a host's due tasks past its hold (an open circuit, a pause), a
held business's claimed tasks put back marked with the hold, and either pulled forward when the hold ends.

Admission (``storage.traffic``) decides the holds; :class:`HostHolds` is one dispatcher's record of the hosts whose
due tasks it moved, so that a hold moves them once and a release waits for the move.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskcenter.domain.traffic import BUSINESS_HOLD_S
from taskcenter.storage.leases import put_back_held
from taskcenter.storage.schema import DUE_SQL, HELD_SQL, UTCDateTime, tasks

log = logging.getLogger("taskcenter.traffic")

#: Reasons that hold every task of a host alike (see :meth:`HostHolds.hold_rest`).
_WHOLE_HOST = frozenset({"circuit_open", "circuit_half_open", "host_paused"})
#: A hold at least this long moves the host's other due tasks past it at once (see ``hold_due``).
_HOLD_REST_AFTER_S = 1.0
#: Hosts remembered as held before the lapsed ones are forgotten (as traffic control's other per-host memories).
_MAX_HOLDING = 10_000
#: Tasks moved per statement: a larger backlog moves in several, as admission meets more of it.
HOLD_BATCH = 2000
#: Business holds (``Limits.held``), by reason: what a held task's ``last_error`` says. Such a task is put back
#: marked ``held_by = "business:<reason>"`` (no host key looks so), so that the end of the hold finds it, in a
#: running dispatcher or in one that starts later (see :func:`held_businesses`).
BUSINESS_HOLDS = {
    "signing_secret": (
        "not sent: the business's signing secret cannot be decrypted with TASKCENTER_SECRET_KEY, and a request "
        "must not leave unsigned; held until the key that sealed it is configured again or the signing secret "
        "is rotated"
    ),
}
_HELD_PREFIX = "business:"
_PUT_BACK_HELD = put_back_held(tasks.c.id.in_(sa.bindparam("b_ids", expanding=True)))


def business_hold_mark(reason: str) -> str:
    """The ``held_by`` of a task its business's hold put back."""
    return _HELD_PREFIX + reason


async def held_businesses(conn: AsyncConnection, reason: str) -> list[int]:
    """The businesses with tasks put back for the business hold ``reason`` (read from ``ix_tasks_held``)."""
    stmt = (
        sa.select(tasks.c.business_pk)
        .where(sa.text(HELD_SQL), tasks.c.held_by == business_hold_mark(reason))
        .distinct()
        .order_by(tasks.c.business_pk)
    )
    return [int(pk) for pk in (await conn.execute(stmt)).scalars()]


async def put_back_held_businesses(
    conn: AsyncConnection, held: Mapping[str, list[int]], ts: float, now: datetime
) -> None:
    """Put back the tasks of held businesses, marked with the hold and its reason in ``last_error`` (the usual
    put-back marks them with their host, which the end of the hold would not find). A statement per batch that
    meets such tasks; each held task meets the claim once per hold."""
    until = datetime.fromtimestamp(ts + BUSINESS_HOLD_S, UTC)
    for reason, ids in sorted(held.items()):
        params = {"b_ids": ids, "b_until": until, "b_held": business_hold_mark(reason)}
        await conn.execute(_PUT_BACK_HELD, {**params, "b_error": BUSINESS_HOLDS[reason], "b_now": now})


async def release_held(
    conn: AsyncConnection,
    *,
    host: str | None = None,
    business: int | None = None,
    due: datetime,
    step_s: float = 0.0,
) -> int:
    """Pull forward the tasks traffic control holds for ``host`` (or ``business``); returns how many moved.

    Each held task waiting past ``due`` comes due again from ``due`` on, ``step_s`` apart in claim order
    (priority, then due time), so a backlog returns at the pace the relaxed limit can send it instead of all at
    once. Tasks scheduled later than that by their own ``scheduled_at`` keep their time; so do retries waiting
    for their backoff, which are not held (``held_by`` is set only when admission puts a claimed task back).
    """
    if host is not None:
        which = sa.and_(sa.text(HELD_SQL), tasks.c.held_by == host)
    elif business is not None:
        which = sa.and_(sa.text(DUE_SQL), tasks.c.business_pk == business, tasks.c.held_by.is_not(None))
    else:
        raise ValueError("give host or business")
    which = sa.and_(
        which,
        tasks.c.next_attempt_at > due,
        sa.or_(tasks.c.scheduled_at.is_(None), tasks.c.scheduled_at <= due),
    )
    if step_s <= 0:
        result = await conn.execute(sa.update(tasks).where(which).values(next_attempt_at=due, updated_at=due))
        return int(result.rowcount or 0)
    rank = sa.func.row_number().over(order_by=(tasks.c.priority.desc(), tasks.c.next_attempt_at, tasks.c.id))
    held = sa.select(tasks.c.id, (rank - 1).label("pos")).where(which).subquery("held")
    at = sa.bindparam("b_due", due, type_=UTCDateTime)
    offset = sa.cast(held.c.pos, sa.Float) * step_s
    if conn.dialect.name == "postgresql":
        when: Any = at + sa.func.make_interval(0, 0, 0, 0, 0, 0, offset)
    else:  # ISO text, as SQLAlchemy stores SQLite datetimes (microseconds padded back to six digits)
        when = sa.func.strftime("%Y-%m-%d %H:%M:%f", sa.func.julianday(at) + offset / 86400.0).concat("000")
    result = await conn.execute(
        sa.update(tasks).where(tasks.c.id == held.c.id).values(next_attempt_at=when, updated_at=due)
    )
    return int(result.rowcount or 0)


async def hold_due(
    conn: AsyncConnection, *, host: str, until: datetime, now: datetime, limit: int = HOLD_BATCH
) -> int:
    """Move up to ``limit`` of ``host``'s tasks due by ``now`` to ``until``, marked held for the host; returns
    how many moved.

    Admission would hold each of them to the same time when the claim met it: the claim's UPDATE and the put-back's
    are two writes of every index of ``tasks`` per task (~0.2 ms of PostgreSQL CPU), this is one. Tasks another
    dispatcher is claiming are skipped. Being marked held (``held_by``), they come back early with the rest when
    the host recovers (see :func:`release_held`).
    """
    due = (
        sa.select(tasks.c.id)
        .where(sa.text(DUE_SQL), tasks.c.host == host, tasks.c.next_attempt_at <= now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await conn.execute(
        sa.update(tasks)
        .where(tasks.c.id.in_(due.scalar_subquery()))
        .values(next_attempt_at=until, held_by=host, updated_at=now)
    )
    return int(result.rowcount or 0)


@dataclass(eq=False)
class HostHolds:
    """The hosts whose due tasks one dispatcher moved past a hold, and the releases it started."""

    _holding: dict[str, float] = field(default_factory=dict)
    """Hosts whose due tasks this dispatcher moved past a hold (see :meth:`hold_rest`), and until when."""
    _moving: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """The statement moving a host's due tasks, while it runs: a release of the host waits for it."""
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def hold_rest(
        self, engine: AsyncEngine, rows: Sequence[Mapping[Any, Any]], verdicts: Mapping[int, Any], now: float
    ) -> None:
        """Move the other due tasks of hosts held as a whole for a while (an open circuit, a pause) past the hold
        in one statement per host, in a transaction of its own started now: on SQLite it waits for the one writer,
        so it follows this claim; on PostgreSQL it may run beside it and skips the rows the claim holds.

        Otherwise each of them is claimed and put back on its own when the claim meets it: a sick host's backlog
        cost PostgreSQL two writes of every index of ``tasks`` per task and the worker a claimed row each, taken
        from the healthy hosts' throughput. Once per hold and host (this dispatcher's): a task falling due later
        is held by admission as before. Not for a host parked by its window (see ``TrafficControl._windows``):
        that is a guess its first good answer undoes, and a healthy host starting slowly is parked too.
        """
        holds: dict[str, float] = {}
        for r in rows:
            v, h = verdicts[r["id"]], r["host"]
            until = v.defer_until
            if until is None or until < now + _HOLD_REST_AFTER_S or v.reason not in _WHOLE_HOST:
                continue
            if self._holding.get(h, 0.0) <= now:  # not while a hold of this dispatcher's is in force
                holds[h] = min(holds.get(h, math.inf), until)
        if not holds:
            return
        if len(self._holding) > _MAX_HOLDING:
            self._holding = {h: t for h, t in self._holding.items() if t > now}
        self._holding.update(holds)
        task = asyncio.get_running_loop().create_task(self._hold(engine, holds, now))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self._moving.update(dict.fromkeys(holds, task))

    async def _hold(self, engine: AsyncEngine, holds: Mapping[str, float], now: float) -> None:
        at = datetime.fromtimestamp(now, UTC)
        try:
            async with engine.begin() as conn:
                for h, until in sorted(holds.items()):
                    moved = await hold_due(conn, host=h, until=datetime.fromtimestamp(until, UTC), now=at)
                    if moved >= HOLD_BATCH:  # more may be left: the next admission to hold one moves more
                        self._holding.pop(h, None)
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            # Nothing lost: admission holds them one by one as the claim meets them.
            log.warning("moving the due tasks of held hosts %s failed: %s", sorted(holds), exc)
            for h in holds:
                self._holding.pop(h, None)
        finally:
            me = asyncio.current_task()
            for h in holds:
                if self._moving.get(h) is me:
                    del self._moving[h]

    def ended(self, host: str) -> None:
        """The host's hold is over (its circuit closed, or it answered well): the next hold moves its tasks
        again."""
        self._holding.pop(host, None)

    def release_later(
        self,
        on_close: Callable[[list[str]], Coroutine[Any, Any, None]] | None,
        hosts: list[str],
        delay_s: float = 0.0,
    ) -> None:
        """Pull the hosts' held tasks forward (``on_close``) once the current transaction is over.

        Not in the transaction: updating other tasks while holding the host_state row a claiming dispatcher waits
        for could deadlock with that claim (which holds due tasks and waits for the row).
        """
        if on_close is None:
            return
        moving = {t for h in hosts if (t := self._moving.get(h)) is not None}
        task = asyncio.get_running_loop().create_task(self._release(moving, on_close, hosts, delay_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _release(
        moving: Iterable[asyncio.Task[None]],
        on_close: Callable[[list[str]], Coroutine[Any, Any, None]],
        hosts: list[str],
        delay_s: float,
    ) -> None:
        await asyncio.sleep(delay_s)
        # After any statement still moving these hosts' tasks past a hold, which would otherwise land after the
        # release and hold them again.
        await asyncio.gather(*moving, return_exceptions=True)
        await on_close(hosts)
