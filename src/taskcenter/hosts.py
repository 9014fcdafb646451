"""Target hosts as operators see them: policy (explicit values over the defaults), breaker and pause state, load.

Policies live in ``host_policies`` (dispatchers reload them every few seconds); the breaker, tokens and the
``Retry-After`` pause live in ``host_state``, written by dispatchers. Every change is audited in its transaction.
"""

from __future__ import annotations

import ipaddress
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
from taskcenter.domain.traffic import MAX_BREAKER_WINDOW, Limits, State, refill, relaxed
from taskcenter.errors import ValidationError
from taskcenter.signals import NOTIFY_CHANNEL
from taskcenter.storage.database import Database
from taskcenter.storage.schema import host_policies, host_state, tasks
from taskcenter.storage.traffic import release_held

log = logging.getLogger("taskcenter.hosts")


@dataclass(frozen=True, slots=True)
class _Range:
    kind: type
    low: float
    high: float
    low_open: bool = False

    def describe(self, name: str) -> str:
        what = "an integer" if self.kind is int else "a number"
        low = f"greater than {self.low:,g}" if self.low_open else f"at least {self.low:,g}"
        return f"{name} must be {what} {low} and at most {self.high:,.0f}, or null for the default"


#: Policy fields, their types and ranges. Zero is refused where the dispatcher would read it as "block all"
#: (``max_in_flight``) or "open on any failure" (``breaker_ratio``): ``null`` gives back the default instead.
POLICY_FIELDS: Mapping[str, _Range] = {
    "rate_per_second": _Range(float, 0, 1_000_000, low_open=True),
    "burst": _Range(int, 1, 1_000_000),
    "max_in_flight": _Range(int, 1, 100_000),
    "breaker_failures": _Range(int, 1, 10_000),
    "breaker_ratio": _Range(float, 0, 1, low_open=True),
    "breaker_window": _Range(int, 1, MAX_BREAKER_WINDOW),
    "breaker_cooldown": _Range(float, 0, 86_400, low_open=True),
}
PAUSE_FIELDS = frozenset({"paused_until", "pause_seconds"})
#: Longest operator pause: as far ahead as a task may be scheduled.
MAX_PAUSE_S = 365 * 86_400.0
#: How a host no dispatcher has sent to yet stands: a full bucket (refilled since the epoch), a closed breaker.
_NO_STATE: Mapping[str, Any] = MappingProxyType(
    {"tokens": 0.0, "refilled_at": 0.0, "breaker": "closed", "failures": 0, "open_until": 0.0, "probe_until": 0.0,
     "paused_until": 0.0}
)  # fmt: skip
_HOST_HELP = (
    "host must be host:port with a lower-case host name or a [bracketed] IPv6 address and a port 1-65535"
)


def parse_host(text: str) -> str:
    """Check a ``host:port`` key as tasks carry it (``api.example.com:443``, ``[::1]:8080``); return it.

    Raises:
        ValidationError: naming ``host`` when it is not one.
    """
    name, colon, port = text.rpartition(":")
    # At most 5 digits before int(): a port of thousands of them is past int()'s limit (a ValueError).
    if not colon or not port.isascii() or not port.isdigit() or len(port) > 5 or port != str(int(port)):
        raise ValidationError(_HOST_HELP, field="host")
    if not 1 <= int(port) <= 65535:
        raise ValidationError(_HOST_HELP, field="host")
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValidationError(_HOST_HELP, field="host") from None
        if inner != inner.lower():
            raise ValidationError(_HOST_HELP, field="host")
        return text
    if (
        not 1 <= len(name) <= 253
        or name != name.lower()
        or not all(c.isalnum() or c in "-._" for c in name)
        or name[0] in "-."
    ):
        raise ValidationError(_HOST_HELP, field="host")
    return text


def _number(name: str, value: Any) -> int | float:
    rule = POLICY_FIELDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(rule.describe(name), field=name)
    if rule.kind is int and not (isinstance(value, int) or value.is_integer()):
        raise ValidationError(rule.describe(name), field=name)
    too_low = value <= rule.low if rule.low_open else value < rule.low
    # "not <= high" rather than "> high": NaN fails every comparison, so this refuses it too.
    if too_low or not value <= rule.high:
        raise ValidationError(rule.describe(name), field=name)
    return int(value) if rule.kind is int else float(value)


