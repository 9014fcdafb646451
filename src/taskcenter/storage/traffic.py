"""Shared traffic-control state in the database: admission of a claimed batch and breaker bookkeeping.

Rows of ``host_state`` and ``business_state`` are read ``FOR UPDATE`` inside the claim (or result) transaction,
so every dispatcher of a cluster takes tokens from the same buckets and sees the same breakers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.domain.traffic import HOST_FAILURES as _FAILURES
from taskcenter.domain.traffic import Candidate, Limits, State, admit, record
from taskcenter.storage.schema import business_state, host_state, tasks

_PROCESSING = sa.text("status = 'processing'")
#: Which bucket a task held for a token was promised one of (see ``Candidate.promised``).
_PROMISES = {"host_rate": "host", "business_rate": "business"}
_MAX_PROMISES = 10_000


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
    promised: dict[int, tuple[str, float]] = field(default_factory=dict)
    """Tasks this dispatcher held for a token: which bucket (``host``/``business``) and when it is due."""

    async def _lock_states(
        self, conn: AsyncConnection, hosts: set[str], bizs: set[int]
    ) -> tuple[dict[str, State], dict[int, State]]:
        dialect = conn.dialect.name
        new_hosts, new_bizs = hosts - self.known_hosts, bizs - self.known_businesses
        if new_hosts:
            await conn.execute(_insert_missing(dialect, host_state, "host", sorted(new_hosts)))
            self.known_hosts |= new_hosts
        if new_bizs:
            await conn.execute(_insert_missing(dialect, business_state, "business_pk", sorted(new_bizs)))
            self.known_businesses |= new_bizs
        # Lock in a fixed order (sorted) so two dispatchers never deadlock on each other's rows.
        host_rows = {
            r["host"]: r
            for r in (
                await conn.execute(
                    sa.select(host_state).where(host_state.c.host.in_(sorted(hosts))).order_by(host_state.c.host).with_for_update()
                )
            ).mappings()
        } if hosts else {}  # fmt: skip
        biz_rows = {
            r["business_pk"]: r
            for r in (
                await conn.execute(
                    sa.select(business_state)
                    .where(business_state.c.business_pk.in_(sorted(bizs)))
                    .order_by(business_state.c.business_pk)
                    .with_for_update()
                )
            ).mappings()
        }
        return (
            {h: _state(host_rows.get(h)) for h in hosts},
            {b: State(tokens=r["tokens"], refilled_at=r["refilled_at"]) for b, r in biz_rows.items()}
            | {b: State(0.0, 0.0) for b in bizs - set(biz_rows)},
        )

    async def _in_flight(self, conn: AsyncConnection, column: Any, keys: set[Any]) -> Counter[Any]:
        rows = await conn.execute(
            sa.select(column, sa.func.count()).where(_PROCESSING, column.in_(sorted(keys))).group_by(column)
        )
        return Counter({k: n for k, n in rows.all()})

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
        h_states, b_states = await self._lock_states(conn, hosts, bizs)
        # Decide as of now, not as of when the claim began: under contention the wait for these row locks is
        # the longest part of a claim, and tokens spent "in the past" would let the next dispatcher spend the
        # same seconds again (two bursts back to back at the receiver).
        ts = now.timestamp() + (time.monotonic() - entered)
        claimed_h = Counter(r["host"] for r in rows)
        claimed_b = Counter(r["business_pk"] for r in rows)
        # In flight elsewhere = processing now minus this batch (which the claim just marked processing).
        capped_h = {h for h in hosts if host_lim[h].max_in_flight is not None}
        capped_b = {b for b in bizs if biz_lim[b].max_in_flight is not None}
        busy_h = await self._in_flight(conn, tasks.c.host, capped_h) if capped_h else Counter()
        busy_b = await self._in_flight(conn, tasks.c.business_pk, capped_b) if capped_b else Counter()
        booked_h = {h: replace(h_states[h], booked_until=self.booked_hosts.get(h, 0.0)) for h in hosts}
        booked_b = {b: replace(b_states[b], booked_until=self.booked_businesses.get(b, 0.0)) for b in bizs}
        verdicts, new_h, new_b = admit(
            [Candidate(r["id"], r["host"], r["business_pk"], self._promise(r["id"])) for r in rows],
            hosts={h: (booked_h[h], host_lim[h], max(0, busy_h[h] - claimed_h[h])) for h in hosts},
            businesses={b: (booked_b[b], biz_lim[b], max(0, busy_b[b] - claimed_b[b])) for b in bizs},
            now=ts,
        )
        _keep_promises(self.booked_hosts, new_h, ts)
        _keep_promises(self.booked_businesses, new_b, ts)
        changed_h = [_host_params(h, s) for h, s in new_h.items() if s != booked_h[h]]
        if changed_h:
            await conn.execute(_UPDATE_HOST, changed_h)
        changed_b = [
            {"b_pk": b, "v_tokens": s.tokens, "v_refilled_at": s.refilled_at}
            for b, s in new_b.items()
            if s != booked_b[b]
        ]
        if changed_b:
            await conn.execute(_UPDATE_BUSINESS, changed_b)
        for h, s in new_h.items():
            if s.breaker == "closed" and s.failures == 0 and s.paused_until <= ts:
                self.clean_hosts.add(h)
            else:
                self.clean_hosts.discard(h)
        go = [r for r in rows if verdicts[r["id"]].defer_until is None]
        later = []
        for r in rows:
            v = verdicts[r["id"]]
            if v.defer_until is not None:
                self.deferred[v.reason or "deferred"] += 1
                later.append((r["id"], datetime.fromtimestamp(v.defer_until, UTC)))
                if v.reason in _PROMISES:
                    self.promised[r["id"]] = (_PROMISES[v.reason], v.defer_until)
        if len(self.promised) > _MAX_PROMISES:
            # Tasks another dispatcher took (or that were cancelled) never come back here: drop lapsed promises.
            self.promised = {i: p for i, p in self.promised.items() if p[1] > ts - 60.0}
        return go, later

    def _promise(self, task_id: int) -> str | None:
        """The bucket this dispatcher promised the task a token of, if it did (the promise is used up)."""
        promise = self.promised.pop(task_id, None)
        return promise[0] if promise is not None else None

    def needs_record(self, outcomes: Mapping[str, Sequence[str]], pauses: Mapping[str, float]) -> bool:
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
        states, _ = await self._lock_states(conn, hosts, set())
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
        return changes
