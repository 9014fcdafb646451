"""Shared traffic-control state in the database: admission of a claimed batch and breaker bookkeeping.

Rows of ``host_state`` and ``business_state`` are read ``FOR UPDATE`` inside the claim (or result) transaction,
so every dispatcher of a cluster takes tokens from the same buckets and sees the same breakers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskcenter.domain.traffic import (
    BUSINESS_HOLD_S,
    NOT_EVIDENCE,
    Candidate,
    Limits,
    State,
    Window,
    admit,
    negligible,
    record,
    refunded,
    respent,
)
from taskcenter.domain.traffic import HOST_FAILURES as _FAILURES
from taskcenter.storage.database import Database, sqlite_driver
from taskcenter.storage.leases import put_back_held
from taskcenter.storage.schema import DUE_SQL, HELD_SQL, UTCDateTime, business_state, host_state, tasks

log = logging.getLogger("taskcenter.traffic")

_PROCESSING = sa.text("status = 'processing'")
#: Which bucket a task held for a token was promised one of (see ``Candidate.promised``).
_PROMISES = {"host_rate": "host", "business_rate": "business"}
_MAX_PROMISES = 10_000
#: A request this dispatcher admitted is counted in flight until its timeout and this long more (then its result
#: was lost: another worker took its lease over).
_FLIGHT_GRACE_S = 10.0
#: Reasons that hold every task of a host alike (see ``TrafficControl._hold_rest``).
_WHOLE_HOST = frozenset({"circuit_open", "circuit_half_open", "host_paused"})
#: A hold at least this long moves the host's other due tasks past it at once (see ``hold_due``).
_HOLD_REST_AFTER_S = 1.0
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


def _state(row: Mapping[Any, Any] | None) -> State:
    if row is None:
        return State(tokens=0.0, refilled_at=0.0)
    return State(
        tokens=row["tokens"],
        refilled_at=row["refilled_at"],
        breaker=row["breaker"],
        failures=row["failures"],
        window=tuple(c == "1" for c in row["window"]),
        open_until=row["open_until"],
        probe_until=row["probe_until"],
        paused_until=row["paused_until"],
    )


_HOST_COLUMNS = (
    "tokens",
    "refilled_at",
    "breaker",
    "failures",
    "window",
    "open_until",
    "probe_until",
    "paused_until",
)
_UPDATE_HOST = (
    sa.update(host_state)
    .where(host_state.c.host == sa.bindparam("b_host"))
    .values({k: sa.bindparam(f"v_{k}") for k in _HOST_COLUMNS})
)
_UPDATE_BUSINESS = (
    sa.update(business_state)
    .where(business_state.c.business_pk == sa.bindparam("b_pk"))
    .values(tokens=sa.bindparam("v_tokens"), refilled_at=sa.bindparam("v_refilled_at"))
)


#: Spends a host's tokens again (see :meth:`TrafficControl.respend`), or refunds them (:meth:`TrafficControl.refund`):
#: only if the row is still as the admission (or the spending again) left it.
_HOST_AS_LEFT = sa.update(host_state).where(
    host_state.c.host == sa.bindparam("b_host"),
    host_state.c.tokens == sa.bindparam("b_tokens"),
    host_state.c.refilled_at == sa.bindparam("b_refilled_at"),
)
_RESPEND_HOST = _HOST_AS_LEFT.values(
    tokens=sa.bindparam("v_tokens"), refilled_at=sa.bindparam("v_refilled_at")
)
_REFUND_HOST = _HOST_AS_LEFT.values(tokens=sa.bindparam("v_tokens"))


@dataclass(eq=False, slots=True)
class Spend:
    """The host tokens one admission spent: what it wrote to the host's row, and on how many tasks.

    If every one of those tasks starts too late for its token, and the row still holds what this admission wrote
    (nothing was admitted on the host since, by any dispatcher), they may be spent again as they start instead of
    given back (see ``domain.traffic.respent``)."""

    host: str
    tokens: float
    refilled_at: float
    tasks: int
    late: int = 0
    """Of the tasks, those that started too late (the dispatcher counts them)."""
    respent: bool = False
    """Spent again once already: tasks late again after that are given back, the tokens refunded if they can be."""


def _host_params(host: str, s: State) -> dict[str, Any]:
    return {"b_host": host, **{f"v_{k}": v for k, v in _host_values(s).items()}}


def _host_values(s: State) -> dict[str, Any]:
    return {
        "tokens": s.tokens,
        "refilled_at": s.refilled_at,
        "breaker": s.breaker,
        "failures": s.failures,
        "window": "".join("1" if f else "0" for f in s.window),
        "open_until": s.open_until,
        "probe_until": s.probe_until,
        "paused_until": s.paused_until,
    }


def _keep_promises(booked: dict[Any, float], states: Mapping[Any, State], now: float) -> None:
    """Remember the tokens promised to held tasks; forget promises that have lapsed."""
    for key, state in states.items():
        if state.booked_until > now:
            booked[key] = state.booked_until
        else:
            booked.pop(key, None)


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


def _busy(dialect: str, table: str, key: str, count: bool) -> Any:
    """Requests in flight for the row's host or business (a correlated count on the partial in-flight index),
    or 0 when no cap needs it."""
    if not count:
        return sa.literal(0).label("busy")
    column = "host" if table == "host_state" else "business_pk"
    # Without statistics SQLite would walk every processing task per row (ix_tasks_status) instead.
    hint = (
        f" INDEXED BY ix_tasks_processing_{'host' if column == 'host' else 'business'}"
        if dialect == "sqlite"
        else ""
    )
    return sa.literal_column(
        f"(SELECT count(*) FROM tasks{hint} WHERE status = 'processing' AND tasks.{column} = {table}.{key})"
    ).label("busy")


_KEY_PARAMS = {"host_state": "b_hosts", "business_state": "b_bizs"}


def _state_select(dialect: Dialect, table_name: str, count: bool) -> Any:
    """``SELECT … FOR UPDATE`` of one table's state rows whose keys are bound as one parameter, in key order (so
    two dispatchers never deadlock on each other's rows), with their requests in flight if ``count``. The keys go
    as one array (PostgreSQL) or one JSON list (SQLite), so the text is the same for any number of keys."""
    table = host_state if table_name == "host_state" else business_state
    key = table.c.host if table is host_state else table.c.business_pk
    param: Any = sa.bindparam(_KEY_PARAMS[table_name])
    if dialect.name == "postgresql":
        keys: Any = key == sa.any_(sa.cast(param, postgresql.ARRAY(key.type)))
    else:
        keys = key.in_(sa.select(sa.column("value")).select_from(sa.func.json_each(param)))
    return (
        sa.select(table, _busy(dialect.name, table_name, key.name, count))
        .where(keys)
        .order_by(key)
        .with_for_update(of=table)
    )


@functools.lru_cache(maxsize=16)
def _locking_read(
    dialect: Dialect, tables: tuple[tuple[str, bool], ...]
) -> tuple[str, tuple[str, ...], dict[str, Any], tuple[str, ...]]:
    """The locking read of the state rows of ``tables`` ((table name, count its requests in flight), hosts first):
    one statement whatever the number of tables, so a claim's admission costs one round trip, not one per table.

    Built and compiled once per shape, and run on the driver directly (see ``storage.queue``): returns the SQL
    text, the order of its parameters, the values of those it fixes itself and the names of its columns. With
    both tables, the rows of each are locked in key order, hosts before businesses (a UNION ALL runs its branches
    in order), as the two statements it replaces did.
    """
    if len(tables) == 1:
        stmt = _state_select(dialect, *tables[0])
    else:
        h = _state_select(dialect, "host_state", tables[0][1]).subquery("h")
        b = _state_select(dialect, "business_state", tables[1][1]).subquery("b")

        def none(type_: Any, name: str) -> Any:
            return sa.cast(sa.null(), type_).label(name)

        host_only = [c for c in h.c if c.name not in ("host", "tokens", "refilled_at", "busy")]
        stmt = sa.union_all(
            sa.select(
                h.c.host, none(sa.Integer, "business_pk"), h.c.tokens, h.c.refilled_at, *host_only, h.c.busy
            ),
            sa.select(
                none(sa.String, "host"),
                b.c.business_pk,
                b.c.tokens,
                b.c.refilled_at,
                *(none(c.type, c.name) for c in host_only),
                b.c.busy,
            ),
        )
    compiled = stmt.compile(dialect=dialect)
    names = tuple(c.name for c in stmt.selected_columns)
    return str(compiled), tuple(compiled.positiontup or ()), dict(compiled.params), names


async def _read_locked(
    conn: AsyncConnection, hosts: list[str], bizs: list[int], count_hosts: bool, count_bizs: bool
) -> list[dict[str, Any]]:
    tables: tuple[tuple[str, bool], ...] = (("host_state", count_hosts),) if hosts else ()
    tables += (("business_state", count_bizs),) if bizs else ()
    sql, params, fixed, names = _locking_read(conn.dialect, tables)
    postgres = conn.dialect.name == "postgresql"
    bound = {
        **fixed,
        "b_hosts": hosts if postgres else orjson.dumps(hosts).decode(),
        "b_bizs": bizs if postgres else orjson.dumps(bizs).decode(),
    }
    if postgres:
        rows: Any = (await conn.exec_driver_sql(sql, tuple(bound[n] for n in params))).all()
    else:
        rows = await (await sqlite_driver(conn)).execute_fetchall(sql, [bound[n] for n in params])
    return [dict(zip(names, r, strict=True)) for r in rows]


def _forget_changed(limits: Mapping[Any, Limits], seen: dict[Any, Limits], booked: dict[Any, float]) -> None:
    """Drop the token promises of buckets whose limits changed: they were spaced by the old rate."""
    for key, lim in limits.items():
        if seen.get(key) != lim:
            if key in seen:
                booked.pop(key, None)
            seen[key] = lim
    if len(seen) > _MAX_PROMISES:
        seen.clear()


def _insert_missing(dialect: str, table: sa.Table, key: str, values: Iterable[Any]) -> Any:
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return ins.values([{key: v} for v in values]).on_conflict_do_nothing(index_elements=[key])


@dataclass
class TrafficControl:
    """Admission and breaker bookkeeping against the shared state. Limits come from cached policies."""

    host_limits: Callable[[str], Limits]
    business_limits: Callable[[int], Limits]
    known_hosts: set[str] = field(default_factory=set)
    known_businesses: set[int] = field(default_factory=set)
    clean_hosts: set[str] = field(default_factory=set)
    """Hosts last seen closed, unpaused, without failures: an all-success batch for them needs no write."""
    deferred: Counter[str] = field(default_factory=Counter)
    booked_hosts: dict[str, float] = field(default_factory=dict)
    """Per host, the last token this dispatcher promised to a held task (see ``domain.traffic.book``)."""
    booked_businesses: dict[int, float] = field(default_factory=dict)
    send_within: dict[int, tuple[float, float, Spend | None, float | None]] = field(default_factory=dict)
    """Tasks admitted on a token, until they start: when they were admitted (``time.monotonic()``), how long
    after that they may still leave (``domain.traffic.Verdict.send_within_s``), the host :class:`Spend` that
    let them go (``None`` if the host has no rate limit, or its row was not written) and how long the business's
    token allows (``Verdict.business_within_s``). The dispatcher takes each out as it starts the task; a task that
    starts too late is spent again (:meth:`respend`) or given back instead of sent."""
    promised: dict[int, tuple[str, float]] = field(default_factory=dict)
    """Tasks this dispatcher held for a token: which bucket (``host``/``business``) and when it is due."""
    slow_window: int = 10
    """Requests this dispatcher starts at once to a host that has not answered it yet, or whose oldest request
    has waited ``slow_after_s`` for its answer, to begin with: each answer that is not a host failure widens
    the window by one (so a healthy host's window doubles every round trip), each failure halves it, never below
    this. It binds only while other hosts want slots too. 0 turns it off. A host whose every request times out
    therefore holds a few of the dispatcher's slots, not all of them."""
    slow_after_s: float = 0.1
    on_close: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None
    """Pulls forward the tasks held back for these hosts (see :func:`release_held`): when a circuit this
    dispatcher recorded closes, or a host it held tasks of for never answering well answers well. Called after the
    transaction, in a task of its own."""
    _seen_hosts: dict[str, Limits] = field(default_factory=dict)
    _seen_businesses: dict[int, Limits] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _flight: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    """Per host, this dispatcher's requests in flight: (admitted at, given up on at), oldest first."""
    _window: dict[str, float] = field(default_factory=dict)
    _answered_well: set[str] = field(default_factory=set)
    """Hosts that gave this dispatcher an answer that was not a failure."""
    _parked: set[str] = field(default_factory=set)
    """Hosts whose window held tasks until well after their oldest request's deadline (see ``_windows``)."""
    _seen_at: dict[str, float] = field(default_factory=dict)
    """When each host last had tasks in a claimed batch."""
    _holding: dict[str, float] = field(default_factory=dict)
    """Hosts whose due tasks this dispatcher moved past a hold (see ``_hold_rest``), and until when."""
    _moving: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """The statement moving a host's due tasks, while it runs: a release of the host waits for it."""

    async def _lock_states(
        self,
        conn: AsyncConnection,
        hosts: set[str],
        bizs: set[int],
        count_hosts: bool = False,
        count_bizs: bool = False,
    ) -> tuple[dict[str, State], dict[int, State], Counter[str], Counter[int]]:
        """Lock and read the hosts' and businesses' shared state, and (if asked) count their requests in flight
        cluster-wide in the same statement: one round trip."""
        dialect = conn.dialect.name
        new_hosts, new_bizs = hosts - self.known_hosts, bizs - self.known_businesses
        if new_hosts:
            await conn.execute(_insert_missing(dialect, host_state, "host", sorted(new_hosts)))
            self.known_hosts |= new_hosts
        if new_bizs:
            await conn.execute(_insert_missing(dialect, business_state, "business_pk", sorted(new_bizs)))
            self.known_businesses |= new_bizs
        # Lock in a fixed order (hosts, then businesses, each sorted) so two dispatchers never deadlock on each
        # other's rows; both tables in one statement.
        host_rows: dict[str, Any] = {}
        biz_rows: dict[int, Any] = {}
        if hosts or bizs:
            for r in await _read_locked(conn, sorted(hosts), sorted(bizs), count_hosts, count_bizs):
                if r["host"] is not None:
                    host_rows[r["host"]] = r
                else:
                    biz_rows[r["business_pk"]] = r
        return (
            {h: _state(host_rows.get(h)) for h in hosts},
            {b: State(tokens=r["tokens"], refilled_at=r["refilled_at"]) for b, r in biz_rows.items()}
            | {b: State(0.0, 0.0) for b in bizs - set(biz_rows)},
            Counter({h: r["busy"] for h, r in host_rows.items()}),
            Counter({b: r["busy"] for b, r in biz_rows.items()}),
        )

    async def admit(
        self, conn: AsyncConnection, rows: Sequence[Mapping[Any, Any]], now: datetime
    ) -> tuple[list[Mapping[Any, Any]], list[tuple[int, datetime]]]:
        """Split a just-claimed batch into tasks that go now and deferrals ``(task id, due again at)``."""
        if not rows:
            return [], []
        entered = time.monotonic()
        hosts = {r["host"] for r in rows}
        bizs = {r["business_pk"] for r in rows}
        host_lim = {h: self.host_limits(h) for h in hosts}
        biz_lim = {b: self.business_limits(b) for b in bizs}
        _forget_changed(host_lim, self._seen_hosts, self.booked_hosts)
        _forget_changed(biz_lim, self._seen_businesses, self.booked_businesses)
        # In flight elsewhere = processing now minus this batch (which the claim just marked processing).
        capped_h = any(host_lim[h].max_in_flight is not None for h in hosts)
        capped_b = any(biz_lim[b].max_in_flight is not None for b in bizs)
        h_states, b_states, busy_h, busy_b = await self._lock_states(conn, hosts, bizs, capped_h, capped_b)
        # Decide as of now, not as of when the claim began: under contention the wait for these row locks is
        # the longest part of a claim, and tokens spent "in the past" would let the next dispatcher spend the
        # same seconds again (two bursts back to back at the receiver).
        decided = time.monotonic()
        ts = now.timestamp() + (decided - entered)
        claimed_h = Counter(r["host"] for r in rows)
        claimed_b = Counter(r["business_pk"] for r in rows)
        booked_h = {h: replace(h_states[h], booked_until=self.booked_hosts.get(h, 0.0)) for h in hosts}
        booked_b = {b: replace(b_states[b], booked_until=self.booked_businesses.get(b, 0.0)) for b in bizs}
        verdicts, new_h, new_b = admit(
            [Candidate(r["id"], r["host"], r["business_pk"], self._promise(r["id"])) for r in rows],
            hosts={h: (booked_h[h], host_lim[h], max(0, busy_h[h] - claimed_h[h])) for h in hosts},
            businesses={b: (booked_b[b], biz_lim[b], max(0, busy_b[b] - claimed_b[b])) for b in bizs},
            now=ts,
            windows=self._windows(hosts, ts),
        )
        _keep_promises(self.booked_hosts, new_h, ts)
        _keep_promises(self.booked_businesses, new_b, ts)
        changed_h = [
            _host_params(h, s)
            for h, s in new_h.items()
            if s != booked_h[h] and not negligible(booked_h[h], s, host_lim[h])
        ]
        if changed_h:
            await conn.execute(_UPDATE_HOST, changed_h)
        changed_b = [
            {"b_pk": b, "v_tokens": s.tokens, "v_refilled_at": s.refilled_at}
            for b, s in new_b.items()
            if s != booked_b[b] and not negligible(booked_b[b], s, biz_lim[b])
        ]
        if changed_b:
            await conn.execute(_UPDATE_BUSINESS, changed_b)
        for h, s in new_h.items():
            if s.breaker == "closed" and s.failures == 0 and s.paused_until <= ts:
                self.clean_hosts.add(h)
            else:
                self.clean_hosts.discard(h)
        if len(self.send_within) > _MAX_PROMISES:
            # Tasks admitted and then never started (given back unsent, or left at shutdown) never come back.
            self.send_within = {i: w for i, w in self.send_within.items() if w[0] > decided - 60.0}
        # Per host whose row this admission wrote: the tokens it spent there, for the tasks that may start late.
        spends = {
            p["b_host"]: Spend(p["b_host"], p["v_tokens"], p["v_refilled_at"], 0)
            for p in changed_h
            if host_lim[p["b_host"]].rate_per_second is not None
        }
        # A business whose spend was not written (negligible) is owed no deadline should its tokens be spent
        # again: the row never held that spend, and a late request overstates it no more than one on time did.
        written_b = {p["b_pk"] for p in changed_b} if changed_b else set()
        go = []
        for r in rows:
            v = verdicts[r["id"]]
            if v.defer_until is None:
                go.append(r)
                if v.send_within_s is not None:
                    spend = spends.get(r["host"]) if spends else None
                    if spend is not None:
                        spend.tasks += 1
                    business = v.business_within_s if r["business_pk"] in written_b else None
                    self.send_within[r["id"]] = (decided, v.send_within_s, spend, business)
        if self.slow_window:
            for r in go:
                if not r["host"].startswith("processor:"):
                    self._flight.setdefault(r["host"], deque()).append(
                        (ts, ts + r["timeout"] + _FLIGHT_GRACE_S)
                    )
        later = []
        held: dict[str, list[int]] = {}
        for r in rows:
            v = verdicts[r["id"]]
            if v.reason in BUSINESS_HOLDS:
                self.deferred[v.reason] += 1
                held.setdefault(v.reason, []).append(r["id"])
            elif v.defer_until is not None:
                self.deferred[v.reason or "deferred"] += 1
                later.append((r["id"], datetime.fromtimestamp(v.defer_until, UTC)))
                if v.reason in _PROMISES:
                    self.promised[r["id"]] = (_PROMISES[v.reason], v.defer_until)
        if len(self.promised) > _MAX_PROMISES:
            # Tasks another dispatcher took (or that were cancelled) never come back here: drop lapsed promises.
            self.promised = {i: p for i, p in self.promised.items() if p[1] > ts - 60.0}
        if held:
            await self._put_back_held(conn, held, ts, now)
        self._hold_rest(conn.engine, rows, verdicts, ts)
        return go, later

    async def respend(self, db: Database, spends: Sequence[Spend], now: datetime) -> list[Spend]:
        """Spend again, as of ``now``, the host tokens of admissions whose tasks all started too late for them;
        those whose row no longer holds what the admission wrote are left as they are. Returns the spends done.

        The bucket is left as if they were admitted now (see ``domain.traffic.respent``): nothing was admitted on
        the host since, so no request left on the refill they waited through, and the late tasks may go now instead
        of wasting their tokens (for a host with a burst of 1, a token each) and going round the queue. One
        statement per spend, in one transaction: this runs only for tasks that started late.
        """
        ts = now.timestamp()
        done = []
        async with db.write() as conn:
            for spend in spends:
                moved = respent(
                    State(spend.tokens, spend.refilled_at), self.host_limits(spend.host), ts, spend.tasks
                )
                if moved.refilled_at <= spend.refilled_at:
                    continue  # the clock went back, or the host lost its rate limit: the row would not tell
                params = {
                    "b_host": spend.host,
                    "b_tokens": spend.tokens,
                    "b_refilled_at": spend.refilled_at,
                    "v_tokens": moved.tokens,
                    "v_refilled_at": moved.refilled_at,
                }
                if (await conn.execute(_RESPEND_HOST, params)).rowcount == 1:
                    spend.tokens, spend.refilled_at = moved.tokens, moved.refilled_at
                    spend.late, spend.respent = 0, True
                    done.append(spend)
        return done

    async def refund(self, db: Database, spends: Sequence[Spend]) -> list[Spend]:
        """Give back to their hosts' buckets the tokens of spends whose tasks, spent again (:meth:`respend`), all
        started too late again and go back to the queue unsent; those whose row no longer holds what the spending
        again wrote are left as they are. Returns the spends refunded.

        Nothing left on those tokens, and nothing was admitted on the host since: the bucket then holds what it
        held before the admission, which is no more than it would hold had the tasks never been admitted (that
        would have kept the refill the spending again forfeited).
        """
        done = []
        async with db.write() as conn:
            for spend in spends:
                back = refunded(State(spend.tokens, spend.refilled_at), spend.tasks)
                params = {
                    "b_host": spend.host,
                    "b_tokens": spend.tokens,
                    "b_refilled_at": spend.refilled_at,
                    "v_tokens": back.tokens,
                }
                if (await conn.execute(_REFUND_HOST, params)).rowcount == 1:
                    spend.tokens = back.tokens
                    spend.tasks = 0  # nothing of it is left to refund or spend again
                    done.append(spend)
        return done

    @staticmethod
    async def _put_back_held(
        conn: AsyncConnection, held: Mapping[str, list[int]], ts: float, now: datetime
    ) -> None:
        """Put back the tasks of held businesses, marked with the hold and its reason in ``last_error`` (the
        usual put-back marks them with their host, which the end of the hold would not find). A statement per
        batch that meets such tasks; each held task meets the claim once per hold."""
        until = datetime.fromtimestamp(ts + BUSINESS_HOLD_S, UTC)
        for reason, ids in sorted(held.items()):
            params = {"b_ids": ids, "b_until": until, "b_held": business_hold_mark(reason)}
            await conn.execute(_PUT_BACK_HELD, {**params, "b_error": BUSINESS_HOLDS[reason], "b_now": now})

    def _hold_rest(
        self, engine: AsyncEngine, rows: Sequence[Mapping[Any, Any]], verdicts: Mapping[int, Any], now: float
    ) -> None:
        """Move the other due tasks of hosts held as a whole for a while (an open circuit, a pause) past the hold
        in one statement per host, in a transaction of its own started now: on SQLite it waits for the one writer,
        so it follows this claim; on PostgreSQL it may run beside it and skips the rows the claim holds.

        Otherwise each of them is claimed and put back on its own when the claim meets it: a sick host's backlog
        cost PostgreSQL two writes of every index of ``tasks`` per task and the worker a claimed row each, taken
        from the healthy hosts' throughput. Once per hold and host (this dispatcher's): a task falling due later
        is held by admission as before. Not for a host parked by its window (see ``_windows``): that is a guess
        its first good answer undoes, and a healthy host starting slowly is parked too.
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
        if len(self._holding) > _MAX_PROMISES:
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

    def _promise(self, task_id: int) -> str | None:
        """The bucket this dispatcher promised the task a token of, if it did (the promise is used up)."""
        promise = self.promised.pop(task_id, None)
        return promise[0] if promise is not None else None

    def _windows(self, hosts: Iterable[str], now: float) -> dict[str, Window]:
        """The hosts whose oldest request in flight is slow to answer, with the room their window leaves.

        Only while other hosts want slots too (claimed in the last second): alone, a host may take them all.
        """
        windows: dict[str, Window] = {}
        hosts = set(hosts)
        for h in hosts:
            self._seen_at[h] = now
        if len(hosts) < 2 and not any(t > now - 1.0 for h, t in self._seen_at.items() if h not in hosts):
            return windows
        if len(self._seen_at) > _MAX_PROMISES:
            self._seen_at = {h: t for h, t in self._seen_at.items() if t > now - 1.0}
        for h in hosts:
            flight = self._flight.get(h)
            if not flight:
                continue
            while flight and flight[0][1] < now:  # its result was lost (a lease taken over): stop counting it
                flight.popleft()
            age = now - flight[0][0] if flight else 0.0
            # A host that has not answered this dispatcher yet is on probation too (like TCP's slow start):
            # otherwise a host that never answers takes every slot that frees up before its first timeout.
            if age > self.slow_after_s or h not in self._window:
                size = self._window.get(h, float(self.slow_window))
                window = Window(room=int(size) - len(flight), spacing_s=max(age, 0.05) / size)
                if window.room <= 0 and age > self.slow_after_s and h not in self._answered_well and flight:
                    # Slow and never answered well: hold the rest until its oldest request's deadline and one
                    # cool-down more (by then its circuit is open if it keeps failing), instead of bringing them
                    # back to the claim loop again and again. Its first good answer pulls them forward.
                    deadline = flight[0][1] - _FLIGHT_GRACE_S
                    window = replace(window, not_before=deadline + self.host_limits(h).breaker_cooldown_s)
                    self._parked.add(h)
                windows[h] = window
        return windows

    def answered(self, outcomes: Mapping[str, Sequence[str]]) -> None:
        """Fold this dispatcher's answered requests (a written batch's outcomes, per host) into its windows."""
        if not self.slow_window:
            return
        for h, outs in outcomes.items():
            flight = self._flight.get(h)
            if flight is None:
                continue
            size = self._window.get(h, float(self.slow_window))
            for outcome in outs:
                if flight:
                    flight.popleft()
                if outcome in _FAILURES:
                    size = max(float(self.slow_window), size / 2)
                elif outcome not in NOT_EVIDENCE:
                    size = min(size + 1, 100_000.0)
                    self._answered_well.add(h)
            self._window[h] = size
            if h in self._parked and h in self._answered_well:
                self._parked.discard(h)
                self._holding.pop(h, None)
                self._release_later([h])
                # Again a second later: a claim that parked more of them just before this answer may not have
                # committed yet, and the first release misses what it cannot see (those would wait out the
                # deadline and a cool-down: 2 of 24 sick-host benchmark rounds took 34 s instead of ~10).
                self._release_later([h], delay_s=1.0)
            if not flight:
                del self._flight[h]
        if len(self._window) > _MAX_PROMISES:
            self._window = {h: w for h, w in self._window.items() if h in self._flight}
            self._answered_well &= self._window.keys()

    def needs_record(self, outcomes: Mapping[str, Sequence[str]], pauses: Mapping[str, float]) -> bool:
        """Whether a written batch changes any breaker or pause."""
        return any(
            h in pauses or h not in self.clean_hosts or any(o in _FAILURES for o in outs)
            for h, outs in outcomes.items()
            if not h.startswith("processor:")
        )

    async def record(
        self,
        conn: AsyncConnection,
        outcomes: Mapping[str, Sequence[str]],
        pauses: Mapping[str, float],
        now: datetime,
    ) -> dict[str, str]:
        """Fold a written batch's outcomes into the host breakers; returns hosts whose breaker changed state."""
        hosts = {
            h
            for h, outs in outcomes.items()
            if not h.startswith("processor:")
            and (h in pauses or h not in self.clean_hosts or any(o in _FAILURES for o in outs))
        }
        if not hosts:
            return {}
        ts = now.timestamp()
        states, _, _, _ = await self._lock_states(conn, hosts, set())
        changes: dict[str, str] = {}
        params = []
        for h in sorted(hosts):
            before = states[h]
            after = record(before, self.host_limits(h), outcomes.get(h, ()), ts, pauses.get(h, 0.0))
            if after.breaker != before.breaker:
                changes[h] = after.breaker
            if after != before:
                params.append(_host_params(h, after))
            if after.breaker == "closed" and after.failures == 0 and after.paused_until <= ts:
                self.clean_hosts.add(h)
            else:
                self.clean_hosts.discard(h)
        if params:
            await conn.execute(_UPDATE_HOST, params)
        closed = [h for h, breaker in changes.items() if breaker == "closed"]
        if closed:
            for h in closed:
                self._holding.pop(h, None)
            self._release_later(closed)
        return changes

    def _release_later(self, hosts: list[str], delay_s: float = 0.0) -> None:
        """Pull the hosts' held tasks forward (``on_close``) once the current transaction is over.

        Not in the transaction: updating other tasks while holding the host_state row a claiming dispatcher waits
        for could deadlock with that claim (which holds due tasks and waits for the row).
        """
        if self.on_close is None:
            return
        moving = {t for h in hosts if (t := self._moving.get(h)) is not None}
        task = asyncio.get_running_loop().create_task(self._release(moving, self.on_close, hosts, delay_s))
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
