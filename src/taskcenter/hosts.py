"""Target hosts as operators see them: policy (explicit values over the defaults), breaker and pause state, load.

Policies live in ``host_policies`` (dispatchers reload them every few seconds); the breaker, tokens and the
``Retry-After`` pause live in ``host_state``, written by dispatchers. Every change is audited in its transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter import cursors
from taskcenter.audit import AuditLog
from taskcenter.clock import utcnow
from taskcenter.domain.task import rfc3339
from taskcenter.domain.traffic import Limits, State, refill, relaxed
from taskcenter.errors import ValidationError
from taskcenter.host_policy import MAX_PAUSE_S as MAX_PAUSE_S  # re-exported (api, cli_hosts)
from taskcenter.host_policy import POLICY_FIELDS as POLICY_FIELDS  # re-exported (api, cli_hosts)
from taskcenter.host_policy import effective_policy, host_limits, pause_end, validate_policy
from taskcenter.host_policy import parse_host as parse_host  # re-exported (tests)
from taskcenter.signals import NOTIFY_CHANNEL
from taskcenter.storage.database import Database
from taskcenter.storage.holds import release_held
from taskcenter.storage.schema import host_policies, host_state, tasks

log = logging.getLogger("taskcenter.hosts")


#: How a host no dispatcher has sent to yet stands: a full bucket (refilled since the epoch), a closed breaker.
_NO_STATE: Mapping[str, Any] = MappingProxyType(
    {"tokens": 0.0, "refilled_at": 0.0, "breaker": "closed", "failures": 0, "open_until": 0.0, "probe_until": 0.0,
     "paused_until": 0.0}
)  # fmt: skip


def _epoch(value: float, now: float) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value > now else None


@dataclass(frozen=True, slots=True)
class HostView:
    """One host as operators see it. Times in the past (an ended pause, a spent cool-down) are ``None``."""

    host: str
    policy: Mapping[str, Any]
    """Effective values: the host's own where set, else the defaults. ``None`` means no limit (or, for
    ``burst``, one second's worth of the rate; for ``breaker_ratio``, no ratio rule)."""
    explicit: tuple[str, ...]
    """The policy fields the host sets itself (the rest follow the defaults)."""
    breaker: str
    failures: int
    open_until: datetime | None
    probe_until: datetime | None
    operator_paused_until: datetime | None
    retry_after_until: datetime | None
    """A pause a receiver asked for with ``Retry-After`` on a 429 or 503."""
    tokens: float | None
    """Requests the rate limit would let through now; ``None`` without a rate limit."""
    in_flight: int
    updated_at: datetime | None

    @property
    def paused_until(self) -> datetime | None:
        """When the host's pause ends: the later of the operator's and the receiver's."""
        ends = [t for t in (self.operator_paused_until, self.retry_after_until) if t is not None]
        return max(ends) if ends else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, times as RFC 3339 UTC."""
        return {
            "host": self.host,
            "policy": dict(self.policy),
            "explicit": list(self.explicit),
            "state": {
                "breaker": self.breaker,
                "failures": self.failures,
                "open_until": rfc3339(self.open_until),
                "probe_until": rfc3339(self.probe_until),
                "paused": self.paused_until is not None,
                "paused_until": rfc3339(self.paused_until),
                "operator_paused_until": rfc3339(self.operator_paused_until),
                "retry_after_until": rfc3339(self.retry_after_until),
                "tokens": self.tokens,
            },
            "in_flight": self.in_flight,
            "updated_at": rfc3339(self.updated_at),
        }


def encode_cursor(host: str) -> str:
    """An opaque keyset cursor over hosts in name order."""
    return cursors.encode("h1", host)


def decode_cursor(cursor: str) -> str:
    """The last host of the previous page; :class:`ValidationError` on anything this API did not hand out."""
    host = cursors.decode("h1", cursor)
    # No host holds a control character (task URLs refuse them), and PostgreSQL cannot compare with a NUL.
    if not host or any(ord(c) < 32 for c in host):
        raise cursors.refused()
    return host


def _upsert(dialect: str, values: Mapping[str, Any]) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(host_policies).values(**values)
    return stmt.on_conflict_do_update(
        index_elements=["host"], set_={k: v for k, v in values.items() if k != "host"}
    )


@dataclass
class HostService:
    """Reads and changes host policies, pauses and breakers."""

    db: Database
    audit: AuditLog
    defaults: Limits = field(default_factory=Limits)
    """Limits of hosts without a policy of their own (``Settings.host_defaults``)."""
    clock: Callable[[], datetime] = utcnow
    settle_s: float = 2.0
    """How long every dispatcher takes to see a policy change (their reload interval). Tasks an operator pause
    held back come due this long after the pause is lifted, so no dispatcher still holding the old pause in
    memory sends them back to its old end."""
    wake: Callable[[], None] | None = None
    """Wakes this process's dispatchers when held tasks were released."""
    changed: Callable[[], Awaitable[None]] | None = None
    """Called after each change, e.g. to reload this process's cached policies at once."""

    # -- reading -----------------------------------------------------------------------------------

    def default_policy(self) -> dict[str, Any]:
        """The policy of a host that sets nothing itself."""
        return effective_policy(None, self.defaults)

    async def get(self, host: str) -> HostView:
        """A host's effective policy, breaker and pause, and its requests in flight.

        A host without a policy or state has the defaults and a closed breaker: every host has a policy.
        """
        host = parse_host(host)
        stmt, names = self._joined()
        views = await self._views(stmt.where(names.c.host == host))
        return views[0] if views else self._view(host, None, None, 0, self.clock())

    async def list_hosts(
        self,
        *,
        breaker: str | None = None,
        paused: bool | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[HostView], str | None]:
        """Hosts with a policy or a state (dispatchers keep one for every host they sent to), by name.

        Returns the page and the next page's cursor (``None`` at the end).
        """
        if not 1 <= limit <= 500:
            raise ValidationError("limit must be between 1 and 500", field="limit")
        if breaker is not None and breaker not in ("closed", "open", "half_open"):
            raise ValidationError("breaker must be closed, open or half_open", field="breaker")
        now = self.clock()
        stmt, names = self._joined()
        # Processor tasks keep a state row under "processor:<name>"; they are not network hosts.
        stmt = stmt.where(sa.not_(names.c.host.startswith("processor:")))
        if breaker is not None:
            stmt = stmt.where(sa.func.coalesce(host_state.c.breaker, "closed") == breaker)
        if paused is not None:
            is_paused = sa.or_(
                sa.and_(host_policies.c.paused_until.is_not(None), host_policies.c.paused_until > now),
                sa.func.coalesce(host_state.c.paused_until, 0.0) > now.timestamp(),
            )
            stmt = stmt.where(is_paused if paused else sa.not_(is_paused))
        if cursor:
            stmt = stmt.where(names.c.host > decode_cursor(cursor))
        views = await self._views(stmt.order_by(names.c.host).limit(limit + 1), now)
        return views[:limit], encode_cursor(views[limit - 1].host) if len(views) > limit else None

    # -- changing ----------------------------------------------------------------------------------

    async def put(self, host: str, data: Mapping[str, Any], *, actor: str) -> HostView:
        """Create or change a host's policy: only the fields given change, ``null`` resets one to the default.

        ``paused_until`` (a time, or ``null`` to lift the operator pause) or ``pause_seconds`` pause the host.
        Running dispatchers pick the change up within a few seconds. A relaxed policy (a higher rate or burst, a
        higher or no in-flight cap, a shorter pause) brings the tasks the old one held back due again.
        """
        host = parse_host(host)
        now = self.clock()
        values, pause_changes, new_end = validate_policy(data, now)
        if not values and not pause_changes:
            raise ValidationError("nothing to change", field="body")
        details: dict[str, Any] = dict(values)
        async with self.db.write() as conn:
            before = await self._policy(conn, host)
            if pause_changes:
                values["paused_until"] = new_end
                details["paused_until"] = rfc3339(new_end)
            await conn.execute(_upsert(self.db.dialect, {"host": host, **values, "updated_at": now}))
            after = await self._policy(conn, host)
            released = await self._release_if_relaxed(conn, host, before, after, now)
            if released:
                details["released"] = released
            await self.audit.record(actor, "host.update", "host", host, details=details, conn=conn)
        await self._after(released)
        return await self.get(host)

    async def pause(
        self,
        host: str,
        *,
        actor: str,
        until: datetime | str | None = None,
        seconds: float | None = None,
    ) -> HostView:
        """Hold back every task for ``host`` until ``until`` (or for ``seconds``); no attempt is charged.

        A shorter pause than the one in force brings the tasks it held back to the new end.
        """
        host = parse_host(host)
        now = self.clock()
        end = pause_end(until, seconds, now, names=("until", "seconds"))
        async with self.db.write() as conn:
            before = await self._policy(conn, host)
            await conn.execute(
                _upsert(self.db.dialect, {"host": host, "paused_until": end, "updated_at": now})
            )
            after = await self._policy(conn, host)
            released = await self._release_if_relaxed(conn, host, before, after, now)
            await self.audit.record(actor, "host.pause", "host", host, details={"paused_until": rfc3339(end)},
                                    conn=conn)  # fmt: skip
        await self._after(released)
        return await self.get(host)

    async def resume(self, host: str, *, actor: str, reset_breaker: bool = False) -> HostView:
        """Lift the operator's pause and any ``Retry-After`` pause; with ``reset_breaker``, close the circuit.

        Tasks those held back come due again (see :attr:`settle_s`) instead of waiting for the old end.
        """
        host = parse_host(host)
        now = self.clock()
        ts = now.timestamp()
        async with self.db.write() as conn:
            before = await self._policy(conn, host)
            await conn.execute(
                sa.update(host_policies)
                .where(host_policies.c.host == host, host_policies.c.paused_until.is_not(None))
                .values(paused_until=None, updated_at=now)
            )
            # Tasks first, host_state second: the order dispatchers lock them in (claim, then admission), so
            # the two never deadlock. The state read here is unlocked; the UPDATEs below take the row lock,
            # after which no dispatcher writes back a pause or a breaker it read before this change.
            row = (
                (await conn.execute(sa.select(host_state).where(host_state.c.host == host)))
                .mappings()
                .first()
            )
            state = row if row is not None else _NO_STATE
            operator_paused = host_limits(before, self.defaults).paused_until > ts
            held = (
                operator_paused
                or state["paused_until"] > ts
                or (reset_breaker and state["breaker"] != "closed")
            )
            released = 0
            if held:
                # A dispatcher may hold the operator's pause in memory for settle_s more (see settle_s).
                due = now + timedelta(seconds=self.settle_s) if operator_paused else now
                released = await self._release(conn, host, host_limits(before, self.defaults), due)
            await conn.execute(
                sa.update(host_state)
                .where(host_state.c.host == host, host_state.c.paused_until != 0.0)
                .values(paused_until=0.0)
            )
            closed = False
            if reset_breaker:
                result = await conn.execute(
                    sa.update(host_state)
                    .where(host_state.c.host == host, host_state.c.breaker != "closed")
                    .values(breaker="closed", failures=0, window="", open_until=0.0, probe_until=0.0)
                )
                closed = bool(result.rowcount)
            details = {"reset_breaker": reset_breaker, "breaker_closed": closed, "released": released}
            await self.audit.record(actor, "host.resume", "host", host, details=details, conn=conn)
        await self._after(released)
        return await self.get(host)

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    async def _policy(conn: AsyncConnection, host: str) -> Mapping[str, Any] | None:
        """The host's policy row, locked (``None`` without one)."""
        row = (
            (
                await conn.execute(
                    sa.select(host_policies).where(host_policies.c.host == host).with_for_update()
                )
            )
            .mappings()
            .first()
        )
        return dict(row) if row is not None else None

    async def _release_if_relaxed(
        self,
        conn: AsyncConnection,
        host: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        now: datetime,
    ) -> int:
        """Bring forward the tasks the old policy held if the new one lets more through."""
        old, new = host_limits(before, self.defaults), host_limits(after, self.defaults)
        if not relaxed(old, new, now.timestamp()):
            return 0
        # A dispatcher may still hold the old policy in memory for settle_s: tasks due before then would only
        # be sent back to the old time (its own reload then pulls them forward again, see runtime).
        due = max(now + timedelta(seconds=self.settle_s), datetime.fromtimestamp(new.paused_until, UTC))
        return await self._release(conn, host, new, due)

    async def _release(self, conn: AsyncConnection, host: str, limits: Limits, due: datetime) -> int:
        """Make the tasks traffic control holds for ``host`` due from ``due`` on, at its rate; returns how many.

        Tasks scheduled for later by their own ``scheduled_at``, and retries waiting out their backoff, keep
        their time: only tasks a dispatcher held back are marked ``held_by`` the host.
        """
        rate = limits.rate_per_second
        count = await release_held(conn, host=host, due=due, step_s=1.0 / rate if rate else 0.0)
        if count and self.db.is_postgres:
            await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
        return count

    async def _after(self, released: int) -> None:
        if released and self.wake is not None:
            self.wake()
        if self.changed is not None:
            try:
                await self.changed()
            except Exception as exc:  # the change is committed; other processes pick it up on their own
                log.warning("reloading host policies after a change failed: %s", exc)

    @staticmethod
    def _joined() -> tuple[Any, Any]:
        """Every host with a policy or a state, beside its policy and state columns (``p_*``, ``s_*``)."""
        names = sa.union(
            sa.select(host_policies.c.host.label("host")), sa.select(host_state.c.host.label("host"))
        ).subquery("names")
        stmt = sa.select(
            names.c.host,
            host_policies.c.host.label("p_host"),
            host_state.c.host.label("s_host"),
            *(c.label(f"p_{c.name}") for c in host_policies.c if c.name != "host"),
            *(c.label(f"s_{c.name}") for c in host_state.c if c.name != "host"),
        ).select_from(
            names.outerjoin(host_policies, host_policies.c.host == names.c.host).outerjoin(
                host_state, host_state.c.host == names.c.host
            )
        )
        return stmt, names

    async def _views(self, stmt: Any, now: datetime | None = None) -> list[HostView]:
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
            hosts = [r["host"] for r in rows]
            busy: dict[str, int] = dict((await conn.execute(
                sa.select(tasks.c.host, sa.func.count())
                .where(tasks.c.status == "processing", tasks.c.host.in_(hosts))
                .group_by(tasks.c.host)
            )).all()) if hosts else {}  # fmt: skip
        return [
            self._view(
                r["host"],
                {c.name: r[f"p_{c.name}"] for c in host_policies.c if c.name != "host"}
                if r["p_host"]
                else None,
                {c.name: r[f"s_{c.name}"] for c in host_state.c if c.name != "host"} if r["s_host"] else None,
                int(busy.get(r["host"], 0)),
                now or self.clock(),
            )
            for r in rows
        ]

    def _view(
        self,
        host: str,
        policy: Mapping[Any, Any] | None,
        state: Mapping[Any, Any] | None,
        in_flight: int,
        now: datetime,
    ) -> HostView:
        effective = effective_policy(policy, self.defaults)
        ts = now.timestamp()
        s = state if state is not None else _NO_STATE
        limits = Limits(rate_per_second=effective["rate_per_second"], burst=effective["burst"])
        tokens = refill(State(s["tokens"], s["refilled_at"]), limits, ts).tokens
        operator_pause = policy["paused_until"] if policy is not None else None
        return HostView(
            host=host,
            policy=effective,
            explicit=tuple(name for name in POLICY_FIELDS if policy is not None and policy[name] is not None),
            breaker=s["breaker"],
            failures=s["failures"],
            open_until=_epoch(s["open_until"], 0.0) if s["breaker"] == "open" else None,
            probe_until=_epoch(s["probe_until"], ts) if s["breaker"] == "half_open" else None,
            operator_paused_until=operator_pause
            if operator_pause is not None and operator_pause > now
            else None,
            retry_after_until=_epoch(s["paused_until"], ts),
            tokens=round(tokens, 3) if limits.rate_per_second is not None else None,
            in_flight=in_flight,
            updated_at=policy["updated_at"] if policy is not None else None,
        )
