"""The shared traffic-control state rows, ``host_state`` and ``business_state``: created when first met, locked and
read in one statement inside the claim (or result) transaction, written back; and the compare-and-set that spends a
host's tokens again or refunds them. ``storage.traffic`` decides what they hold.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.domain.traffic import State
from taskcenter.storage.database import sqlite_driver
from taskcenter.storage.schema import business_state, host_state


def _state(row: Mapping[Any, Any] | None) -> State:
    """A host's state as its row holds it (no row yet: an empty bucket)."""
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
UPDATE_HOST = (
    sa.update(host_state)
    .where(host_state.c.host == sa.bindparam("b_host"))
    .values({k: sa.bindparam(f"v_{k}") for k in _HOST_COLUMNS})
)
UPDATE_BUSINESS = (
    sa.update(business_state)
    .where(business_state.c.business_pk == sa.bindparam("b_pk"))
    .values(tokens=sa.bindparam("v_tokens"), refilled_at=sa.bindparam("v_refilled_at"))
)


#: Spends a host's tokens again (see ``TrafficControl.respend``), or refunds them (``TrafficControl.refund``): only
#: if the row is still as the admission (or the spending again) left it.
_HOST_AS_LEFT = sa.update(host_state).where(
    host_state.c.host == sa.bindparam("b_host"),
    host_state.c.tokens == sa.bindparam("b_tokens"),
    host_state.c.refilled_at == sa.bindparam("b_refilled_at"),
)
RESPEND_HOST = _HOST_AS_LEFT.values(
    tokens=sa.bindparam("v_tokens"), refilled_at=sa.bindparam("v_refilled_at")
)
REFUND_HOST = _HOST_AS_LEFT.values(tokens=sa.bindparam("v_tokens"))


def host_params(host: str, s: State) -> dict[str, Any]:
    """The parameters of :data:`UPDATE_HOST` that write ``s`` to ``host``'s row."""
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


def _insert_missing(dialect: str, table: sa.Table, key: str, values: Iterable[Any]) -> Any:
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return ins.values([{key: v} for v in values]).on_conflict_do_nothing(index_elements=[key])


async def lock_states(
    conn: AsyncConnection,
    hosts: set[str],
    bizs: set[int],
    *,
    known_hosts: set[str],
    known_businesses: set[int],
    count_hosts: bool = False,
    count_bizs: bool = False,
) -> tuple[dict[str, State], dict[int, State], Counter[str], Counter[int]]:
    """Lock and read the hosts' and businesses' shared state, and (if asked) count their requests in flight
    cluster-wide in the same statement: one round trip. The rows of keys not in ``known_hosts`` and
    ``known_businesses`` are created first (if missing), and those sets updated."""
    dialect = conn.dialect.name
    new_hosts, new_bizs = hosts - known_hosts, bizs - known_businesses
    if new_hosts:
        await conn.execute(_insert_missing(dialect, host_state, "host", sorted(new_hosts)))
        known_hosts |= new_hosts
    if new_bizs:
        await conn.execute(_insert_missing(dialect, business_state, "business_pk", sorted(new_bizs)))
        known_businesses |= new_bizs
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