def _pause_end(until: Any, seconds: Any, now: datetime, *, names: tuple[str, str]) -> datetime:
    """The end of a pause given as a time or as seconds from now (exactly one of them)."""
    until_name, seconds_name = names
    if until is not None and seconds is not None:
        raise ValidationError(f"give {until_name} or {seconds_name}, not both", field=until_name)
    if until is None and seconds is None:
        raise ValidationError(f"give {until_name} (a time) or {seconds_name}", field=seconds_name)
    if seconds is not None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < seconds <= MAX_PAUSE_S
        ):
            raise ValidationError(
                f"{seconds_name} must be greater than 0 and at most {MAX_PAUSE_S:,.0f} seconds (a year)",
                field=seconds_name,
            )
        return now + timedelta(seconds=seconds)
    if isinstance(until, str):
        try:
            until = datetime.fromisoformat(until.replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError(f"{until_name} must be an RFC 3339 date-time", field=until_name) from None
    if not isinstance(until, datetime):
        raise ValidationError(f"{until_name} must be an RFC 3339 date-time", field=until_name)
    if until.tzinfo is None:
        raise ValidationError(f"{until_name} needs a time zone (e.g. Z)", field=until_name)
    try:
        end: datetime = until.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValidationError(f"{until_name} is out of range", field=until_name) from None
    if end <= now:
        raise ValidationError(
            f"{until_name} must be in the future (to lift a pause, resume)", field=until_name
        )
    if end - now > timedelta(seconds=MAX_PAUSE_S):
        raise ValidationError(f"{until_name} is more than a year ahead", field=until_name)
    return end


def validate_policy(data: Mapping[str, Any], now: datetime) -> tuple[dict[str, Any], bool, datetime | None]:
    """Check a policy change: returns (column values, whether the pause changes, the new operator pause end).

    ``null`` for a policy field resets it to the default; ``"paused_until": null`` lifts the operator pause.

    Raises:
        ValidationError: naming the offending field.
    """
    unknown = sorted(set(data) - set(POLICY_FIELDS) - PAUSE_FIELDS)
    if unknown:
        raise ValidationError(f"{unknown[0]} is not a known field", field=unknown[0])
    values = {
        name: None if data[name] is None else _number(name, data[name])
        for name in POLICY_FIELDS
        if name in data
    }
    until, seconds = data.get("paused_until"), data.get("pause_seconds")
    if until is None and seconds is None:
        return values, "paused_until" in data, None
    return values, True, _pause_end(until, seconds, now, names=("paused_until", "pause_seconds"))


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


def _limits(row: Mapping[str, Any] | None, defaults: Limits) -> Limits:
    """The rate, burst, in-flight cap and operator pause a policy row (or none) gives a host."""
    policy = effective_policy(row, defaults)
    paused = row["paused_until"] if row is not None else None
    return Limits(
        rate_per_second=policy["rate_per_second"],
        burst=policy["burst"],
        max_in_flight=policy["max_in_flight"],
        paused_until=paused.timestamp() if paused is not None else 0.0,
    )


def effective_policy(row: Mapping[Any, Any] | None, defaults: Limits) -> dict[str, Any]:
    """A host's policy: its own values where set, else ``defaults`` (as ``runtime._host_limits`` resolves it)."""
    fallback = {
        "rate_per_second": defaults.rate_per_second,
        "burst": defaults.burst,
        "max_in_flight": defaults.max_in_flight,
        "breaker_failures": defaults.breaker_failures,
        "breaker_ratio": defaults.breaker_ratio,
        "breaker_window": defaults.breaker_window,
        "breaker_cooldown": defaults.breaker_cooldown_s,
    }
    if row is None:
        return fallback
    return {name: row[name] if row[name] is not None else default for name, default in fallback.items()}


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
        values, pause_changes, pause_end = validate_policy(data, now)
        if not values and not pause_changes:
            raise ValidationError("nothing to change", field="body")
        details: dict[str, Any] = dict(values)
        async with self.db.write() as conn:
            before = await self._policy(conn, host)
            if pause_changes:
                values["paused_until"] = pause_end
                details["paused_until"] = rfc3339(pause_end)
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
        end = _pause_end(until, seconds, now, names=("until", "seconds"))
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
            operator_paused = _limits(before, self.defaults).paused_until > ts
            held = (
                operator_paused
                or state["paused_until"] > ts
                or (reset_breaker and state["breaker"] != "closed")
            )
            released = 0
            if held:
                # A dispatcher may hold the operator's pause in memory for settle_s more (see settle_s).
                due = now + timedelta(seconds=self.settle_s) if operator_paused else now
                released = await self._release(conn, host, _limits(before, self.defaults), due)
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
        old, new = _limits(before, self.defaults), _limits(after, self.defaults)
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
